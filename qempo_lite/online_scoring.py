"""Scoring one generation batch for the online objectives: the per-completion weights of Eq. 8/9, and their metrics.

Where GRPO turns rewards into advantages, :func:`score_batch` computes the weights
``w = ∂J/∂ℓ`` of :func:`qempo_lite.losses.online_weights` once per group, from the rewards, the
summed log-probs ℓ of the completions under the policy at rollout time and (methods that read
it) the reference log-probs ℓ_ref; the trainer then minimises ``-(w · ℓ).sum()``. The weights
are computed on the whole gathered batch (every process's rows, in float64: they are
differences of log-probs in the hundreds scaled by β ~ 1e-3), and each process keeps its slice,
so a group may be split across processes and micro-batches.
"""

from __future__ import annotations

import torch

from .losses import online_objective, online_weights


def score_batch(trainer, output: dict, rewards_per_func: torch.Tensor, local_logps: torch.Tensor,
                ref_logps: torch.Tensor | None, k: int) -> torch.Tensor:
    """This process's weights for ``output``'s rows; ``trainer.last_scored`` gets the batch's scoring.

    ``rewards_per_func``: every process's rewards (one column per reward function, NaN where a
    function could not score), as GRPO gathers them; ``local_logps``/``ref_logps``: this
    process's summed policy / reference log-probs (None: the method needs none).
    """
    args, accelerator = trainer.args, trainer.accelerator
    rewards = (rewards_per_func * trainer.reward_weights.to(rewards_per_func.device).unsqueeze(0)).nansum(dim=1)
    unscorable = torch.isnan(rewards_per_func).all(dim=1)
    correct = (rewards > args.correct_threshold) & ~unscorable
    logps = accelerator.gather(local_logps.float()).double()
    if ref_logps is not None:
        ref_logps = accelerator.gather(ref_logps.float()).double()
    settings = dict(ref_logps=ref_logps, correct=correct, gate=args.gate, advantage=args.advantage,
                    **trainer.method_settings.coefficients)
    weights = online_weights(args.loss_method, logps, rewards.double(), k, **settings)
    objective = online_objective(args.loss_method, logps, rewards.double(), k, **settings)
    trainer.last_scored = {
        "rewards": rewards.cpu(), "logps": logps.float().cpu(), "correct": correct.cpu(), "weights": weights.cpu(),
        "ref_logps": None if ref_logps is None else ref_logps.float().cpu(), "objective": objective.cpu(),
    }
    _log(trainer, output, k, correct, local_logps, objective)
    n_local = output["completion_ids"].size(0)
    start = accelerator.process_index * n_local
    return weights[start:start + n_local].to(torch.float32)


def _log(trainer, output, k, correct, local_logps, objective) -> None:
    """Fraction correct, fraction of groups whose variance term is active, J, distinct completions per group,
    and how far the engine's log-probs are from the trainer's."""
    from accelerate.utils import gather_object

    metrics = trainer._metrics["train" if trainer.model.training else "eval"]
    groups = correct.view(-1, k)
    if trainer.args.gate == "none":
        active = torch.ones(groups.size(0), dtype=torch.bool)
    elif trainer.args.gate == "group":
        active = groups.all(dim=1)
    else:  # a variance over fewer than two correct completions is zero
        active = groups.sum(dim=1) >= 2
    metrics["qempo/frac_correct"].append(correct.float().mean().item())
    metrics["qempo/frac_variance_active"].append(active.float().mean().item())
    metrics["qempo/objective"].append(objective.item())
    completions = [tuple(ids[mask.bool()].tolist())
                   for ids, mask in zip(output["completion_ids"].cpu(), output["completion_mask"].cpu())]
    completions = gather_object(completions)
    distinct = [len(set(completions[i:i + k])) / k for i in range(0, len(completions), k)]
    metrics["qempo/distinct_ratio"].append(sum(distinct) / max(len(distinct), 1))
    sampled = output.get("sampling_per_token_logps")
    # The engines report temperature-1 log-probs; TRL's ℓ is that of logits / temperature. Every process
    # takes the same branch (settings only) and always joins the reduction, whatever its rows hold.
    if sampled is not None and trainer.temperature == 1.0:
        gap = ((sampled * output["completion_mask"]).sum(dim=1) - local_logps).abs()
        finite = ~torch.isnan(gap)
        totals = trainer.accelerator.reduce(
            torch.stack([gap[finite].sum(), finite.sum().to(gap.dtype)]).float(), reduction="sum")
        if totals[1] > 0:
            metrics["rollout/logp_abs_diff"].append((totals[0] / totals[1]).item())


__all__ = ["score_batch"]
