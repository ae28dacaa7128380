"""`qempo-lite demo --quick` end to end: the four artefacts, every method, finite numbers."""

import json
import math

from qempo_lite.cli import main
from qempo_lite.demo import METHODS


def test_demo_quick_writes_the_artefacts(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "qempo-lite app" in printed
    report = json.loads((out / "report.json").read_text())
    assert set(report["methods"]) == {"reference", *METHODS}
    for name, row in report["methods"].items():
        for key in ("quality", "entropy", "distinct", "predicted_entropy"):
            assert math.isfinite(row[key]), (name, key)
        assert 0.0 <= row["quality"] <= 1.0
    assert (out / "report.md").read_text().count("| qempo") == 2  # qempo and qempo_kl rows
    assert (out / "distributions.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for method in METHODS:
        adapter = out / "adapters" / method
        assert (adapter / "adapter_model.safetensors").is_file()
        meta = json.loads((adapter / "qempo_lite.json").read_text())
        assert meta["method"] == method
    assert (out / "base" / "config.json").is_file()
