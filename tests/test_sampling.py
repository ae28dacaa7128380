"""Evaluation sampling: one base model serving several real LoRA adapters (transformers and vLLM).

The adapters are real: LoRA on every linear layer of the tiny Llama with non-zero B matrices,
saved with ``save_pretrained``. Greedy decoding (temperature 0) makes outputs comparable with
an independent reference: each adapter loaded alone in its own PEFT model. The vLLM tests
share one in-process engine (its start is the slow part).
"""

import itertools
import json
import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

from conftest import make_adapter
import torch

from qempo_lite.errors import QempoError
from qempo_lite.evaluate.sampling import (
    Sample,
    Sampler,
    check_adapter,
    load_samples,
    meta_parameter_shapes,
    sample,
    save_samples,
)

CHAT = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "What is two plus three?"}]
PROMPTS = ["Name a colour.", CHAT]




@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"a": str(make_adapter(tiny_model_dir, root / "a", seed=1)),
            "b": str(make_adapter(tiny_model_dir, root / "b", seed=2)),
            "base": None}


@pytest.fixture(scope="module")
def other_adapter(tmp_path_factory):
    """An adapter of a different tiny model: hidden size 96, vocabulary 400."""
    from qempo_lite.tiny import build_tiny_model

    other = build_tiny_model(tmp_path_factory.mktemp("other-llama"), hidden_size=96, num_heads=3, vocab_size=400)
    return make_adapter(other, tmp_path_factory.mktemp("other-adapter") / "o", seed=3)


@pytest.fixture(scope="module")
def hf_sampler(tiny_model_dir):
    sampler = Sampler(tiny_model_dir, backend="hf", dtype="float32")
    yield sampler
    sampler.close()


