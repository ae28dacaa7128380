"""Load a base model + tokenizer for LoRA / QLoRA training, and estimate the GPU memory it needs.

``load_policy`` returns the *base* model together with a ``LoraConfig`` rather than a
``PeftModel``: handed to ``QEMPOTrainer(..., peft_config=...)`` (or TRL's ``DPOTrainer``),
TRL wraps the model itself, and with a fresh adapter the reference policy is simply the base
model with the adapter disabled. A ``PeftModel`` passed in instead makes TRL copy the adapter
into a second, frozen "ref" adapter, which is memory and work for nothing here.

QLoRA follows Dettmers et al.: 4-bit NF4 weights with double quantisation, computed in bf16 on
GPU (fp32 on CPU, where bitsandbytes' 4-bit kernels also run), then
``peft.prepare_model_for_kbit_training``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from .errors import QempoError, one_line

QUANTIZATIONS = (None, "4bit", "8bit")
DTYPES = ("auto", "bfloat16", "float16", "float32")

# The four models of the paper's offline experiments, written out so that benchmarks and memory
# estimates need no download. Values are those of the models' published config.json files; what a
# family shares is written once.
def _qwen2(vocab: int, hidden: int, inter: int, layers: int, heads: int, kv_heads: int, *, tied: bool):
    return ("qwen2", dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=32768,
                          rms_norm_eps=1e-6, tie_word_embeddings=tied,
                          rope_parameters={"rope_type": "default", "rope_theta": 1000000.0}))


def _llama3(hidden: int, inter: int, layers: int, heads: int, head_dim: int, *, tied: bool, rope_factor: float):
    return ("llama", dict(vocab_size=128256, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                          num_attention_heads=heads, num_key_value_heads=8, head_dim=head_dim,
                          max_position_embeddings=131072, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                          rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "low_freq_factor": 1.0,
                                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192,
                                           "factor": rope_factor}))


PAPER_MODELS: dict[str, tuple[str, dict[str, Any]]] = {
    "Qwen/Qwen2.5-1.5B-Instruct": _qwen2(151936, 1536, 8960, 28, 12, 2, tied=True),
    "meta-llama/Llama-3.2-1B-Instruct": _llama3(2048, 8192, 16, 32, 64, tied=True, rope_factor=32.0),
    "Qwen/Qwen2.5-7B-Instruct": _qwen2(152064, 3584, 18944, 28, 28, 4, tied=False),
    "meta-llama/Llama-3.1-8B-Instruct": _llama3(4096, 14336, 32, 32, 128, tied=False, rope_factor=8.0),
}


class LoadedPolicy(NamedTuple):
    """What :func:`load_policy` returns: pass all three to the trainer."""

    model: Any
    tokenizer: Any
    peft_config: Any


def paper_model_config(name: str):
    """The transformers config of one of the paper's models (``PAPER_MODELS``), built offline."""
    from transformers import AutoConfig

    key = _paper_model_key(name)
    if key is None:
        raise QempoError(f"unknown paper model {name!r}; choose one of {', '.join(PAPER_MODELS)}")
    model_type, kwargs = PAPER_MODELS[key]
    return AutoConfig.for_model(model_type, **kwargs)


def _paper_model_key(name: str) -> str | None:
    short = name.rstrip("/").split("/")[-1].lower()
    for key in PAPER_MODELS:
        if key.split("/")[-1].lower() == short:
            return key
    return None


def normalise_quantization(quantization):
    """``None``, ``"4bit"`` or ``"8bit"`` (``"none"`` reads as None); QempoError otherwise."""
    if isinstance(quantization, str) and quantization.lower() in ("none", "null", "", "no"):
        return None
    if quantization not in QUANTIZATIONS:
        raise QempoError(f"quantization must be 4bit, 8bit or none, got {quantization!r}")
    return quantization


def check_dtype(dtype) -> None:
    """QempoError unless ``dtype`` is None or one of ``DTYPES``."""
    if dtype is not None and not isinstance(dtype, str):
        return
    if dtype is not None and dtype not in DTYPES:
        raise QempoError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")


