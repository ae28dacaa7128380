"""The README's set-up commands and CI stay in step."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    head = "\n".join((ROOT / "README.md").read_text().splitlines()[:60])
    return re.findall(r"```bash\n(.+?)\n```", head)


def test_readme_has_the_two_setup_commands_near_the_top():
    commands = _readme_commands()
    assert any(c.endswith("qempo-lite demo") for c in commands), commands
    assert any(c.endswith("python -m pytest") for c in commands), commands


def test_ci_runs_the_readme_test_command_verbatim():
    test_command = next(c for c in _readme_commands() if c.endswith("python -m pytest"))
    ci_lines = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in ci_lines


def test_console_script_declared():
    assert 'qempo-lite = "qempo_lite.cli:main"' in (ROOT / "pyproject.toml").read_text()


def test_no_message_of_the_package_advises_an_editable_install():
    """A user of the wheel has no checkout: advice names the package and its extra, never '-e .'."""
    for path in (ROOT / "qempo_lite").rglob("*.py"):
        assert "pip install -e" not in path.read_text(encoding="utf-8"), path


def test_readme_links_survive_a_package_index():
    """A package index renders README.md without the repository beside it: every link and image is absolute."""
    targets = re.findall(r"\]\(([^)]*)\)", (ROOT / "README.md").read_text())
    assert [t for t in targets if not t.startswith("https://")] == []


def test_license_file_is_the_declared_apache_2_0():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text and "END OF TERMS AND CONDITIONS" in text
    assert 'license = "Apache-2.0"' in (ROOT / "pyproject.toml").read_text()


def test_sdist_carries_what_its_tests_read():
    """MANIFEST.in puts the tests, their fixtures and data, and the files they check into the source distribution."""
    manifest = (ROOT / "MANIFEST.in").read_text().split()
    assert {"tests", "docs", "benchmarks", "app", "LICENSE", ".ci/run"} <= set(manifest)


def test_the_vllm_extra_is_the_range_the_version_check_holds():
    from qempo_lite.vllm_version import VLLM_VERSION_RANGE

    assert f'vllm = ["vllm{VLLM_VERSION_RANGE}"]' in (ROOT / "pyproject.toml").read_text()


def test_the_newest_lane_installs_releases_inside_the_declared_ranges_without_vllm():
    """``.ci/newest`` pins transformers and accelerate to releases pyproject.toml's ranges admit, installs the
    ``test`` extra (which holds no vLLM) and leaves out the vllm-marked tests."""
    import tomllib

    from packaging.requirements import Requirement

    script = (ROOT / ".ci" / "newest").read_text()
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = {r.name: r.specifier for r in map(Requirement, project["dependencies"])}
    pins = dict(re.findall(r"\b(transformers|accelerate)==([\d.]+)", script))
    assert set(pins) == {"transformers", "accelerate"}
    assert all(declared[name].contains(version) for name, version in pins.items()), (pins, declared)
    assert 'pip install torch==2.13.0 -e ".[test]"' in script and '-m "not vllm"' in script
    assert not [r for r in project["optional-dependencies"]["test"] if "vllm" in r]
    assert "qempo-lite[test]" in project["optional-dependencies"]["dev"]