@torch.no_grad()
def _reference_greedy(tiny_model_dir, adapter_dir, prompts, max_new_tokens):
    """Greedy texts from a fresh model holding only this adapter (or none), one prompt at a time."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    texts = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)["input_ids"]
        out = model.eval().generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                    max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                    pad_token_id=tokenizer.pad_token_id)
        new = out[0, ids.shape[1]:].tolist()
        if tokenizer.eos_token_id in new:
            new = new[: new.index(tokenizer.eos_token_id)]
        texts.append(tokenizer.decode(new, skip_special_tokens=True))
    return texts


def _texts(samples):
    # vLLM holds back an incomplete UTF-8 character at the end of a text; transformers shows U+FFFD.
    return {(s.adapter, s.prompt_id, s.sample_index): s.text.rstrip("\ufffd") for s in samples}


# ---------------------------------------------------------------------------------- transformers


def test_hf_sampler_serves_each_adapter_like_a_model_holding_only_it(hf_sampler, adapters, tiny_model_dir):
    samples = hf_sampler.sample(adapters, PROMPTS, n=2, temperature=0, max_new_tokens=8, progress=False)
    texts = _texts(samples)
    assert len(samples) == 3 * 2 * 2
    for name, path in adapters.items():
        for p, expected in enumerate(_reference_greedy(tiny_model_dir, path, PROMPTS, 8)):
            assert texts[(name, p, 0)] == texts[(name, p, 1)] == expected.rstrip("\ufffd"), (name, p)
    # The adapters really change the model: three different greedy answers to the same prompt.
    assert len({texts[(name, 0, 0)] for name in adapters}) == 3


def test_hf_sample_counts_ids_prompts_and_seeds(hf_sampler, adapters):
    kwargs = dict(n=3, temperature=1.0, top_p=0.95, max_new_tokens=6, seed=7, progress=False)
    samples = hf_sampler.sample(adapters, PROMPTS, prompt_ids=["colour", "sum"], **kwargs)
    assert len(samples) == len(adapters) * len(PROMPTS) * 3
    for name in adapters:
        for pid, prompt in zip(["colour", "sum"], PROMPTS):
            rows = [s for s in samples if s.adapter == name and s.prompt_id == pid]
            assert [s.sample_index for s in rows] == [0, 1, 2]
            assert all(1 <= s.num_tokens <= 6 and s.finish_reason in ("stop", "length") for s in rows)
            assert all(s.turn == 1 and s.context_index is None for s in rows)
            expected = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else CHAT
            assert all(s.prompt == expected for s in rows)
    # Same seed, same draws; an adapter's draws do not depend on what else is sampled alongside.
    again = hf_sampler.sample({"a": adapters["a"]}, PROMPTS, prompt_ids=["colour", "sum"], **kwargs)
    assert _texts(again) == {k: v for k, v in _texts(samples).items() if k[0] == "a"}
    other_seed = hf_sampler.sample({"a": adapters["a"]}, PROMPTS, **{**kwargs, "seed": 8})
    assert [s.text for s in other_seed] != [s.text for s in again]


def test_an_adapter_name_can_be_reloaded_from_another_directory(hf_sampler, adapters, tiny_model_dir):
    greedy = dict(n=1, temperature=0, max_new_tokens=6, progress=False)
    first = hf_sampler.sample({"x": adapters["a"]}, PROMPTS, **greedy)
    second = hf_sampler.sample({"x": adapters["b"]}, PROMPTS, **greedy)  # what a long-lived app does
    assert hf_sampler.adapters["x"] == Path(adapters["b"])
    expected = hf_sampler.sample({"b": adapters["b"]}, PROMPTS, **greedy)
    assert [s.text for s in second] == [s.text for s in expected] != [s.text for s in first]
    hf_sampler.remove_adapter("x")
    assert "x" not in hf_sampler.adapters
    # The one-shot function: load, sample, free.
    samples = sample(tiny_model_dir, {"a": adapters["a"], "base": None}, PROMPTS, n=2, max_new_tokens=3,
                     backend="hf", dtype="float32")
    assert [(s.adapter, s.prompt_id, s.sample_index) for s in samples] == [
        (name, p, j) for name in ("a", "base") for p in range(2) for j in range(2)]


def test_prompts_get_the_chat_template(hf_sampler):
    ids = hf_sampler.encode("Name a colour.")
    text = hf_sampler.tokenizer.decode(ids)
    assert text == "<|user|>\nName a colour.<|end|>\n<|assistant|>\n"
    multi = hf_sampler.tokenizer.decode(hf_sampler.encode(CHAT))
    assert multi == ("<|user|>\nhi<|end|>\n<|assistant|>\nHello<|end|>\n"
                     "<|user|>\nWhat is two plus three?<|end|>\n<|assistant|>\n")


@pytest.mark.parametrize("prompt, words", [
    ("  ", "empty"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
     "ends with a message from the assistant"),
    ([{"role": "robot", "content": "hi"}], "role 'robot'"),
    ([{"role": "user"}], "string 'content'"),
    (42, "must be a string"),
])
def test_bad_prompts_are_one_line_errors(hf_sampler, prompt, words):
    with pytest.raises(QempoError, match=words) as err:
        hf_sampler.sample({"base": None}, ["fine", prompt], n=1, max_new_tokens=2)
    assert "prompt 1" in str(err.value) and "\n" not in str(err.value)


def test_bad_sampling_arguments(hf_sampler):
    for kwargs, words in (({"n": 0}, "n must be"), ({"n": 1, "temperature": -1}, "temperature"),
                          ({"n": 1, "top_p": 0}, "top_p"), ({"n": 1, "max_new_tokens": 0}, "max_new_tokens")):
        with pytest.raises(QempoError, match=words):
            hf_sampler.sample({"base": None}, ["hi"], **kwargs)
    with pytest.raises(QempoError, match="not loaded"):
        hf_sampler.sample(["never-loaded"], ["hi"], n=1)


# ---------------------------------------------------------------------------------- JSONL


def test_samples_round_trip_through_jsonl(tmp_path):
    samples = [Sample(81, "a", 0, "Aloha — 🌺 \"quoted\"\nline", 7, prompt=[{"role": "user", "content": "Hawaii?"}]),
               Sample("q-2", "base", 3, "", 0, turn=2, context_index=5, finish_reason="stop", prompt=CHAT)]
    path = save_samples(tmp_path / "out" / "samples.jsonl", samples)
    assert load_samples(path) == samples
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    assert {"prompt_id", "adapter", "sample_index", "text", "num_tokens"} <= set(rows[0])


def test_bad_sample_files_name_the_line_and_field(tmp_path):
    good = json.dumps({"prompt_id": 1, "adapter": "a", "sample_index": 0, "text": "x", "num_tokens": 1})
    cases = {
        "missing.jsonl": (good + "\n" + json.dumps({"prompt_id": 1, "adapter": "a", "sample_index": 0, "text": "x"}),
                          "line 2: field 'num_tokens' is missing"),
        "type.jsonl": (good.replace('"sample_index": 0', '"sample_index": "0"'), "line 1: field 'sample_index'"),
        "json.jsonl": (good + "\n{oops", "line 2: is not valid JSON"),
        "chat.jsonl": (good[:-1] + ', "prompt": [{"role": "user"}]}', "line 1: field 'prompt'"),
    }
    for name, (content, words) in cases.items():
        (tmp_path / name).write_text(content + "\n")
        with pytest.raises(QempoError, match=words.replace("(", r"\(")):
            load_samples(tmp_path / name)
    with pytest.raises(QempoError, match="not found"):
        load_samples(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------- adapter checks


def test_adapter_of_another_base_is_refused(hf_sampler, other_adapter, tiny_model_dir):
    with pytest.raises(QempoError, match="was trained for base .*other-llama.*, not .*: pass the base model it was "
                                         "trained on \\(its weights do not fit") as err:
        hf_sampler.add_adapter("o", other_adapter)
    assert "input size is 96 in the adapter, 64 in the base" in str(err.value)
    # The vLLM path checks the same shapes from a weightless (meta-device) copy of the base.
    shapes, vocab = meta_parameter_shapes(str(tiny_model_dir))
    assert shapes["model.embed_tokens.weight"] == (vocab, 64)
    with pytest.raises(QempoError, match="its weights do not fit"):
        check_adapter("o", other_adapter, str(tiny_model_dir), base_shapes=shapes)
    assert "o" not in hf_sampler.adapters


def test_adapter_recorded_for_another_base_name(hf_sampler, adapters, tmp_path):
    renamed = shutil.copytree(adapters["a"], tmp_path / "renamed")
    config = json.loads((renamed / "adapter_config.json").read_text())
    (renamed / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": "acme/other-7b"}))
    with pytest.raises(QempoError, match="'renamed' was trained for base acme/other-7b, not .*allow-base-mismatch"):
        hf_sampler.add_adapter("renamed", renamed)
    # qempo_lite.json's record wins over PEFT's.
    (renamed / "adapter_config.json").write_text(json.dumps(config))
    (renamed / "qempo_lite.json").write_text(json.dumps({"base_model": "acme/else-1b", "method": "qempo"}))
    with pytest.raises(QempoError, match="trained for base acme/else-1b"):
        hf_sampler.add_adapter("renamed", renamed)
    # Same shapes: the user may vouch for it.
    lenient = Sampler(hf_sampler.base_model, backend="hf", dtype="float32", allow_base_mismatch=True)
    try:
        lenient.add_adapter("renamed", renamed)
        assert "renamed" in lenient.adapters
    finally:
        lenient.close()


def test_not_an_adapter_directory(hf_sampler, adapters, tmp_path):
    with pytest.raises(QempoError, match="no adapter_config.json"):
        hf_sampler.add_adapter("empty", tmp_path)
    pickled = shutil.copytree(adapters["a"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    with pytest.raises(QempoError, match="no adapter_model.safetensors"):
        hf_sampler.add_adapter("pickled", pickled)
    with pytest.raises(QempoError, match="not a directory"):
        hf_sampler.add_adapter("missing", tmp_path / "missing")


def test_missing_vllm(monkeypatch, tiny_model_dir, caplog):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what an environment without vLLM looks like
    with pytest.raises(QempoError, match=r"pip install 'qempo-lite\[vllm\]'.*backend 'hf'"):
        Sampler(tiny_model_dir, backend="vllm")
    with caplog.at_level(logging.INFO, logger="qempo_lite"):
        sampler = Sampler(tiny_model_dir, backend="auto", dtype="float32")
    try:
        assert sampler.backend == "hf"
        assert "vLLM is not installed: sampling with transformers" in caplog.text
    finally:
        sampler.close()


# ---------------------------------------------------------------------------------- a new serving engine


def _documented_serving_engine() -> str:
    """The worked example of docs/rollout-engines.md ("A new serving engine"), as written there."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "rollout-engines.md").read_text(encoding="utf-8")
    section = doc[doc.index("### A new serving engine"):]
    start = section.index("```python") + len("```python")
    return section[start:section.index("```", start)]


