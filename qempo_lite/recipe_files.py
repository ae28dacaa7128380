"""The recipes shipped in the package and the ``qempo-lite recipes`` command.

``qempo_lite/recipes/`` holds one YAML file per (model, method) for each training mode, and the
``accelerate launch`` configs::

    offline/qwen2.5-1.5b-qempo.yaml  online/qwen2.5-1.5b-qempo.yaml  accelerate/ddp.yaml ...

A recipe is named ``KIND/NAME`` (``offline/qwen2.5-1.5b-qempo``) or by its bare ``NAME``, which
is looked up in the kinds of the command at hand first (``train online --config NAME`` finds
``online/NAME``), then in offline, online and accelerate order. ``--config`` takes an existing
YAML file first, then a shipped recipe name.

``qempo-lite recipes list [KIND]`` lists them, ``show NAME`` prints one, ``copy NAME DEST`` copies
one to edit (never over an existing file), and ``path NAME`` prints its installed path, e.g. for
``accelerate launch --config_file "$(qempo-lite recipes path ddp)" ...``.
"""

from __future__ import annotations

import difflib
import shutil
import sys
from pathlib import Path

from .console import ArgumentParser, input_read
from .errors import QempoError, not_a_file
from .resources import package_file

KINDS = ("offline", "online", "accelerate")
SUFFIX = ".yaml"


def shipped_recipes(kind: str | None = None) -> list[str]:
    """``KIND/NAME`` of every shipped recipe (of ``kind`` only, if given), sorted."""
    root = package_file("recipes")
    return [f"{k}/{p.name[:-len(SUFFIX)]}" for k in KINDS if kind in (None, k)
            for p in sorted((root / k).glob(f"*{SUFFIX}"))]


def find_shipped(name: str, prefer: tuple[str, ...] = ()) -> Path | None:
    """The shipped recipe ``name`` (``KIND/NAME`` or ``NAME``, ``.yaml`` optional) names, or None."""
    name = name[:-len(SUFFIX)] if name.endswith(SUFFIX) else name
    kind, _, stem = name.rpartition("/")
    if kind and kind not in KINDS or not stem or "\\" in stem:
        return None
    root = package_file("recipes")
    for k in (kind,) if kind else tuple(dict.fromkeys(prefer + KINDS)):
        path = root / k / f"{stem}{SUFFIX}"
        if path.is_file():
            return path
    return None


def _unknown(name: str, prefer: tuple[str, ...]) -> str:
    names = shipped_recipes(prefer[0] if len(prefer) == 1 else None)
    close = difflib.get_close_matches(name, names + [n.partition("/")[2] for n in names], n=1, cutoff=0.6)
    return (f"{'did you mean ' + repr(close[0]) + '? ' if close else ''}see 'qempo-lite recipes list"
            f"{' ' + prefer[0] if len(prefer) == 1 else ''}'")


def recipe_path(name: str, prefer: tuple[str, ...] = ()) -> Path:
    """The shipped recipe named ``name``; QempoError naming the closest one if there is none."""
    path = find_shipped(name, prefer)
    if path is None:
        raise QempoError(f"no shipped recipe named {name!r}; {_unknown(name, prefer)}")
    return path


def config_file(value: str, mode: str | None = None) -> Path:
    """What ``--config VALUE`` reads: an existing file, else the shipped recipe of that name (``mode``'s first)."""
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = find_shipped(value, (mode,) if mode else ())
    if shipped is not None:
        return shipped
    raise QempoError(f"config file {value!r} {not_a_file(path)}, nor is it a shipped recipe; pass a YAML file or a "
                     f"recipe name: {_unknown(value, (mode,) if mode else ())}")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="qempo-lite recipes", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = commands.add_parser("list", help="list the shipped recipes")
    listing.add_argument("kind", nargs="?", choices=KINDS, help="only this kind")
    show = commands.add_parser("show", help="print a recipe")
    show.add_argument("name", help="KIND/NAME or NAME, e.g. offline/qwen2.5-1.5b-qempo")
    copy = commands.add_parser("copy", help="copy a recipe to edit (never over an existing file)")
    copy.add_argument("name", help="KIND/NAME or NAME")
    copy.add_argument("dest", help="the new file, or a directory to copy it into")
    path = commands.add_parser("path", help="print a recipe's installed path (e.g. for accelerate --config_file)")
    path.add_argument("name", help="KIND/NAME or NAME, e.g. ddp")
    return parser


def cli(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    input_read()
    if args.action == "list":
        for name in shipped_recipes(args.kind):
            print(name)
        return 0
    source = recipe_path(args.name)
    if args.action == "show":
        sys.stdout.write(source.read_text(encoding="utf-8"))
    elif args.action == "path":
        print(source)
    else:
        dest = Path(args.dest).expanduser()
        if dest.is_dir():
            dest = dest / source.name
        if dest.exists():
            raise QempoError(f"{dest} already exists; choose another destination or remove it first")
        if not dest.parent.is_dir():
            raise QempoError(f"folder {dest.parent} not found; create it or choose another destination")
        shutil.copyfile(source, dest)
        print(f"copied {source.parent.name}/{source.stem} to {dest}")
    return 0


__all__ = ["KINDS", "cli", "config_file", "find_shipped", "recipe_path", "shipped_recipes"]
