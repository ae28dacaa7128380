"""The sampling backend (a serving engine of :mod:`qempo_lite.rollout`) and the one Sampler (base model loaded
once) the app keeps between requests."""

from __future__ import annotations

import threading
from typing import Any

from ..errors import QempoError, missing_extra
from .paths import first_line, scrub
from .settings import MAX_COLUMNS


def choose_backend(requested: str) -> tuple[str, str]:
    """(backend, why): what ``--backend`` means on this machine, and the line that tells the user.

    ``auto`` is vLLM on a GPU when it is installed, and transformers on a CPU: vLLM's CPU
    backend reserves a fixed share of the machine's memory when it starts (0.9 unless told
    otherwise) and refuses to start when that much is not free, which a machine running
    anything else rarely has. ``--backend vllm`` asks for it anyway; any registered serving
    engine (:func:`qempo_lite.rollout.register_engine`) can be named.
    """
    from ..rollout import choose_serving_engine

    name, note, _ = choose_serving_engine(requested, gpu_only=True)
    return name, note


class SamplerCache:
    """One :class:`Sampler` (base model loaded once) reused across requests.

    A request for another base model closes the previous one first: two base models rarely
    fit in memory together. ``backend`` is resolved once (:func:`choose_backend`);
    ``backend_note`` says which one serves, for the page.
    """

    def __init__(self, backend: str = "auto", **options: Any):
        from ..rollout import ENGINES, serving_engine_names

        self.backend, self.backend_note = choose_backend(backend)
        # vLLM's max_loras is how many adapters one batch may mix: all the columns at once. Sampler
        # settings the chosen engine does not read are left out; engine options go through.
        reads = ENGINES[self.backend].settings
        settings = {key for name in serving_engine_names() for key in ENGINES[name].settings}
        self.options = {key: value for key, value in {"max_loras": MAX_COLUMNS, **options}.items()
                        if key in reads or key not in settings}
        self._key: str | None = None
        self._sampler = None
        self.lock = threading.Lock()

    def get(self, base_model: str, label: str | None = None):
        """The Sampler of ``base_model``; messages name it ``label`` (what the user typed)."""
        label = label or base_model
        if self._key != base_model:
            self.close()
            try:
                from ..evaluate.sampling import Sampler
            except ImportError as err:
                raise missing_extra("qempo_lite.evaluate.sampling", "eval", first_line(err)) from None
            try:
                self._sampler = Sampler(base_model, backend=self.backend, **self.options)
            except (OSError, ValueError) as err:
                reason = scrub(str(err) if isinstance(err, QempoError) else first_line(err), {base_model: label})
                raise QempoError(f"base model {label} could not be loaded ({reason}); pick a model directory or a "
                                 "Hub id you have access to") from None
            self._key = base_model
        return self._sampler

    def close(self) -> None:
        if self._sampler is not None and hasattr(self._sampler, "close"):
            self._sampler.close()
        self._sampler, self._key = None, None