def test_a_serving_engine_added_with_one_class_and_one_registry_line_samples(hf_sampler, adapters, tiny_model_dir):
    """The documented engine, registered by name, serves the Sampler, the eval and app flags and the app's choice."""
    from qempo_lite.app import SamplerCache, choose_backend
    from qempo_lite.app_launcher import build_parser
    from qempo_lite.rollout import ENGINES

    namespace: dict = {}
    exec(compile(_documented_serving_engine(), "rollout-engines.md", "exec"), namespace)  # noqa: S102
    try:
        assert ENGINES["hf_merged"] is namespace["MergedServing"]
        with Sampler(tiny_model_dir, backend="hf_merged", dtype="float32") as merged:
            assert type(merged.engine) is namespace["MergedServing"] and not merged.mixes_adapters
            greedy = dict(n=2, temperature=0, max_new_tokens=8, progress=False)
            # Each adapter merged into its own copy answers as the PEFT engine serving them all at once.
            assert _texts(merged.sample(adapters, PROMPTS, **greedy)) == _texts(hf_sampler.sample(adapters, PROMPTS,
                                                                                                  **greedy))
            assert set(merged.engine.merged) == {"a", "b"}
            drawn = dict(n=3, temperature=1.0, top_p=0.9, max_new_tokens=6, seed=5, progress=False)
            together = merged.sample(adapters, PROMPTS, **drawn)
            assert len(together) == 3 * 2 * 3 and all(1 <= s.num_tokens <= 6 for s in together)
            alone = merged.sample({"b": adapters["b"]}, PROMPTS, **drawn)  # per-request seeds, as every engine
            assert _texts(alone) == {k: v for k, v in _texts(together).items() if k[0] == "b"}
            merged.remove_adapter("a")
            assert set(merged.engine.merged) == {"b"}
        assert build_parser().parse_args(["--backend", "hf_merged"]).backend == "hf_merged"
        assert choose_backend("hf_merged") == ("hf_merged", "transformers, adapters merged (--backend hf_merged)")
        # Sampler settings the engine does not read stay out; its own go through.
        cache = SamplerCache("hf_merged", gpu_memory_utilization=0.5, batch_size=4)
        assert cache.options == {"batch_size": 4}
    finally:
        ENGINES.pop("hf_merged", None)
    with pytest.raises(QempoError, match="backend 'hf_merged' is not one of auto, hf, vllm, vllm_server$"):
        Sampler(tiny_model_dir, backend="hf_merged")
    with pytest.raises(QempoError, match="--backend vllm_server needs the server's URL: pass --vllm-server-url"):
        Sampler(tiny_model_dir, backend="vllm_server")  # a running server serves saved adapters too, given its URL


