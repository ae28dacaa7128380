"""The private members of TRL's ``GRPOTrainer`` (and the transformers ``Trainer`` under it) that
:class:`~qempo_lite.online.QEMPOOnlineTrainer` overrides or calls, in one place, with the parameters it
relies on; ``tests/test_online.py`` checks them against the installed TRL, so a TRL upgrade that
changes one fails loudly there (:func:`signature_changes`) rather than quietly in a run.
"""

from __future__ import annotations

import inspect

# name -> (how the online trainer uses it, its parameters: all of them for an override, which TRL calls
# with exactly these; the leading ones for a member the trainer calls)
GRPO_PRIVATE_MEMBERS: dict[str, tuple[str, tuple[str, ...]]] = {
    "_generate_single_turn": ("overridden", ("self", "prompt_ids", "images", "multimodal_fields", "num_generations",
                                             "has_tool_images")),
    "_generate_and_score_completions": ("overridden", ("self", "inputs")),
    "_calculate_rewards": ("overridden", ("self", "inputs", "prompts", "completions", "completion_ids_list")),
    "_compute_loss": ("overridden", ("self", "model", "inputs")),
    "_get_per_token_logps_and_entropies": ("called", ("self", "model", "input_ids", "attention_mask",
                                                      "logits_to_keep", "batch_size", "compute_entropy")),
    "_save_checkpoint": ("called", ("self", "model", "trial")),
    "_get_output_dir": ("called", ("self", "trial")),
}
# Attributes GRPOTrainer.__init__ sets that the online trainer reads or writes.
GRPO_PRIVATE_ATTRIBUTES = ("_metrics", "_tokenizer")


def signature_changes(trainer_class) -> list[str]:
    """What no longer fits in ``trainer_class`` (TRL's ``GRPOTrainer``): one line per changed or missing member."""
    problems = []
    for name, (use, params) in GRPO_PRIVATE_MEMBERS.items():
        member = getattr(trainer_class, name, None)
        if member is None:
            problems.append(f"{trainer_class.__name__}.{name} ({use}) no longer exists")
            continue
        found = tuple(inspect.signature(member).parameters)
        if (found if use == "overridden" else found[:len(params)]) != params:
            problems.append(f"{trainer_class.__name__}.{name} ({use}) takes ({', '.join(found)}), not "
                            f"({', '.join(params)}{'' if use == 'overridden' else ', ...'})")
    init = inspect.getsource(trainer_class.__init__)
    problems += [f"{trainer_class.__name__}.__init__ no longer sets self.{name}" for name in GRPO_PRIVATE_ATTRIBUTES
                 if f"self.{name} =" not in init]
    return problems
