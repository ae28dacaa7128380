"""Recipes: a YAML file of config keys, overridden by ``--key value`` flags, checked against dataclasses.

A training command declares the dataclasses its keys belong to (e.g. ``QEMPOConfig``, the
model keys, the data keys); :func:`parse_recipe` reads ``--config FILE`` (a YAML file, or a
recipe shipped in the package named by ``NAME`` or ``KIND/NAME``: :mod:`qempo_lite.recipe_files`),
merges the command-line flags over it, and builds one instance per dataclass. Every mistake is a
one-line :class:`~qempo_lite.errors.QempoError` naming the key and the fix:

* an unknown key, with the closest known key as a suggestion;
* a value of the wrong type, with the expected type and the value given;
* a missing or unreadable YAML file, or a file that is not a mapping;
* a required key left unset.

Why not ``trl.TrlParser``: it copies YAML values into argparse defaults unchecked (a string
where a float belongs fails deep inside training), reports unknown keys as a list without a
suggestion, and argparse errors print a usage block rather than one line.

A flag means what the same value means in the YAML file: ``--report_to none`` is ``report_to: none``
(the string 'none', transformers' "no integrations"), ``--limit null`` is None. YAML 1.1 reads ``5e-7``
as a string; numeric strings are accepted wherever a number is.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import json
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Sequence

from .errors import QempoError, not_a_file, short_repr

MAX_RECIPE_VALUES = 10_000
"""Most values (scalars, lists and mappings, counted with every YAML alias written out) a recipe may hold:
a few aliases nested in each other ("billion laughs") would otherwise expand to gigabytes."""

_NONE_WORDS = ("none", "null", "~")
_TRUE_WORDS = ("true", "yes", "on", "1")
_FALSE_WORDS = ("false", "no", "off", "0")


class _Mismatch(Exception):
    """The value does not fit the annotation."""


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Load a YAML mapping from ``path``; QempoError if it is missing, malformed or not a mapping."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise QempoError(f"config file {str(path)!r} {not_a_file(path)}; pass an existing YAML file to --config")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except RecursionError:
        raise QempoError(f"config file {str(path)!r} nests lists or mappings too deeply; write plain "
                         "key: value lines") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise QempoError(f"config file {str(path)!r} is not valid YAML{where}: {problem}; fix the file") from err
    if data is None:
        raise QempoError(f"config file {str(path)!r} is empty; write the recipe's key: value lines in it (see "
                         "'qempo-lite recipes list' for complete ones)")
    if not isinstance(data, dict):
        raise QempoError(f"config file {str(path)!r} must be a YAML mapping of key: value, got {type(data).__name__}")
    for key in data:
        if not isinstance(key, str):
            raise QempoError(f"config file {str(path)!r} has a non-string key {short_repr(key)}; keys are field "
                             "names")
    _check_expanded_size(data, path)
    return data


def _check_expanded_size(data: Any, path: Path) -> None:
    """Refuse a recipe whose aliases expand past :data:`MAX_RECIPE_VALUES` values or refer to themselves.

    PyYAML shares an aliased node instead of copying it, so loading is cheap; what would take
    gigabytes is walking the values (checking them, printing them). Sizes are counted once per
    shared node, so this walk stays as small as the file.
    """
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()
    stack: list[tuple[Any, bool]] = [(data, False)]
    while stack:
        node, children_done = stack.pop()
        if not isinstance(node, (dict, list)):
            continue
        key = id(node)
        items = list(node.values()) if isinstance(node, dict) else node
        if children_done:
            open_nodes.discard(key)
            sizes[key] = 1 + sum(sizes.get(id(item), 1) for item in items)
            if sizes[key] > MAX_RECIPE_VALUES:
                raise QempoError(f"config file {str(path)!r} expands to more than {MAX_RECIPE_VALUES:,} values "
                                 "(YAML aliases nested in each other); write the values out")
            continue
        if key in sizes:
            continue
        if key in open_nodes:
            raise QempoError(f"config file {str(path)!r} has a YAML alias that refers to itself; write the values "
                             "out")
        open_nodes.add(key)
        stack.append((node, True))
        stack.extend((item, False) for item in items)


class _Bare(str):
    """The value of a bare ``--flag``: ``true`` for a boolean key, a missing value for any other."""


_BARE = _Bare("true")


def split_flags(argv: Sequence[str]) -> tuple[str | None, dict[str, str]]:
    """Split ``argv`` into the ``--config`` path and ``{key: raw string}`` overrides.

    Accepts ``--key value``, ``--key=value`` and bare ``--flag`` (``true``, for boolean keys only). Dashes in
    keys are read as underscores.
    """
    config_path: str | None = None
    flags: dict[str, str] = {}
    args = list(argv)
    i = 0
    while i < len(args):
        token = args[i]
        if not token.startswith("--") or token == "--":
            raise QempoError(f"unexpected argument {token!r}; options are written --key value")
        key, eq, value = token[2:].partition("=")
        key = key.replace("-", "_")
        if not key:
            raise QempoError(f"empty option name in {token!r}; write --key value")
        if not eq:
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                value = args[i + 1]
                i += 1
            elif key == "config":
                raise QempoError("--config needs a YAML recipe: a file or a shipped recipe's name (see 'qempo-lite "
                                 "recipes list')")
            else:
                value = _BARE
        i += 1
        if key == "config":
            config_path = value
        else:
            flags[key] = value
    return config_path, flags


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(arg) for arg in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (list, tuple, set):
        args = typing.get_args(tp)
        return f"list of {_type_name(args[0])}" if args else "list"
    if origin is dict:
        return "mapping"
    if tp is type(None):
        return "None"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(repr(m.value) for m in tp)
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp, convert: bool) -> Any:
    """Return ``value`` as type ``tp``; with ``convert``, also parse strings (flags, YAML's ``5e-7``)."""
    if tp is Any or tp is object:
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        members = typing.get_args(tp)
        if value is None or (convert and isinstance(value, str) and value.lower() in _NONE_WORDS):
            if type(None) in members:
                return None
            raise _Mismatch
        for strict in ((True, False) if convert else (True,)):
            for member in members:
                if member is type(None):
                    continue
                try:
                    return _coerce(value, member, convert=not strict)
                except _Mismatch:
                    pass
        raise _Mismatch
    if origin is typing.Literal:
        for choice in typing.get_args(tp):
            if value == choice or (convert and isinstance(value, str) and str(choice) == value):
                return choice
        raise _Mismatch
    if origin in (list, tuple, set) or tp in (list, tuple, set):
        args = typing.get_args(tp)
        item_type = args[0] if args else Any
        if isinstance(value, (list, tuple)):
            items = list(value)
        elif convert and isinstance(value, str):
            items = [part.strip() for part in value.split(",") if part.strip()]
        else:
            raise _Mismatch
        return [_coerce(item, item_type, convert) for item in items]
    if origin is dict or tp is dict:
        if isinstance(value, dict):
            return value
        if convert and isinstance(value, str):
            try:
                parsed = json.loads(value)
            except json.JSONDecodeError:
                raise _Mismatch from None
            if isinstance(parsed, dict):
                return parsed
        raise _Mismatch
    if value is None:
        raise _Mismatch
    if tp is bool:
        if isinstance(value, bool):
            return value
        if convert and isinstance(value, str) and value.lower() in _TRUE_WORDS + _FALSE_WORDS:
            return value.lower() in _TRUE_WORDS
        raise _Mismatch
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if convert and isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 leaves 5e-7 a string
            try:
                return float(value)
            except ValueError:
                raise _Mismatch from None
        raise _Mismatch
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        for member in tp:
            if value == member.value or value is member:
                return member.value
        raise _Mismatch
    if tp is Path:
        if isinstance(value, (str, Path)):
            return Path(value)
        raise _Mismatch
    if isinstance(tp, type):
        if isinstance(value, tp):
            return value
        raise _Mismatch
    return value


def coerce_value(key: str, value: Any, tp, *, from_flag: bool = False) -> Any:
    """``value`` converted to annotation ``tp``, or a one-line QempoError naming ``key``."""
    try:
        return _coerce(value, tp, convert=from_flag)
    except _Mismatch:
        pass
    if not from_flag and isinstance(value, str):
        # A YAML scalar that only a string parse would fit (e.g. 'true' quoted): accept it too.
        try:
            return _coerce(value, tp, convert=True)
        except _Mismatch:
            pass
    raise QempoError(f"config key {key!r} expects {_type_name(tp)}, got {short_repr(value)} ({type(value).__name__})")


def _field_types(cls) -> dict[str, Any]:
    try:
        hints = typing.get_type_hints(cls)
    except Exception:  # an unresolvable annotation somewhere upstream; fall back to raw ones
        hints = {}
    return {f.name: hints.get(f.name, f.type if not isinstance(f.type, str) else Any)
            for f in dataclasses.fields(cls) if f.init}


def known_keys(dataclass_types: Iterable[type]) -> dict[str, tuple[type, Any]]:
    """``{key: (owning dataclass, annotation)}``; a key declared twice belongs to the first."""
    keys: dict[str, tuple[type, Any]] = {}
    for cls in dataclass_types:
        for name, tp in _field_types(cls).items():
            keys.setdefault(name, (cls, tp))
    return keys


def _unknown_key(key: str, keys: Iterable[str], source: str, help_hint: str) -> QempoError:
    close = difflib.get_close_matches(key, list(keys), n=1, cutoff=0.6)
    suggestion = f"did you mean {close[0]!r}? " if close else ""
    return QempoError(f"unknown config key {short_repr(key)} {source}; {suggestion}{help_hint}")


def _flag_value(key: str, raw: str, tp) -> Any:
    """``--key raw`` means what ``key: raw`` means in a YAML recipe (``--report_to none`` is the string 'none',
    ``--limit null`` is None, ``--target_modules [q_proj, v_proj]`` a list); a value YAML would refuse for the
    key is then read as the plain string the shell passed (``--run_name 2024``, ``--eval_strategy no``)."""
    import yaml

    if raw is not _BARE:
        try:
            as_yaml = yaml.safe_load(raw)
        except yaml.YAMLError:
            pass
        else:
            try:
                return coerce_value(key, as_yaml, tp)
            except QempoError:
                pass
    return coerce_value(key, raw, tp, from_flag=True)


def merge_values(yaml_values: dict[str, Any], flags: dict[str, str], dataclass_types: Sequence[type], *,
                 config_path: str | None = None, help_hint: str = "see --help for the keys") -> dict[str, Any]:
    """Check and coerce YAML values and flag overrides (flags win) into ``{key: typed value}``."""
    keys = known_keys(dataclass_types)
    values: dict[str, Any] = {}
    for key, value in yaml_values.items():
        if key not in keys:
            raise _unknown_key(key, keys, f"in {config_path}" if config_path else "in the config", help_hint)
        values[key] = coerce_value(key, value, keys[key][1])
    for key, raw in flags.items():
        if key not in keys:
            raise _unknown_key(key, keys, f"(--{key})", help_hint)
        try:
            values[key] = _flag_value(key, raw, keys[key][1])
        except QempoError:
            values[key] = None
            if raw is not _BARE:
                raise
        if raw is _BARE and values[key] is not True:  # a bare flag sets booleans only: no silent 'true' string
            raise QempoError(f"--{key} needs a value ({_type_name(keys[key][1])}): write --{key} VALUE")
    return values


def build_dataclass(cls: type, values: dict[str, Any]):
    """Instantiate ``cls`` from the entries of ``values`` that are its fields; one-line errors."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {k: v for k, v in values.items() if k in fields}
    for name, f in fields.items():
        if name not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise QempoError(f"missing required config key {name!r}; set it in the YAML file or pass --{name} VALUE")
    try:
        return cls(**kwargs)
    except QempoError:
        raise
    except (ValueError, TypeError, NotImplementedError) as err:
        lines = str(err).strip().splitlines()
        raise QempoError(f"invalid configuration: {lines[0] if lines else type(err).__name__}") from err


def parse_recipe(argv: Sequence[str], dataclass_types: Sequence[type], *,
                 help_hint: str = "see --help for the keys", mode: str | None = None) -> tuple[Any, ...]:
    """Parse ``[--config FILE|NAME] [--key value ...]`` into one instance of each of ``dataclass_types``;
    a recipe name is looked up among ``mode``'s shipped recipes first."""
    from .recipe_files import config_file

    config_path, flags = split_flags(argv)
    if config_path is not None:
        config_path = str(config_file(config_path, mode))
    yaml_values = read_yaml(config_path) if config_path is not None else {}
    values = merge_values(yaml_values, flags, dataclass_types, config_path=config_path, help_hint=help_hint)
    return tuple(build_dataclass(cls, values) for cls in dataclass_types)


def describe_keys(cls: type, *, width: int = 100) -> list[str]:
    """One help line per field of ``cls``: ``key (type, default): help``."""
    lines = []
    types_ = _field_types(cls)
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.default is not dataclasses.MISSING:
            default = f"default {f.default!r}"
        elif f.default_factory is not dataclasses.MISSING:
            default = f"default {f.default_factory()!r}"
        else:
            default = "required"
        text = f"  {f.name} ({_type_name(types_[f.name])}, {default}): {f.metadata.get('help', '')}"
        lines.append(text if len(text) <= width else text[: width - 3] + "...")
    return lines


__all__ = ["build_dataclass", "coerce_value", "describe_keys", "known_keys", "merge_values", "parse_recipe",
           "read_yaml", "split_flags"]
