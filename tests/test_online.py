"""Online QEMPO training on a tiny real model: weights, gradients, reference use, rollouts, CLI."""

import inspect
import math

import pytest
import torch
from transformers import TrainerCallback

from qempo_lite.errors import QempoError
from qempo_lite.losses import online_objective, online_weights
from qempo_lite.online import QEMPOOnlineConfig, QEMPOOnlineTrainer

K = 4  # completions per prompt


def contains_e(completions, **kwargs):
    """A verifiable reward: 1 if the completion contains the letter e."""
    return [1.0 if "e" in c[0]["content"] else 0.0 for c in completions]



@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="module")
def prompts():
    from datasets import Dataset

    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Name a colour, number {i}."}] for i in range(8)]})


def _config(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "out"), num_generations=K, per_device_train_batch_size=K,
        gradient_accumulation_steps=2, max_completion_length=8, max_steps=2, learning_rate=2e-2, bf16=False,
        report_to=[], save_strategy="no", gradient_checkpointing=False, logging_steps=1, max_grad_norm=0.0,
        seed=0,
    )
    settings.update(overrides)
    # Each method takes its own coefficients only (another method's are refused).
    own = {"qempo_kl": ("beta1", "beta2"), "grpo": ()}.get(settings.get("loss_method"), ("beta",))
    for name in own:
        settings.setdefault(name, 0.05)
    return QEMPOOnlineConfig(**settings)


