"""The ``qempo-lite`` command: a thin dispatcher to each module's ``cli(argv)``.

Sub-commands import their module lazily so that ``qempo-lite --help`` is instant and a
missing optional extra only matters for the command that needs it.
"""

from __future__ import annotations

import importlib
import sys
import warnings

from .errors import QempoError

COMMANDS = {
    ("demo",): ("qempo_lite.demo", "offline CPU demo: QEMPO vs DPO on a task with many valid answers"),
    ("train", "offline"): ("qempo_lite.offline", "train an adapter on preference pairs (qempo, qempo_kl, dpo, spl)"),
    ("train", "online"): ("qempo_lite.online", "train an adapter online with verifiable rewards (qempo, qempo_kl, gvpo)"),
    ("eval",): ("qempo_lite.evaluate.cli", "sample, diversity, judge, passk, report; table2: all in one"),
    ("push",): ("qempo_lite.hub", "push an adapter with its model card to the Hugging Face Hub"),
    ("app",): ("qempo_lite.app_launcher", "open the Gradio app comparing adapters side by side"),
}


def _usage() -> str:
    lines = ["usage: qempo-lite COMMAND [ARGS...]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {help_text}")
    lines.append("")
    lines.append("Run 'qempo-lite COMMAND --help' for the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] == "--version":
        from . import __version__

        print(f"qempo-lite {__version__}")
        return 0
    for words, (module_name, _) in sorted(COMMANDS.items(), key=lambda item: -len(item[0])):
        if tuple(argv[: len(words)]) == words:
            rest = argv[len(words):]
            break
    else:
        print(f"error: unknown command {' '.join(argv[:2])!r}; see 'qempo-lite --help'", file=sys.stderr)
        return 2
    # TRL warns on import about vLLM releases newer than it has seen; the rollout code pins its own range.
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    try:
        module = importlib.import_module(module_name)
        return int(module.cli(rest) or 0)
    except QempoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
