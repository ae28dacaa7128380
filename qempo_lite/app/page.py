"""The Gradio page: controls, one column per adapter, the chart, the ``generate`` API, and its launch."""

from __future__ import annotations

import html
import logging
from pathlib import Path

from ..errors import missing_extra
from .comparison import Comparison
from .paths import first_line, scrub
from .render import column_html, comparison_chart, errors_markdown
from .settings import BASE, BASE_LABEL, MAX_COLUMNS, AppSettings

logger = logging.getLogger("qempo_lite")

MAX_UPLOAD_BYTES = 1024  # the page has no upload control: Gradio's upload endpoint takes next to nothing

CSS = """
.qempo-column {font-size: 0.9em}
.qempo-name {font-weight: 700; font-size: 1.15em}
.qempo-meta, .qempo-path {color: #666; font-size: 0.85em; overflow-wrap: anywhere}
.qempo-samples {padding-left: 1.6em; max-height: 34em; overflow-y: auto}
.qempo-sample {white-space: pre-wrap; overflow-wrap: anywhere; border-bottom: 1px solid #e5e5e5; padding: 2px 0}
.qempo-metrics td {padding: 1px 8px 1px 0} .qempo-value {text-align: right; font-variant-numeric: tabular-nums}
.qempo-error {color: #b00020; font-weight: 600; white-space: pre-wrap}
.qempo-note {color: #8a6d00; font-size: 0.8em}
#qempo-errors {color: #b00020}
"""


def build_app(settings: AppSettings, comparison: Comparison | None = None):
    """The Gradio Blocks: controls, one column per adapter, the chart, and the ``generate`` API."""
    try:
        import gradio as gr
    except ImportError:
        raise missing_extra("gradio", "app") from None
    comparison = comparison or Comparison(settings)

    def generate(base_model: str, adapters: list[str], prompt: str, samples: int = 8, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int = 128, seed: int = 0) -> dict:
        """Sample every selected adapter ('base' for the base model alone) on one prompt; return the
        samples and diversity metrics per column, and 'errors' (one line each) for what was refused."""
        return comparison.run(base_model, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed)

    def generate_page(base_model, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed,
                      progress=gr.Progress()):
        try:  # everything the page shows is built here, inside the error handling (comparison.run has its own)
            result = comparison.run(base_model, adapters or [], prompt, samples, temperature, top_p, max_new_tokens,
                                    seed, progress=lambda fraction, desc: progress(fraction, desc=desc))
            shown = result["columns"][:MAX_COLUMNS]
            cells = [gr.HTML(value=column_html(c), visible=True) for c in shown]
            chart = comparison_chart(result)
        except Exception as err:  # noqa: BLE001 - the page shows one line; the log keeps the traceback
            logger.exception("app page failed")
            result = {"ok": False, "columns": [], "errors": [f"unexpected error ({type(err).__name__}: "
                                                             f"{scrub(first_line(err))}); see the server log"]}
            cells, chart = [], None
        for error in result["errors"]:
            gr.Warning(html.escape(error))  # a toast renders HTML: the message is text
        cells += [gr.HTML(value="", visible=False)] * (MAX_COLUMNS - len(cells))
        return [gr.Markdown(value=errors_markdown(result), visible=bool(result["errors"])), *cells, chart, result]

    choices = [(BASE_LABEL, BASE)] + [(f"{Path(a).name} · {a}", a) for a in settings.adapters]
    questions = [(f"{q['id']} · {q['category']} · {q['prompt'][:70]}", q["id"]) for q in settings.questions]
    by_id = {q["id"]: q["prompt"] for q in settings.questions}

    with gr.Blocks(title="qempo-lite: adapters side by side", analytics_enabled=False) as page:
        gr.Markdown("# qempo-lite: adapters side by side\nSample each adapter on the same prompt and compare how "
                    "diverse its answers are (lexical, syntactic and semantic diversity x100 by Guo et al. "
                    "2024's protocol, `guo2024`, as in the paper; each column names the parser and encoder used).")
        if settings.notice:
            gr.Markdown(settings.notice, elem_id="qempo-notice")
        gr.Markdown(f"Sampling backend: {comparison.samplers.backend_note}.", elem_id="qempo-backend")
        with gr.Row():
            base_model = gr.Dropdown(settings.base_models, value=settings.base_models[0] if settings.base_models
                                     else None, label="Base model (directory or Hub id)", allow_custom_value=True,
                                     elem_id="qempo-base", scale=2)
            adapters = gr.Dropdown(choices, value=settings.selection, multiselect=True, max_choices=MAX_COLUMNS,
                                   allow_custom_value=True, label=f"Adapters (up to {MAX_COLUMNS}; directory or "
                                   "Hub id)", elem_id="qempo-adapters", scale=3)
        with gr.Row():
            prompt = gr.Textbox(settings.prompt, label="Prompt", lines=3, max_length=settings.max_prompt_chars,
                                elem_id="qempo-prompt", scale=3)
            question = gr.Dropdown(questions, value=None, label="or pick an MT-Bench question (first turn)",
                                   visible=bool(questions), elem_id="qempo-question", scale=2)
        if settings.questions_note:
            gr.Markdown(settings.questions_note)
        with gr.Row():
            samples = gr.Slider(1, settings.max_samples, value=min(8, settings.max_samples), step=1,
                                label="Samples per adapter", elem_id="qempo-samples")
            temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature", elem_id="qempo-temperature")
            top_p = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Top-p", elem_id="qempo-top-p")
            max_new_tokens = gr.Slider(1, settings.max_new_tokens, value=min(128, settings.max_new_tokens), step=1,
                                       label="Max new tokens", elem_id="qempo-max-new-tokens")
            seed = gr.Number(0, precision=0, minimum=0, label="Seed", elem_id="qempo-seed")
        button = gr.Button("Generate", variant="primary", elem_id="qempo-generate")
        errors = gr.Markdown(visible=False, elem_id="qempo-errors")
        with gr.Row(equal_height=False):
            cells = [gr.HTML(visible=False, elem_id=f"qempo-column-{i}", elem_classes=["qempo-cell"])
                     for i in range(MAX_COLUMNS)]
        chart = gr.Plot(label="Comparison", elem_id="qempo-chart")
        with gr.Accordion("Raw results (JSON)", open=False):
            raw = gr.JSON(elem_id="qempo-raw")

        question.change(lambda qid: by_id.get(qid, gr.skip()), question, prompt, api_visibility="private")
        inputs = [base_model, adapters, prompt, samples, temperature, top_p, max_new_tokens, seed]
        button.click(generate_page, inputs, [errors, *cells, chart, raw], api_visibility="private",
                     concurrency_id="generate", show_progress_on=[*cells, chart])
        gr.api(generate, api_name="generate", concurrency_id="generate")
    page.queue(default_concurrency_limit=1, max_size=settings.queue_size)
    return page


def launch_app(settings: AppSettings, *, host: str = "127.0.0.1", port: int | None = None,
               prevent_thread_lock: bool = False, quiet: bool = False):
    """Build and serve the app; returns ``(blocks, local_url)``. Never opens a share link; uploads
    are capped at ``MAX_UPLOAD_BYTES`` (the page has no upload control)."""
    page = build_app(settings)
    _, url, _ = page.launch(server_name=host, server_port=port, share=False, prevent_thread_lock=prevent_thread_lock,
                            quiet=quiet, show_error=False, enable_monitoring=False, mcp_server=False, ssr_mode=False,
                            run_history=False, footer_links=["api"], css=CSS, max_file_size=MAX_UPLOAD_BYTES)
    return page, url