def _trainer(cls, tiny_model_dir, tokenizer, prompts, args, **kwargs):
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return cls(model, reward_funcs=contains_e, args=args, train_dataset=prompts, processing_class=tokenizer,
               peft_config=LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"), **kwargs)


def _rows(batch):
    """(prompt ids, completion ids) of each row, padding removed."""
    return [
        (p[pm.bool()].tolist(), c[cm.bool()].tolist())
        for p, pm, c, cm in zip(batch["prompt_ids"], batch["prompt_mask"], batch["completion_ids"], batch["completion_mask"])
    ]


def _plain_logps(model, rows):
    """Σ_t log π(y_t | x, y_<t) of each row, from an ordinary forward pass (not the trainer's fused head)."""
    out = []
    for prompt, completion in rows:
        logits = model(input_ids=torch.tensor([prompt + completion])).logits[0, len(prompt) - 1:-1].float()
        out.append(logits.log_softmax(-1).gather(-1, torch.tensor(completion)[:, None]).sum())
    return torch.stack(out)


def _rewards(tokenizer, rows):
    texts = [tokenizer.decode(c, skip_special_tokens=True) for _, c in rows]
    return torch.tensor(contains_e([[{"role": "assistant", "content": t}] for t in texts]))


class RecordingTrainer(QEMPOOnlineTrainer):
    """Re-derives each batch's weights independently and records the weights the loss consumes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.expected, self.scored, self.consumed = [], [], []

    def _generate_and_score_completions(self, inputs):
        output = super()._generate_and_score_completions(inputs)
        rows = _rows(output)
        model = self.accelerator.unwrap_model(self.model)
        with torch.no_grad():
            logps = _plain_logps(model, rows)
            ref = None
            if self.args.loss_method != "qempo":
                with model.disable_adapter():
                    ref = _plain_logps(model, rows)
        rewards = _rewards(self.processing_class, rows)
        self.expected.append(online_weights(
            self.args.loss_method, logps.double(), rewards.double(), K, ref_logps=None if ref is None else ref.double(),
            gate=self.args.gate, advantage=self.args.advantage, **self.args.method_args,
        ))
        self.scored.append(output["qempo_weights"].clone())
        return output

    def _compute_loss(self, model, inputs):
        self.consumed.append(inputs["qempo_weights"].clone())
        return super()._compute_loss(model, inputs)


def _check_run(trainer, tmp_path):
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == trainer.args.max_steps and all(math.isfinite(x) for x in losses)
    assert len(trainer.scored) == trainer.args.max_steps  # one generation batch per optimizer step
    for expected, scored in zip(trainer.expected, trainer.scored):
        torch.testing.assert_close(scored.double(), expected, rtol=1e-4, atol=1e-8)
    assert any(scored.abs().sum() > 0 for scored in trainer.scored)
    # Every weight scored is consumed by the loss exactly once, whatever the micro-batch split.
    steps = trainer.args.steps_per_generation
    for step, scored in enumerate(trainer.scored):
        consumed = torch.cat(trainer.consumed[step * steps:(step + 1) * steps])
        torch.testing.assert_close(consumed.sort().values, scored.sort().values)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for key in ("reward", "qempo/frac_correct", "qempo/frac_variance_active", "entropy", "qempo/distinct_ratio"):
        assert all(key in entry and math.isfinite(entry[key]) for entry in logged), key
    trainer.save_model(str(tmp_path / "adapter"))
    saved = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json"} <= saved
    assert "model.safetensors" not in saved


# ---------------------------------------------------------------------------------- config


def test_config_defaults_are_the_papers_coefficients(tmp_path):
    assert _config(tmp_path, loss_method="qempo", beta=None).method_args == {"beta": 4e-3}
    assert _config(tmp_path, loss_method="gvpo", beta=None).method_args == {"beta": 1e-2}
    kl = QEMPOOnlineConfig(output_dir=str(tmp_path), loss_method="qempo_kl", bf16=False)
    assert (kl.method_args, kl.gate, kl.advantage, kl.lr_scheduler_type) == (
        {"beta1": 4e-3, "beta2": 1e-2}, "correct", "center", "constant")
    # TRL's own beta keeps its meaning, GRPO's KL coefficient: 0, whatever QEMPO's β is.
    assert _config(tmp_path, loss_method="qempo", beta=0.5).beta == 0.0 == kl.beta


def test_the_gate_defaults_to_the_papers_choice_per_method(tmp_path):
    """The paper gates QEMPO and QEMPO-KL (Section 3.4); its GVPO baseline is ungated. A set gate is kept."""
    gates = {m: QEMPOOnlineConfig(output_dir=str(tmp_path), loss_method=m, bf16=False).gate
             for m in ("qempo", "qempo_kl", "gvpo")}
    assert gates == {"qempo": "correct", "qempo_kl": "correct", "gvpo": "none"}
    assert QEMPOOnlineConfig(output_dir=str(tmp_path), loss_method="gvpo", gate="correct", bf16=False).gate == "correct"


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"loss_method": "ppo"}, "loss_method 'ppo' is unknown"),
        ({"gate": "always"}, "gate 'always' is unknown"),
        ({"rollout": "sglang"}, "rollout 'sglang' is unknown"),
        ({"use_vllm": True}, "set rollout: vllm"),
        ({"loss_method": "qempo", "beta": -1.0}, "beta must be a positive"),
        ({"top_k": 20}, "top_k"),
        ({"entropy_coef": 0.01}, "entropy_coef=0.01 shapes GRPO's loss"),
        ({"mask_truncated_completions": True}, "remove mask_truncated_completions"),
    ],
)
def test_bad_config_is_a_one_line_error(tmp_path, overrides, message):
    with pytest.raises(QempoError, match=message) as err:
        _config(tmp_path, **overrides)
    assert "\n" not in str(err.value)


def test_overridden_trl_internals_have_the_expected_shape():
    """Fails loudly when TRL changes the private members this trainer overrides or calls (listed in trl_internals)."""
    import trl
    from trl import GRPOTrainer

    from qempo_lite.trl_internals import GRPO_PRIVATE_MEMBERS, signature_changes

    assert trl.__version__.startswith("1.16"), trl.__version__
    assert signature_changes(GRPOTrainer) == []
    # Every private TRL member the trainer overrides is in the list.
    overridden = {name for name, member in vars(QEMPOOnlineTrainer).items() if callable(member)
                  and name.startswith("_") and not name.startswith("__") and hasattr(GRPOTrainer, name)}
    assert overridden == {name for name, (use, _) in GRPO_PRIVATE_MEMBERS.items() if use == "overridden"}

    class Refactored(GRPOTrainer):  # what a TRL refactor might leave: a new parameter, a member gone
        def _compute_loss(self, model, inputs, num_items_in_batch):
            pass

        _get_output_dir = None

    changes = signature_changes(Refactored)
    assert changes == ["Refactored._compute_loss (overridden) takes (self, model, inputs, num_items_in_batch), not "
                       "(self, model, inputs)", "Refactored._get_output_dir (called) no longer exists"]

    assert GRPOTrainer.loss_is_scaled_for_ga is True  # our loss is not divided again by Trainer
    # The call paths the overrides rely on.
    needles = {
        GRPOTrainer._generate: "self._generate_single_turn(",
        GRPOTrainer._generate_and_score_completions: "self._calculate_rewards(inputs, prompts, completions",
        GRPOTrainer._prepare_inputs: "shuffle_sequence_dict(generation_batch)",  # carries qempo_weights along
        GRPOTrainer.__init__: "self.beta = args.beta",  # TRL's KL coefficient: the config sets args.beta to 0
    }
    for method, needle in needles.items():
        assert needle in inspect.getsource(method), (method.__name__, needle)


# ---------------------------------------------------------------------------------- runs


@pytest.mark.parametrize("method", ["qempo", "qempo_kl", "gvpo"])
def test_online_run_with_hf_rollout(method, tiny_model_dir, tokenizer, prompts, tmp_path):
    args = _config(tmp_path, loss_method=method)
    trainer = _trainer(RecordingTrainer, tiny_model_dir, tokenizer, prompts, args)
    trainer.train()
    _check_run(trainer, tmp_path)
    assert trainer.ref_logp_calls == (0 if method == "qempo" else args.max_steps)


def _documented_engine_example() -> str:
    """The worked example of docs/where-things-live.md ("A new rollout engine"), as written there."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "where-things-live.md").read_text(encoding="utf-8")
    section = doc[doc.index("- **A new rollout engine**"):]
    block = section[section.index("```python") + len("```python"):section.index("  ```\n", section.index("```python"))]
    return inspect.cleandoc("\n" + block)


def test_an_engine_added_with_one_class_and_one_registry_line_trains(tiny_model_dir, tokenizer, prompts, tmp_path):
    """The documented example: a class and a registry line; ``rollout: NAME`` trains through it, nothing else changed."""
    from qempo_lite.rollout import ENGINES, HFEngine

    namespace: dict = {}
    exec(compile(_documented_engine_example(), "where-things-live.md", "exec"), namespace)  # noqa: S102
    try:
        engine_class = namespace["SharedPromptRollout"]
        assert ENGINES["hf_shared_prompts"] is engine_class and issubclass(engine_class, HFEngine)
        calls = []

        class Counting(engine_class):  # counts the rollouts the trainer asks of the registered engine
            def sample(self, prompts, **kwargs):
                calls.append(len(prompts))
                return super().sample(prompts, **kwargs)

        ENGINES["hf_shared_prompts"] = Counting
        args = _config(tmp_path, loss_method="qempo", rollout="hf_shared_prompts", max_steps=1)
        trainer = _trainer(RecordingTrainer, tiny_model_dir, tokenizer, prompts, args)
        assert type(trainer.rollout_engine) is Counting and trainer.rollout_engine.shared_prompts
        trainer.train()
        _check_run(trainer, tmp_path)
        assert calls and sum(calls) * K == args.per_device_train_batch_size * args.gradient_accumulation_steps
    finally:
        ENGINES.pop("hf_shared_prompts", None)
    with pytest.raises(QempoError, match="rollout 'hf_shared_prompts' is unknown; use one of hf, vllm, vllm_server"):
        _config(tmp_path, rollout="hf_shared_prompts")


def test_the_trainer_takes_engines_only(tiny_model_dir, tokenizer, prompts, tmp_path):
    from qempo_lite.rollout import register_engine

    with pytest.raises(QempoError, match="rollout_engine must be a qempo_lite.rollout.Engine, got object"):
        _trainer(QEMPOOnlineTrainer, tiny_model_dir, tokenizer, prompts, _config(tmp_path), rollout_engine=object())
    with pytest.raises(TypeError, match="must be an Engine subclass"):
        register_engine("not_an_engine", object)


def test_qempo_computes_no_reference_logprobs(tiny_model_dir, tokenizer, prompts, tmp_path):
    counts = {}
    for method in ("qempo", "qempo_kl"):
        trainer = _trainer(QEMPOOnlineTrainer, tiny_model_dir, tokenizer, prompts,
                           _config(tmp_path / method, loss_method=method, max_steps=1))
        policy = trainer.accelerator.unwrap_model(trainer.model)
        disable = policy.disable_adapter
        calls = []

        def counting_disable(*a, _disable=disable, _calls=calls, **kw):
            _calls.append(1)
            return _disable(*a, **kw)

        policy.disable_adapter = counting_disable
        trainer.train()
        assert trainer.ref_model is None  # neither builds a second model
        assert "ref" not in policy.peft_config  # nor a "ref" adapter copy
        counts[method] = len(calls)
    assert counts == {"qempo": 0, "qempo_kl": 1}


class GradientCheck(TrainerCallback):
    """At each optimizer step, compare the accumulated gradient with -∇J on the whole group."""

    def __init__(self):
        self.trainer, self.checked = None, 0

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer = self.trainer
        micro_batches = trainer._buffered_inputs
        # One group of K, split across two micro-batches of the accumulation.
        assert len(micro_batches) == 2 and all(b["completion_ids"].size(0) == K // 2 for b in micro_batches)
        model = trainer.accelerator.unwrap_model(trainer.model)
        params = [p for p in model.parameters() if p.requires_grad]
        accumulated = [p.grad.detach().clone() for p in params]
        rows = [row for batch in micro_batches for row in _rows(batch)]
        rewards = _rewards(trainer.processing_class, rows)
        ref = None
        if args.loss_method != "qempo":
            with torch.no_grad(), model.disable_adapter():
                ref = _plain_logps(model, rows).double()
        logps = _plain_logps(model, rows).double()
        objective = online_objective(args.loss_method, logps, rewards.double(), K, ref_logps=ref, gate=args.gate,
                                     **args.method_args)
        expected = torch.autograd.grad(-objective, params)
        scale = max(w.abs().max().item() for w in expected)
        for got, want in zip(accumulated, expected):
            # fp32 forward passes: agree to 1e-4 of the largest gradient entry.
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-4 * scale)
        assert sum(g.abs().sum() for g in accumulated) > 0
        self.checked += 1


@pytest.mark.parametrize("method", ["qempo", "qempo_kl"])
def test_group_split_across_micro_batches_accumulates_the_whole_groups_gradient(
    method, tiny_model_dir, tokenizer, prompts, tmp_path
):
    check = GradientCheck()
    args = _config(tmp_path, loss_method=method, per_device_train_batch_size=K // 2, gradient_accumulation_steps=2)
    trainer = _trainer(QEMPOOnlineTrainer, tiny_model_dir, tokenizer, prompts, args, callbacks=[check])
    check.trainer = trainer
    trainer.train()
    assert check.checked == args.max_steps


# ---------------------------------------------------------------------------------- recipes and CLI


def test_every_online_recipe_parses_and_follows_the_paper():
    import glob
    from pathlib import Path

    from qempo_lite.models import PAPER_MODELS, memory_plan
    from qempo_lite.train_cli import _ONLINE_TYPES
    from qempo_lite.recipe import parse_recipe
    from qempo_lite.resources import package_file

    recipes = sorted(glob.glob(str(package_file("recipes", "online") / "*.yaml")))
    assert len(recipes) == 6
    paper = {"qempo": {"beta": 4e-3}, "qempo_kl": {"beta1": 4e-3, "beta2": 1e-2}, "gvpo": {"beta": 1e-2}}
    seen = set()
    for path in recipes:
        # bf16 is for the GPU the recipe targets; this machine has none.
        config, model_args, run_args = parse_recipe(["--config", path, "--bf16", "false"], _ONLINE_TYPES)
        assert model_args.model_name_or_path in PAPER_MODELS
        assert config.coefficients() == paper[config.loss_method], path
        assert (config.num_generations, config.temperature, config.lr_scheduler_type) == (10, 1.0, "constant")
        assert config.rollout == "vllm" and config.vllm_max_lora_rank >= model_args.lora_r
        assert config.generation_batch_size % config.num_generations == 0
        assert model_args.quantization == ("4bit" if "7B" in model_args.model_name_or_path else None)
        # The comments give the training share (the memory plan's figure) and vLLM's, for 24 GB and 80 GB cards.
        plan = memory_plan(model_args.model_name_or_path, model_args.quantization, model_args.lora_r,
                           config.max_completion_length + 256, config.per_device_train_batch_size / 2)
        text = Path(path).read_text()
        assert f"~{plan.total:.1f} GiB" in text and "24 GB card" in text and "80 GB card" in text, path
        assert plan.total + config.vllm_gpu_memory_utilization * 24 * 0.93 <= 24 * 0.93, path
        seen.add((model_args.model_name_or_path, config.loss_method))
    assert len(seen) == 6


def _cli_recipe(tmp_path, tiny_model_dir, real_data, **overrides):
    values = dict(
        model_name_or_path=str(tiny_model_dir), quantization="none", lora_r=8, lora_alpha=16,
        datasets=[str(real_data / "gsm8k" / "test.jsonl")], limit=4,
        loss_method="qempo", rollout="hf", output_dir=str(tmp_path / "run"), num_generations=K,
        per_device_train_batch_size=K, gradient_accumulation_steps=1, max_completion_length=6, max_steps=2,
        learning_rate=1e-3, bf16=False, gradient_checkpointing=False, save_strategy="steps", save_steps=1,
        logging_steps=1, report_to="none", disable_tqdm=True,
    )
    values.update(overrides)
    import yaml

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(values))
    return path


def test_cli_trains_saves_and_resumes(tmp_path, tiny_model_dir, real_data, capsys):
    import json
    import shutil

    from qempo_lite.cli import main

    recipe = _cli_recipe(tmp_path, tiny_model_dir, real_data)
    assert main(["train", "online", "--config", str(recipe)]) == 0
    run = tmp_path / "run"
    saved = {p.name for p in run.iterdir()}
    assert {"adapter_model.safetensors", "qempo_lite.json", "training_args.json", "checkpoint-2"} <= saved
    assert "training_args.bin" not in saved  # the pushed directory stays pickle-free
    metadata = json.loads((run / "qempo_lite.json").read_text())
    assert (metadata["mode"], metadata["method"], metadata["coefficients"]) == ("online", "qempo", {"beta": 4e-3})
    assert metadata["online"]["num_generations"] == K and metadata["steps"] == 2 and metadata["data"]["rows"] == 4

    # Same output_dir again: a one-line error, not a silent overwrite.
    capsys.readouterr()
    assert main(["train", "online", "--config", str(recipe)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "--resume" in err and "\n" not in err

    # Resuming continues from checkpoint-2: a run started over would write checkpoint-1 again.
    shutil.rmtree(run / "checkpoint-1")
    assert main(["train", "online", "--config", str(recipe), "--resume", "--max_steps", "3"]) == 0
    state = json.loads((run / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and not (run / "checkpoint-1").exists()


def test_cli_bad_key_is_a_one_line_error(tmp_path, tiny_model_dir, real_data, capsys):
    from qempo_lite.cli import main

    recipe = _cli_recipe(tmp_path, tiny_model_dir, real_data)
    assert main(["train", "online", "--config", str(recipe), "--num_generation", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert "unknown config key 'num_generation'" in err and "num_generations" in err and "\n" not in err
    assert main(["train", "online", "--help"]) == 0
    assert "loss_method" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- vLLM


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    from qempo_lite.rollout import VLLMLoRAEngine

    engine = VLLMLoRAEngine(tiny_model_dir, max_lora_rank=8, max_model_len=256, gpu_memory_utilization=0.2,
                            dtype="float32")
    yield engine
    engine.close()


@pytest.mark.vllm
def test_online_run_with_vllm_rollout(vllm_engine, tiny_model_dir, tokenizer, prompts, tmp_path):
    args = _config(tmp_path, loss_method="qempo_kl", rollout="vllm", max_steps=3)
    trainer = _trainer(RecordingTrainer, tiny_model_dir, tokenizer, prompts, args, rollout_engine=vllm_engine)
    trainer.train()
    _check_run(trainer, tmp_path)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    # The adapter was synced before every step's rollout, and vLLM sampled from the updated policy.
    assert all(entry["rollout/sync_megabytes"] > 0 for entry in logged)
    assert all(entry["rollout/logp_abs_diff"] < 1e-3 for entry in logged)
    assert vllm_engine.lora_request.lora_int_id >= args.max_steps
