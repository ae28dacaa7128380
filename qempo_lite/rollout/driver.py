"""How an online trainer drives its rollout engine: sync the adapter once per step, sample, spread the samples.

:class:`RolloutDriver` is the one generation object :class:`~qempo_lite.online.QEMPOOnlineTrainer`
calls (as TRL's trainer calls its vLLM client: ``generate``, with the sync inside): given a
micro-batch of prompt ids laid out as GRPO's sampler lays them (each prompt ``k`` times in a
row), it returns one completion and its sampled log-probs per row. Two flags of the engine
(:class:`~qempo_lite.rollout.Engine`) choose how:

* each process samples its own rows (``hf``, ``vllm``), syncing its engine first; under ZeRO-3
  an engine that ``samples_live_weights`` samples inside TRL's gathered-weights context;
* ``serves_all_processes`` (``vllm_server``): the main process samples every process's prompts,
  whole groups, one seed per call (a function of the run's seed, the step and the call, so a
  resumed or differently-sharded run draws the same), and each process keeps its slice. A
  rollout that fails (the server down past its retries) stops every process after a checkpoint
  of the last completed optimizer step, with one line saying how to resume.

The adapter alone is synced, after each optimizer step, gathered first when ZeRO-3 / FSDP shard it.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import QempoError, one_line
from .engine import Engine, make_engine


def unique_prompts(prompt_ids: list[list[int]], k: int) -> tuple[list[list[int]], int]:
    """``(prompts, n)``: GRPO's sampler repeats each prompt k times in a row, so sample k from each unique one.

    A batch holding part of a group (a group split across processes) is sampled one completion per row.
    """
    grouped = len(prompt_ids) % k == 0 and all(prompt_ids[i] == prompt_ids[i - i % k] for i in range(len(prompt_ids)))
    return (prompt_ids[::k], k) if grouped else (prompt_ids, 1)


class RolloutDriver:
    """Drives ``engine`` for ``trainer`` (a GRPOTrainer: its accelerator, state, args and metrics)."""

    def __init__(self, trainer, engine: Engine | None = None):
        """``engine``: one already made (the trainer checked it is an Engine), else one built from
        ``trainer.args.rollout`` and probed."""
        self.trainer = trainer
        self.owns_engine = engine is None
        self.synced_step = None
        self._sharded = None  # ZeRO-3 / FSDP: known once training has wrapped the model
        self._seed_step, self._seed_calls = None, 0
        if engine is None:
            accelerator = trainer.accelerator
            engine = make_engine(trainer.args.rollout, accelerator.unwrap_model(trainer.model), trainer._tokenizer,
                                 trainer.args, num_processes=accelerator.num_processes)
            if engine.serves_all_processes:
                self.on_main_then_everywhere(engine.probe)
            else:
                engine.probe()
        self.engine = engine

    def close(self) -> None:
        """Shut the engine down if this driver created it."""
        if self.owns_engine and self.engine is not None:
            self.engine.close()
        self.engine = None

    def on_main_then_everywhere(self, work):
        """Run ``work()`` on the main process; every process returns its result or raises its QempoError.

        A failure on the main process alone would leave the others waiting in the next collective.
        """
        from accelerate.utils import broadcast_object_list

        accelerator = self.trainer.accelerator
        outcome = [None]
        if accelerator.is_main_process:
            try:
                outcome = [work()]
            except Exception as err:  # handed to every process, so that none is left waiting
                if not isinstance(err, QempoError) and accelerator.num_processes == 1:
                    raise
                if not isinstance(err, QempoError):
                    err = QempoError(f"{type(err).__name__}: {one_line(err)}")
                outcome = [err]
        if accelerator.num_processes > 1:
            outcome = broadcast_object_list(outcome, from_process=0)
        if isinstance(outcome[0], QempoError):
            raise outcome[0]
        return outcome[0]

    # ------------------------------------------------------------------ sync
    def _adapter_for_sync(self):
        """The adapter's LoRA tensors gathered whole when a sync is due and the model is sharded (ZeRO-3 / FSDP).

        A collective: every process calls it at the same point. None when nothing needs gathering.
        """
        from ..distributed import gathered_adapter_state, is_sharded

        if self.synced_step == self.trainer.state.global_step or self.engine.samples_live_weights:
            return None
        if self._sharded is None:
            self._sharded = is_sharded(self.trainer.model_wrapped)
        return gathered_adapter_state(self.trainer.model_wrapped) if self._sharded else None

    def _sync(self, state_dict=None) -> None:
        """Once per optimizer step, before the step's first rollout: the adapter only."""
        trainer = self.trainer
        if self.synced_step == trainer.state.global_step:
            return
        info = self.engine.sync(trainer.accelerator.unwrap_model(trainer.model), state_dict=state_dict)
        self.synced_step = trainer.state.global_step
        if info.nbytes:
            metrics = trainer._metrics["train" if trainer.model.training else "eval"]
            metrics["rollout/sync_seconds"].append(info.seconds)
            metrics["rollout/sync_megabytes"].append(info.nbytes / 2**20)

    def _seed(self) -> int:
        """A seed for one rollout call: a function of ``seed``, the step and the call's rank within the step."""
        step = self.trainer.state.global_step
        if self._seed_step != step:
            self._seed_step, self._seed_calls = step, 0
        self._seed_calls += 1
        return (((self.trainer.args.seed * 1_000_003 + step) * 64 + self._seed_calls) << 20) % (1 << 62)

    # ------------------------------------------------------------------ generate
    def generate(self, prompt_ids: list[list[int]], k: int) -> tuple[list[list[int]], list[list[float]]]:
        """One completion per row of ``prompt_ids`` (groups of ``k`` identical rows): token ids and sampled log-probs."""
        prompt_ids = [list(ids) for ids in prompt_ids]
        if self.engine.serves_all_processes:
            return self._generate_for_all_processes(prompt_ids, k)
        self._sync(self._adapter_for_sync())
        groups = self._sample(*unique_prompts(prompt_ids, k))
        completions = [c for group in groups for c in group]
        return [c.token_ids for c in completions], [c.logprobs for c in completions]

    def _sample(self, prompts, n, seed=None):
        trainer = self.trainer
        kwargs = dict(n=n, temperature=trainer.temperature, top_p=trainer.top_p,
                      max_new_tokens=trainer.max_completion_length, **({} if seed is None else {"seed": seed}))
        if not self.engine.samples_live_weights:
            return self.engine.sample(prompts, **kwargs)
        from trl.models import unwrap_model_for_generation

        with unwrap_model_for_generation(  # ZeRO-3: the weights gathered for generation
            trainer.model_wrapped, trainer.accelerator, gather_deepspeed3_params=trainer.args.ds3_gather_for_generation,
            gradient_checkpointing_kwargs=trainer.args.gradient_checkpointing_kwargs,
        ):
            return self.engine.sample(prompts, **kwargs)

    def _generate_for_all_processes(self, prompt_ids: list[list[int]], k: int):
        """The main process samples every process's prompts, whole groups, one seed per call; each keeps its slice."""
        from accelerate.utils import gather_object

        accelerator = self.trainer.accelerator
        everyone = gather_object(prompt_ids) if accelerator.num_processes > 1 else prompt_ids
        prompts, n = unique_prompts(everyone, k)
        state = self._adapter_for_sync()  # collective under ZeRO-3 / FSDP, before the main process syncs

        def sample():
            self._sync(state)
            groups = self._sample(prompts, n, seed=self._seed())
            return [(c.token_ids, c.logprobs) for group in groups for c in group]

        try:
            sampled = self.on_main_then_everywhere(sample)
        except QempoError as err:
            self._stop_after_failure(err)
        self.synced_step = self.trainer.state.global_step  # the other processes follow the main one's sync
        start = accelerator.process_index * len(prompt_ids)
        mine = sampled[start:start + len(prompt_ids)]
        return [ids for ids, _ in mine], [logprobs for _, logprobs in mine]

    def _stop_after_failure(self, err: QempoError):
        """Checkpoint the last completed optimizer step (every process takes part), then raise the one-line error."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        from .server import RolloutServerError

        trainer = self.trainer
        step = trainer.state.global_step
        if step > 0 and trainer.model.training:
            trainer._save_checkpoint(trainer.model, trial=None)
            where = Path(trainer._get_output_dir(trial=None)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
            hint = f"the training state after step {step} is saved in {where}; fix the server and run again with --resume"
        else:
            hint = "no training step was completed yet"
        raise (RolloutServerError if isinstance(err, RolloutServerError) else QempoError)(f"{err}; {hint}") from None


__all__ = ["RolloutDriver", "unique_prompts"]
