"""What engines serving a base model by name share: its config, context length and parameter shapes (read without
its weights), and a completion's length without its end-of-sequence token."""

from __future__ import annotations

import logging
from typing import Sequence

from .common import Completion

logger = logging.getLogger("qempo_lite")


def completion_length(completion: Completion, eos_token_ids: Sequence[int]) -> int:
    """The completion's tokens without the end-of-sequence token that ended it."""
    tokens = completion.token_ids
    return len(tokens) - 1 if tokens and tokens[-1] in eos_token_ids else len(tokens)


# ------------------------------------------------------------------------------ the base model's shapes


def model_config(base_model: str):
    """``base_model``'s transformers config, None when transformers cannot read it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(base_model, trust_remote_code=False)
    except Exception:  # noqa: BLE001 - the engine reads the config itself and reports what is wrong
        return None


def context_length(config) -> int | None:
    """The most positions a model of ``config`` takes (a multimodal config's text part)."""
    config = getattr(config, "text_config", None) or config
    value = getattr(config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def meta_parameter_shapes(base_model: str) -> tuple[dict[str, tuple[int, ...]], int | None]:
    """Parameter shapes of ``base_model`` built on the meta device (no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(base_model, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except Exception as err:  # noqa: BLE001 - an architecture transformers cannot build: skip the shape check
        logger.warning("cannot build %s on the meta device (%s); adapter shapes are not checked", base_model,
                       type(err).__name__)
        return {}, None
    return {k: tuple(v.shape) for k, v in model.named_parameters()}, getattr(config, "vocab_size", None)
