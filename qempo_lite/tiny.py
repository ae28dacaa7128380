"""Tiny, fully local Llama-shaped models: a BPE tokenizer trained on the spot plus a config.

Used by the offline demo (``qempo-lite demo``) and by the test-suite, so that neither ever
downloads anything. The chat template is a small ChatML-like one; head_dim is 32 because
vLLM refuses smaller heads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
SPECIAL_TOKENS = ["<|pad|>", "<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]

DEFAULT_CORPUS = (
    "The quick brown fox jumps over the lazy dog.",
    "Name a colour. Red. Blue. Green. Yellow. Purple. Orange.",
    "What is two plus three? The answer is 5.",
    "Write a short poem about the sea and the sky.",
    "I like apples, bananas, cherries and strawberries.",
    "Please answer the question in one word.",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 11 12 100 1000.",
    "Human: Hello! Assistant: Hi, how can I help you today?",
)


def train_tokenizer(corpus: Iterable[str] = DEFAULT_CORPUS, vocab_size: int = 512):
    """Train a byte-level BPE tokenizer on ``corpus`` and wrap it for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|end|>",
        bos_token=None,
        unk_token=None,
    )
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def tiny_llama_config(vocab_size: int, *, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2,
                      intermediate_size: int | None = None, max_position_embeddings: int = 512, tokenizer=None):
    """A LlamaConfig with head_dim = hidden_size / num_heads (keep it >= 32 for vLLM)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        pad_token_id=None if tokenizer is None else tokenizer.pad_token_id,
        eos_token_id=None if tokenizer is None else tokenizer.eos_token_id,
        bos_token_id=None,
    )


def build_tiny_model(path: str | Path, corpus: Iterable[str] = DEFAULT_CORPUS, *, vocab_size: int = 512,
                     hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, seed: int = 0) -> Path:
    """Build a randomly initialised tiny Llama + tokenizer and save both (safetensors) to ``path``."""
    import torch
    from transformers import GenerationConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(corpus, vocab_size=vocab_size)
    config = tiny_llama_config(len(tokenizer), hidden_size=hidden_size, num_layers=num_layers,
                               num_heads=num_heads, tokenizer=tokenizer)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return path
