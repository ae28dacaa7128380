"""The Gradio app: sample adapters of one base model side by side and compare their diversity.

One column per adapter (or the base model with no adapter): its samples for one prompt, and
under them the column's lexical / syntactic / semantic diversity (x100, as in the paper's
Table 2), distinct-1/2, mean length and, when a judge endpoint is configured, the mean judge
score. A grouped bar chart compares the columns.

The base model is loaded once (a :class:`~qempo_lite.evaluate.sampling.Sampler`, cached per
base model) and serves every selected adapter: one vLLM engine with multi-LoRA when vLLM is
installed, ``transformers`` generate otherwise.

Safe by default: the server binds 127.0.0.1, never opens a share link, accepts no uploads
(Gradio's ``max_file_size`` is 1 KB) and queues requests one at a time. Local paths typed into
the UI must lie under an allowed root (the working directory unless ``--allowed-root`` says
otherwise; what the command line names is allowed too), and so must every file inside the
directory they name once symlinks are resolved; adapters must be safetensors PEFT
directories whose weights are LoRA weights, base models must have safetensors weights. The
sample count, token budget, prompt length and prompt tokens (``--max-prompt-tokens``,
default: the model's context, counted with the chat template before anything is generated)
are checked here, not only by the sliders. Errors reach the user as one line in the page,
naming no server path beyond what the user typed, never as a stack trace.

``--backend auto`` samples with vLLM on a GPU (when installed) and with transformers on a
CPU, where vLLM's CPU backend would reserve most of the machine's memory up front; the page
says which backend serves.

The logic lives in the package (rather than in ``app/app.py``) so that ``qempo-lite app``
works from a wheel as well as from a source checkout; ``app/app.py`` is a thin script. Modules:
``settings`` (command line, demo, questions), ``paths`` (allowed roots, adapter and base
checks), ``samplers`` (backend, the cached Sampler), ``comparison`` (one request: check,
sample, score, judge), ``render`` (column HTML, chart) and ``page`` (the Gradio Blocks, launch).
The metrics come from :data:`qempo_lite.evaluate.metrics.METRICS`.
"""

from .comparison import Comparison
from .page import CSS, MAX_UPLOAD_BYTES, build_app, launch_app
from .paths import adapter_metadata, check_files_inside, resolve_adapter, resolve_base_model, shown
from .render import column_html, comparison_chart, errors_markdown
from .samplers import SamplerCache, choose_backend
from .settings import (BASE, BASE_LABEL, DEFAULT_DEMO_DIR, MAX_COLUMNS, AppSettings, JudgeSettings, discover_settings,
                       find_adapters, load_questions)

__all__ = ["BASE", "BASE_LABEL", "CSS", "DEFAULT_DEMO_DIR", "MAX_COLUMNS", "MAX_UPLOAD_BYTES", "AppSettings",
           "Comparison", "JudgeSettings", "SamplerCache", "adapter_metadata", "build_app", "check_files_inside",
           "choose_backend", "column_html", "comparison_chart", "discover_settings", "errors_markdown",
           "find_adapters", "launch_app", "load_questions", "resolve_adapter", "resolve_base_model", "shown"]