def _torch_dtype(dtype, on_gpu: bool):
    import torch

    if dtype is None:
        if not on_gpu:
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if isinstance(dtype, torch.dtype):
        return dtype
    check_dtype(dtype)
    if dtype == "auto":
        return "auto"
    return getattr(torch, dtype)


def quantization_config(quantization: str | None, *, on_gpu: bool | None = None):
    """``BitsAndBytesConfig`` for ``"4bit"`` (NF4, double quantisation) or ``"8bit"``; ``None`` for no quantisation."""
    quantization = normalise_quantization(quantization)
    if quantization is None:
        return None
    import torch

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as err:
        raise QempoError(f"quantization={quantization} needs bitsandbytes: pip install bitsandbytes ({err})") from err
    from transformers import BitsAndBytesConfig

    if on_gpu is None:
        on_gpu = torch.cuda.is_available()
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    # bf16 is the QLoRA paper's compute dtype; bitsandbytes' CPU path computes in fp32.
    compute_dtype = torch.bfloat16 if on_gpu and torch.cuda.is_bf16_supported() else (
        torch.float16 if on_gpu else torch.float32)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=compute_dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_tokenizer(name_or_path: str, *, trust_remote_code: bool = False, require_chat_template: bool = True):
    """The model's tokenizer, with a pad token (eos when it has none) and, by default, a chat template."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise QempoError(
            f"cannot load the tokenizer of {name_or_path!r} ({one_line(err)}); "
            "pass a local model directory or a Hub model id you have access to"
        ) from err
    if require_chat_template and not getattr(tokenizer, "chat_template", None):
        raise QempoError(
            f"the tokenizer of {name_or_path!r} has no chat template; use an Instruct/chat model, "
            "or set tokenizer.chat_template to a Jinja template before training"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise QempoError(f"the tokenizer of {name_or_path!r} has neither a pad nor an eos token; "
                             "set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def lora_config(*, lora_r: int = 16, lora_alpha: int = 32, lora_dropout: float = 0.0,
                target_modules: str | list[str] = "all-linear"):
    """The ``LoraConfig`` of a causal-LM adapter. ``"all-linear"`` adapts every linear layer but the LM head."""
    from peft import LoraConfig

    if not (isinstance(lora_r, int) and lora_r > 0):
        raise QempoError(f"lora_r must be a positive integer, got {lora_r!r}")
    if not lora_alpha > 0:
        raise QempoError(f"lora_alpha must be positive, got {lora_alpha!r}")
    if not 0.0 <= lora_dropout < 1.0:
        raise QempoError(f"lora_dropout must be in [0, 1), got {lora_dropout!r}")
    if isinstance(target_modules, str) and target_modules != "all-linear":
        target_modules = [name.strip() for name in target_modules.split(",") if name.strip()]
    if isinstance(target_modules, list) and "lm_head" in target_modules:
        # TRL's fused LM head reads lm_head.weight directly, so an adapter there would never train.
        raise QempoError("target_modules must not include lm_head; remove it (the LM head cannot carry an adapter)")
    return LoraConfig(r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
                      bias="none", task_type="CAUSAL_LM")


def check_model_source(name_or_path: str) -> None:
    """Fail fast, in one line, on a local model directory that cannot load: no config or no safetensors weights.

    A name that is not a local path is taken for a Hub id and checked when it is loaded.
    """
    path = Path(name_or_path)
    if not path.exists():
        if name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1:
            raise QempoError(f"model directory {name_or_path} does not exist; pass a local model directory or a Hub id")
        return
    if not path.is_dir():
        raise QempoError(f"model_name_or_path {name_or_path} is a file; pass the model's directory")
    if not (path / "config.json").is_file():
        raise QempoError(f"{name_or_path} has no config.json; pass a transformers model directory")
    if not any(path.glob("*.safetensors")):
        raise QempoError(f"{name_or_path} has no .safetensors weights (qempo-lite loads no pickled weights); "
                         "convert it with save_pretrained(..., safe_serialization=True)")


def load_policy(
    name_or_path: str,
    *,
    quantization: str | None = None,
    lora_r: int = 16,
    lora_alpha: int = 32,
    lora_dropout: float = 0.0,
    target_modules: str | list[str] = "all-linear",
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
    dtype: str | None = None,
    trust_remote_code: bool = False,
) -> LoadedPolicy:
    """Load ``(model, tokenizer, peft_config)`` ready for ``QEMPOTrainer(model, ..., peft_config=peft_config)``.

    * ``quantization=None``: the model in ``dtype`` (default bf16 on GPU, fp32 on CPU); LoRA on top.
    * ``"4bit"`` (QLoRA): NF4 + double quantisation, bf16 compute on GPU / fp32 on CPU, then
      ``prepare_model_for_kbit_training`` (frozen base, norms and embeddings in fp32).
    * ``"8bit"``: LLM.int8 weights, same preparation.

    Weights load from safetensors only, and remote code runs only with ``trust_remote_code=True``.
    The tokenizer must have a chat template; a missing pad token is set to eos.
    """
    import torch
    from transformers import AutoModelForCausalLM

    quantization = normalise_quantization(quantization)
    if quantization is not None:
        from .distributed import sharded_launch

        if (sharding := sharded_launch()) is not None:
            # Each process quantises the whole base onto its own GPU (uint8 storage, device_map): there is
            # nothing for the sharding to split, and it cannot shard 4-bit blocks stored as uint8.
            raise QempoError(f"quantization={quantization} (QLoRA) runs with one whole quantised base per GPU, which "
                             f"{sharding} cannot shard; launch with the ddp or deepspeed_zero2 accelerate config "
                             "('qempo-lite recipes path ddp'), or set quantization: none to shard a bf16 base")
    peft_config = lora_config(lora_r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout,
                              target_modules=target_modules)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code)
    on_gpu = torch.cuda.is_available()
    kwargs: dict[str, Any] = {"dtype": _torch_dtype(dtype, on_gpu), "trust_remote_code": trust_remote_code,
                              "use_safetensors": True}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if quantization is not None:
        kwargs["quantization_config"] = quantization_config(quantization, on_gpu=on_gpu)
        if on_gpu:
            # bitsandbytes quantises while loading onto the device; one process per GPU under accelerate.
            from accelerate import PartialState

            kwargs["device_map"] = {"": PartialState().local_process_index}
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
    except (OSError, ValueError) as err:
        raise QempoError(
            f"cannot load model {name_or_path!r} ({one_line(err)}); pass a local directory or Hub id of a "
            "causal LM with safetensors weights"
        ) from err
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    gc_kwargs = {"use_reentrant": False}
    if quantization is not None:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.config.use_cache = False
    return LoadedPolicy(model, tokenizer, peft_config)


# ----------------------------------------------------------------------------------------------
# Memory plan


@dataclass(frozen=True)
class MemoryPlan:
    """Estimated peak GPU memory of one LoRA/QLoRA preference-training process, in GiB."""

    weights: float
    lora: float
    optimizer: float
    activations: float
    overhead: float

    @property
    def total(self) -> float:
        return self.weights + self.lora + self.optimizer + self.activations + self.overhead

    def summary(self) -> str:
        return (f"~{self.total:.1f} GiB (weights {self.weights:.1f} + LoRA {self.lora:.2f} + optimizer "
                f"{self.optimizer:.2f} + activations {self.activations:.1f} + overhead {self.overhead:.1f})")


def _shape(config) -> dict[str, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    hidden = text.hidden_size
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or hidden // heads
    return dict(
        vocab=text.vocab_size, hidden=hidden, inter=text.intermediate_size, layers=text.num_hidden_layers,
        q=heads * head_dim, kv=(getattr(text, "num_key_value_heads", None) or heads) * head_dim,
        tied=int(bool(getattr(text, "tie_word_embeddings", False))),
    )


def memory_plan(config_or_name, quantization: str | None = None, lora_r: int = 16, seq_len: int = 1024,
                batch: int = 1, *, gradient_checkpointing: bool = True) -> MemoryPlan:
    """Estimate the peak GPU memory of preference training with a LoRA adapter on all linear layers.

    ``batch`` is the per-device number of *pairs*; chosen and rejected go through the model
    together, so ``T = 2 · batch · seq_len`` tokens per micro-batch. With ``L`` layers, hidden
    size ``h``, MLP size ``i``, q / kv widths ``q`` / ``kv``:

    * weights: linear layers at 2 bytes/param (bf16), 0.52 (NF4 + double quantisation: 4 bits +
      one 8-bit scale per 64 weights + the second-level scales) or 1.0 (int8); with quantisation
      ``prepare_model_for_kbit_training`` keeps embeddings, LM head and norms in fp32 (4 bytes);
    * LoRA: ``r · Σ(in + out)`` over the 7 linear layers of each block, fp32 (4 bytes);
    * optimizer: AdamW on the LoRA parameters, gradient + two moments in fp32 (12 bytes/param);
    * activations (bf16): with gradient checkpointing, ``L · T · h`` saved layer inputs plus one
      block's working set ``T · (8h + 2kv + 4i)`` during its recomputation; without it, that
      working set for every block; plus TRL's chunked LM head (one fp32 tile of 4096 tokens x 32768 vocabulary entries);
    * overhead: 1 GiB (CUDA context, allocator fragmentation) + 10 % of the rest.

    An estimate for sizing recipes, not a measurement: see ``benchmarks/offline_step.py --cuda``.
    """
    quantization = normalise_quantization(quantization)
    if isinstance(config_or_name, str):
        if _paper_model_key(config_or_name) is not None:
            config = paper_model_config(config_or_name)
        else:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(config_or_name)
    else:
        config = config_or_name
    s = _shape(config)
    h, i, L, V = s["hidden"], s["inter"], s["layers"], s["vocab"]
    linear_shapes = [(h, s["q"]), (h, s["kv"]), (h, s["kv"]), (s["q"], h), (h, i), (h, i), (i, h)]
    linear_params = L * sum(a * b for a, b in linear_shapes)
    embed_params = V * h * (1 if s["tied"] else 2)
    other_params = L * 2 * h + h
    gib = 1024 ** 3
    if quantization is None:
        weights = 2.0 * (linear_params + embed_params + other_params)
    else:
        per_param = 0.52 if quantization == "4bit" else 1.0
        weights = per_param * linear_params + 4.0 * (embed_params + other_params)
    lora_params = L * lora_r * sum(a + b for a, b in linear_shapes)
    tokens = 2 * batch * seq_len
    block = tokens * (8 * h + 2 * s["kv"] + 4 * i) * 2.0
    activations = (L * tokens * h * 2.0 + block) if gradient_checkpointing else L * block
    activations += min(tokens, 4096) * min(V, 32768) * 4.0
    base = (weights + 4.0 * lora_params + 12.0 * lora_params + activations) / gib
    return MemoryPlan(
        weights=weights / gib,
        lora=4.0 * lora_params / gib,
        optimizer=12.0 * lora_params / gib,
        activations=activations / gib,
        overhead=1.0 + 0.1 * base,
    )


def count_parameters(config) -> int:
    """Approximate parameter count of a dense decoder from its config (for reports)."""
    s = _shape(config)
    h, i, L = s["hidden"], s["inter"], s["layers"]
    per_layer = 2 * h * s["q"] + 2 * h * s["kv"] + 3 * h * i + 2 * h
    return int(L * per_layer + s["vocab"] * h * (1 if s["tied"] else 2) + h)


__all__ = ["LoadedPolicy", "MemoryPlan", "PAPER_MODELS", "check_dtype", "check_model_source", "count_parameters", "load_policy",
           "load_tokenizer", "lora_config", "memory_plan", "normalise_quantization", "paper_model_config",
           "quantization_config"]