# ---------------------------------------------------------------------------------- vLLM multi-LoRA


# The process as the vLLM sampler found it (after vLLM's own import, whose settings are not the engine's).
BEFORE_ENGINE: dict = {}


@pytest.fixture(scope="module")
def vllm_sampler(tiny_model_dir, adapters):
    import vllm  # noqa: F401

    BEFORE_ENGINE.update(environ=dict(os.environ), threads=torch.get_num_threads())
    sampler = Sampler(tiny_model_dir, backend="vllm", adapters=adapters, dtype="float32", max_model_len=256,
                      max_lora_rank=16, gpu_memory_utilization=0.2)
    yield sampler
    sampler.close()


@pytest.mark.vllm
def test_vllm_one_engine_serves_two_adapters_and_the_base(vllm_sampler, hf_sampler, adapters):
    llm = vllm_sampler.llm
    assert len(llm.llm_engine.list_loras()) == 2  # both adapters resident in the one engine
    greedy = dict(n=2, temperature=0, max_new_tokens=8, progress=False)
    served = _texts(vllm_sampler.sample(adapters, PROMPTS, **greedy))
    reference = _texts(hf_sampler.sample(adapters, PROMPTS, **greedy))
    # Every adapter (and the base) gives the answer it gives alone in transformers, although
    # all of them were sampled in one call.
    assert served == reference
    assert len({served[(name, 0, 0)] for name in adapters}) == 3

    sampled = vllm_sampler.sample(adapters, PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=3, progress=False)
    assert len(sampled) == 3 * 2 * 3
    for name in adapters:
        for p in range(len(PROMPTS)):
            rows = [s for s in sampled if s.adapter == name and s.prompt_id == p]
            assert [s.sample_index for s in rows] == [0, 1, 2]
            assert all(1 <= s.num_tokens <= 6 for s in rows)
    again = vllm_sampler.sample({"b": adapters["b"]}, PROMPTS, n=3, temperature=1.0, max_new_tokens=6, seed=3,
                                progress=False)
    assert _texts(again) == {k: v for k, v in _texts(sampled).items() if k[0] == "b"}


