"""Reward functions named in a recipe (``reward_funcs``), as TRL users write them.

A name is a built-in (:data:`BUILT_IN`: ``math`` for GSM8K/MATH answers, ``answer_set`` for
questions with a set of correct answers in a column ``answers``), ``package.module:function``
or ``path/to/file.py:function``. The function has TRL's reward signature: it is called with
keyword arguments ``prompts``, ``completions``, ``completion_ids``, TRL's own extras and every
dataset column, so it must take ``**kwargs``, and returns one float (or None: not scored) per
completion. Each is checked before training and wrapped so that a value that is not a finite
number stops the run with one line naming the function and the completion.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import inspect
import math
from pathlib import Path
from typing import Callable, Iterable

from ..errors import QempoError, one_line

BUILT_IN = {"math": ("qempo_lite.rewards", "math_reward", ("answer",)),
            "answer_set": ("qempo_lite.rewards.answer_sets", "set_reward", ("answers",))}
TRL_KEYWORDS = ("prompts", "completions", "completion_ids")


def _import(name: str) -> Callable:
    if name in BUILT_IN:
        module, function, _ = BUILT_IN[name]
        return getattr(importlib.import_module(module), function)
    where, sep, function = name.rpartition(":")
    if not sep or not where or not function.isidentifier():
        raise QempoError(f"reward {name!r} is neither a built-in ({', '.join(BUILT_IN)}) nor module:function or "
                         "path/to/file.py:function; fix reward_funcs")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise QempoError(f"reward {name!r}: {path} is not a file; fix the path in reward_funcs")
            spec = importlib.util.spec_from_file_location(f"qempo_reward_{path.stem}", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(where)
    except QempoError:
        raise
    except Exception as err:  # the user's module failing to import is their error to fix, in one line
        raise QempoError(f"reward {name!r} cannot be imported ({type(err).__name__}: {one_line(err)}); fix the "
                         "module or reward_funcs") from None
    func = getattr(module, function, None)
    if not callable(func):
        raise QempoError(f"reward {name!r}: {where} has no function {function!r}; fix reward_funcs")
    return func


def check_signature(name: str, func: Callable, columns: Iterable[str]) -> None:
    """One-line error unless ``func`` takes what TRL passes: ``**kwargs``, and no required parameter
    other than TRL's keywords and the dataset's columns."""
    try:
        parameters = inspect.signature(func).parameters.values()
    except (TypeError, ValueError):
        return  # a builtin or C function: let TRL call it
    if not any(p.kind is p.VAR_KEYWORD for p in parameters):
        raise QempoError(f"reward {name!r} must take **kwargs: TRL calls it with prompts, completions, "
                         "completion_ids and every dataset column as keywords; add **kwargs to its signature")
    known = set(TRL_KEYWORDS) | set(columns)
    required = [p.name for p in parameters if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                     p.KEYWORD_ONLY)]
    missing = [p for p in required if p not in known]
    if missing:
        raise QempoError(f"reward {name!r} needs {', '.join(missing)}, which is neither one of TRL's keywords "
                         f"({', '.join(TRL_KEYWORDS)}) nor a dataset column ({', '.join(sorted(columns))}); add the "
                         "column to the data or give the parameter a default")


def checked(name: str, func: Callable) -> Callable:
    """``func`` with its output checked: one number or None per completion, every number finite."""

    @functools.wraps(func)
    def reward(*args, **kwargs):
        completions = kwargs.get("completions", args[1] if len(args) > 1 else [])
        values = func(*args, **kwargs)
        if values is None or isinstance(values, (str, bytes)) or not hasattr(values, "__len__") \
                or len(values) != len(completions):
            got = "None" if values is None else f"{type(values).__name__}"
            raise QempoError(f"reward {name!r} returned {got}, not one value per completion ({len(completions)}); "
                             "return a list of floats")
        for index, value in enumerate(values):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
                raise QempoError(f"reward {name!r} returned {value!r} for completion {index}; return finite numbers "
                                 "(or None for a completion it does not score)")
        return values

    return reward


def load_reward_funcs(names: list[str], columns: Iterable[str]) -> list[Callable]:
    """The recipe's reward functions, imported, checked against the dataset's ``columns`` and wrapped."""
    if not names:
        raise QempoError("reward_funcs is empty; name at least one reward (e.g. math or answer_set)")
    columns = list(columns)
    funcs = []
    for name in names:
        if name in BUILT_IN and not set(BUILT_IN[name][2]) <= set(columns):
            raise QempoError(f"reward {name!r} reads the column {BUILT_IN[name][2][0]!r}, which the data lacks "
                             f"(its columns: {', '.join(columns)}); use data with that column or another reward")
        func = _import(name)
        check_signature(name, func, columns)
        funcs.append(checked(name, func))
    return funcs


__all__ = ["BUILT_IN", "check_signature", "checked", "load_reward_funcs"]
