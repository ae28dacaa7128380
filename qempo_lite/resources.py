"""Files shipped inside the package (recipes, MT-Bench questions and judge prompts), read through
:mod:`importlib.resources` so that they resolve the same from a source checkout and from an installed wheel."""

from __future__ import annotations

import atexit
import contextlib
from importlib import resources
from pathlib import Path

_extracted = contextlib.ExitStack()  # zip-imported packages: files copied out once, removed at exit
atexit.register(_extracted.close)


def package_file(*parts: str) -> Path:
    """A real path to ``qempo_lite/<parts...>`` (a file or a folder), wherever the package is installed."""
    resource = resources.files("qempo_lite").joinpath(*parts)
    if isinstance(resource, Path):
        return resource
    return _extracted.enter_context(resources.as_file(resource))


__all__ = ["package_file"]