@pytest.mark.vllm
def test_vllm_refuses_a_rank_above_the_engine_limit(vllm_sampler, tiny_model_dir, tmp_path):
    big = make_adapter(tiny_model_dir, tmp_path / "big", seed=4, r=32)
    with pytest.raises(QempoError, match="rank 32, above max_lora_rank=16"):
        vllm_sampler.add_adapter("big", big)
    assert "big" not in vllm_sampler.adapters


@pytest.mark.vllm
def test_vllm_on_cpu_samples_a_batch_larger_than_one_step_with_seeds(vllm_sampler):
    """More prompt tokens than one engine step takes, every request seeded: vLLM's CPU backend killed the engine
    ("CPU Generator does not use offset") when it split a seeded prefill; its prefills are now whole."""
    from qempo_lite.generation import whole_prefills

    scheduler = vllm_sampler.llm.llm_engine.vllm_config.scheduler_config
    assert whole_prefills(256, {}) == {"enable_chunked_prefill": False, "max_num_batched_tokens": 8192}
    assert whole_prefills(256, {"enable_chunked_prefill": True}) == {}  # the caller's choice stands
    assert scheduler.enable_chunked_prefill is False
    prompts = [f"{i} " + "tell me a long story about the sea and the sky " * 6 for i in range(200)]
    tokens = sum(len(vllm_sampler.tokenizer(p).input_ids) for p in prompts)
    assert tokens > scheduler.max_num_batched_tokens  # the batch cannot be prefilled in one step
    drawn = vllm_sampler.sample({"base": None}, prompts, n=1, temperature=1.0, max_new_tokens=2, seed=5,
                                progress=False)
    assert len(drawn) == 200 and all(0 <= s.num_tokens <= 2 for s in drawn)


@pytest.mark.vllm
def test_vllm_sampler_lets_an_answer_end_at_the_context(vllm_sampler):
    """Evaluation is not a rollout: a prompt that leaves less room than max_new_tokens is sampled, its answers
    ending at the engine's context, not refused (rollouts refuse it: the trainer needs whole completions)."""
    words = "tell me a long story about the sea and the sky".split()
    prompt = ""
    for word in itertools.cycle(words):
        if len(vllm_sampler.encode(prompt + word + " ")) > vllm_sampler.max_model_len - 8:
            break
        prompt += word + " "
    room = vllm_sampler.max_model_len - len(vllm_sampler.encode(prompt))
    assert 0 < room < 64
    drawn = vllm_sampler.sample({"base": None}, [prompt], n=2, temperature=1.0, max_new_tokens=64, seed=1,
                                progress=False)
    assert len(drawn) == 2 and all(s.num_tokens <= room for s in drawn)


@pytest.mark.vllm
def test_vllm_sampler_gives_the_process_back(vllm_sampler):
    """vLLM drops torch to one thread and exports variables for workers it never spawns
    (VLLM_*, LOCAL_WORLD_SIZE, LD_LIBRARY_PATH): the thread count and the loader variables
    come back once the engine is up, the whole environment when it closes."""
    assert torch.get_num_threads() == BEFORE_ENGINE["threads"]
    for key in ("LD_PRELOAD", "LD_LIBRARY_PATH"):
        assert os.environ.get(key) == BEFORE_ENGINE["environ"].get(key)
    # In-process engine unless the caller chose otherwise; a variable vLLM set, to be taken back.
    assert os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == BEFORE_ENGINE["environ"].get(
        "VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    vllm_sampler.close()
    assert dict(os.environ) == BEFORE_ENGINE["environ"]
    with pytest.raises(QempoError, match="was closed"):
        vllm_sampler.sample({"base": None}, ["hi"], progress=False)


@pytest.mark.vllm
def test_vllm_without_lora_layers_serves_the_base_model_alone(tiny_model_dir, hf_sampler, adapters):
    """lora=False (the base model and merged copies in `eval table2`): no LoRA layers in the engine, the base
    model's own answers, and adapters refused with one line. After the module's engine is closed: one at a time."""
    with Sampler(tiny_model_dir, backend="vllm", dtype="float32", max_model_len=256, gpu_memory_utilization=0.2,
                 lora=False) as sampler:
        assert sampler.llm.llm_engine.vllm_config.lora_config is None
        greedy = dict(n=1, temperature=0, max_new_tokens=8, progress=False)
        assert _texts(sampler.sample({"base": None}, PROMPTS, **greedy)) == _texts(
            hf_sampler.sample({"base": None}, PROMPTS, **greedy))
        with pytest.raises(QempoError, match="serves the base model only"):
            sampler.add_adapter("a", adapters["a"])
