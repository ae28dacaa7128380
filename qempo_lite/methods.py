"""The method registry: every objective qempo-lite trains, each with its own settings, in one place.

A method brings what PEFT's registry asks of a method: its name, the modes it trains in, its
**coefficients** (each with its default, its meaning for the help texts and the same
validation), the TRL settings it alone may use, and its loss. Most methods are members of the
two-coefficient family of ``docs/math.md``: a policy coefficient ``a`` and a reference
coefficient ``c`` computed from the named coefficients; offline the loss is
``-log σ(a·Δlog π − c·Δlog π_ref)``, online the weights of Eq. 8 use the same ``(a, c)``, and
the optimum is ``π ∝ π_ref^(c/a) · exp(r/a)``. A method outside the family brings its own
``offline_loss`` (per pair) or ``online_objective`` (the group objective J, whose gradient in
ℓ the trainer takes as the per-sequence weights). The configs, the losses, both trainers, the
theory module, the model card and the command-line help read this table, so adding a method is
one :func:`register_method` call (``tests/test_method_registry.py`` registers one with a new
coefficient and a new loss and trains it offline and online, touching no other file).

A run resolves its method once (:func:`resolve`): the coefficients checked, the defaults filled
and ``(a, c)`` computed, held in a frozen :class:`MethodSettings` that the trainers read.

Pure Python: imports nothing from the rest of the package.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

MODES = ("offline", "online")
MAX_COEFFICIENT = 1e3  # the largest coefficient accepted: beyond it the loss overflows


@dataclass(frozen=True)
class Method:
    """One objective: its name, modes, coefficients (name → default), their meanings and its loss.

    Two-coefficient family: ``policy_coef`` and ``ref_coef`` map the coefficients to ``(a, c)``.
    Outside it (both None): ``offline_loss(chosen_logps, rejected_logps, ref_chosen_logps,
    ref_rejected_logps, **coefficients)`` gives the per-pair loss, and ``online_objective(logps,
    rewards, group_size, *, ref_logps, correct, gate, advantage, **coefficients)`` the group
    objective J to maximise; ``uses_reference`` says whether they read reference log-probs.
    ``trl_settings``: the TRL config fields this method alone may set, each with the values
    allowed (None: any value), e.g. TRL's f-DPO divergences for ``dpo``.
    """

    name: str
    modes: tuple[str, ...]
    defaults: Mapping[str, float]
    policy_coef: Callable[[Mapping[str, float]], float] | None = None
    ref_coef: Callable[[Mapping[str, float]], float] | None = None
    title: str = ""
    card_text: str = ""
    meanings: Mapping[str, str] | None = None  # what each coefficient is, for help texts
    gate: str = "correct"  # online: the quality gate of the variance term when a run sets none
    trl_loss: bool = False  # online: train the TRL parent's own loss (a baseline), not the family's weights
    trl_settings: Mapping[str, tuple | None] = field(default_factory=dict)
    offline_loss: Callable[..., Any] | None = None
    online_objective: Callable[..., Any] | None = None
    uses_reference: bool = False  # outside the family: whether its loss reads reference log-probs

    @property
    def coefficient_names(self) -> tuple[str, ...]:
        return tuple(self.defaults)

    @property
    def in_family(self) -> bool:
        """Whether the method is a member of the two-coefficient family (closed-form optimum, TRL's sigmoid loss)."""
        return self.policy_coef is not None and self.ref_coef is not None


@dataclass(frozen=True)
class MethodSettings:
    """A run's method, resolved once: its checked coefficients (defaults filled) and, in the family, ``(a, c)``.

    Plain data (it travels with a pickled config): the :class:`Method` itself is looked up by name."""

    name: str
    coefficients: Mapping[str, float]
    policy_coef: float | None
    ref_coef: float | None

    @property
    def method(self) -> Method:
        return get_method(self.name)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss reads reference log-probs (qempo never does)."""
        return self.ref_coef != 0.0 if self.method.in_family else self.method.uses_reference


_REGISTRY: dict[str, Method] = {}
_ALIASES: dict[str, str] = {}


def register_method(method: Method, *, aliases: tuple[str, ...] = ()) -> Method:
    """Add ``method`` (and names that mean it, e.g. the paper's ``rlhf`` for ``dpo``) to the registry."""
    if method.name in _REGISTRY or method.name in _ALIASES:
        raise ValueError(f"method {method.name!r} is already registered")
    unknown = set(method.modes) - set(MODES)
    if unknown or not method.modes:
        raise ValueError(f"method {method.name!r}: modes must be among {MODES}, got {method.modes}")
    if (method.policy_coef is None) != (method.ref_coef is None):
        raise ValueError(f"method {method.name!r}: give both policy_coef and ref_coef (the family) or neither")
    if not method.in_family and not method.trl_loss:
        needed = {"offline": method.offline_loss, "online": method.online_objective}
        missing = [mode for mode in method.modes if needed[mode] is None]
        if missing:
            raise ValueError(f"method {method.name!r} is outside the two-coefficient family: give its "
                             f"{' and '.join('offline_loss' if m == 'offline' else 'online_objective' for m in missing)}")
    _REGISTRY[method.name] = method
    for alias in aliases:
        _ALIASES[alias] = method.name
    return method


def unregister_method(name: str) -> None:
    """Remove a method added with :func:`register_method` (and its aliases)."""
    _REGISTRY.pop(name, None)
    for alias in [a for a, target in _ALIASES.items() if target == name]:
        del _ALIASES[alias]


def get_method(name: str, mode: str | None = None) -> Method:
    """The registered method called ``name`` (or an alias of it); ValueError naming the choices otherwise."""
    method = _REGISTRY.get(_ALIASES.get(name, name))
    if method is None or (mode is not None and mode not in method.modes):
        raise ValueError(f"unknown {mode + ' ' if mode else ''}method {name!r}; choose one of "
                         f"{', '.join(method_names(mode))}")
    return method


def method_names(mode: str | None = None) -> tuple[str, ...]:
    """Registered method names, in registration order (those training in ``mode`` only, when given)."""
    return tuple(name for name, method in _REGISTRY.items() if mode is None or mode in method.modes)


def coefficient_names(mode: str | None = None) -> tuple[str, ...]:
    """Every coefficient name a registered method (of ``mode``) takes, in registration order."""
    names: dict[str, None] = {}
    for name in method_names(mode):
        names.update(dict.fromkeys(get_method(name).defaults))
    return tuple(names)


def resolve(name: str, coefficients: Mapping[str, float | None], mode: str | None = None) -> MethodSettings:
    """The method ``name`` with its coefficients checked and the paper's defaults filling those unset (None).

    Each must be a positive finite number at most ``MAX_COEFFICIENT``. Names the method does not
    take are refused, so that a coefficient meant for another method never passes silently.
    """
    method = get_method(name, mode)
    unexpected = sorted(k for k, v in coefficients.items() if k not in method.defaults and v is not None)
    if unexpected:
        takes = ", ".join(method.coefficient_names) or "no coefficients"
        raise ValueError(f"method {method.name!r} takes {takes}, not {', '.join(unexpected)}")
    values = {}
    for key, default in method.defaults.items():
        value = default if coefficients.get(key) is None else coefficients[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0.0 < float(value) < math.inf):
            raise ValueError(f"{key} must be a positive finite number for method {method.name!r}, got {value!r}")
        if value > MAX_COEFFICIENT:  # a·Δlog π overflows to inf, and the adapter to NaN
            raise ValueError(f"{key}={value:g} is above {MAX_COEFFICIENT:g} for method {method.name!r}: the loss "
                             "overflows and the adapter diverges to NaN (the paper's are about 1e-3 .. 1e-1)")
        values[key] = float(value)
    if not method.in_family:
        return MethodSettings(method.name, values, None, None)
    return MethodSettings(method.name, values, method.policy_coef(values), method.ref_coef(values))


def loss_coefficients(name: str, coefficients: Mapping[str, float | None], mode: str | None = None
                      ) -> tuple[float, float]:
    """``(a, c)`` of the family method ``name`` from its named coefficients, every one required (see :func:`resolve`)."""
    method = get_method(name, mode)
    missing = [k for k in method.defaults if coefficients.get(k) is None]
    if missing:
        raise ValueError(f"method {method.name!r} needs {', '.join(missing)}; pass it as a keyword argument")
    settings = resolve(name, coefficients, mode)
    if not method.in_family:
        raise ValueError(f"method {method.name!r} is outside the two-coefficient family: it has no (a, c)")
    return settings.policy_coef, settings.ref_coef


def method_help(mode: str) -> str:
    """One line naming the methods of ``mode`` (for ``loss_method``'s help)."""
    return "; ".join(f"{name}: {get_method(name).title}" for name in method_names(mode))


def coefficient_help(coefficient: str, mode: str) -> str:
    """What ``coefficient`` means for each method of ``mode`` that takes it, with the default."""
    parts = []
    for name in method_names(mode):
        method = get_method(name)
        if coefficient in method.defaults:
            meaning = (method.meanings or {}).get(coefficient, "")
            parts.append(f"{name}: {meaning + ' ' if meaning else ''}(default {method.defaults[coefficient]:g})")
    return "; ".join(parts)


# The paper's coefficients (Section 5) where it gives them; SPL's are ours (see QEMPOConfig).
register_method(Method(
    "qempo", ("offline", "online"), {"beta": 4e-3},
    policy_coef=lambda k: k["beta"], ref_coef=lambda k: 0.0,
    title="QEMPO (Eq. 7 offline, Eq. 9 online)", meanings={"beta": "1/λ"},
    card_text="QEMPO (Eq. 7 / Eq. 9): maximise entropy subject to a quality constraint; no reference model. "
              "Optimal policy π ∝ exp(r/β)."))
register_method(Method(
    "qempo_kl", ("offline", "online"), {"beta1": 4e-3, "beta2": 1e-2},
    policy_coef=lambda k: k["beta1"] + k["beta2"], ref_coef=lambda k: k["beta2"],
    title="QEMPO-KL (Eq. 6 offline, Eq. 8 online)", meanings={"beta1": "1/λ1", "beta2": "λ2/λ1"},
    card_text="QEMPO-KL (Eq. 6 / Eq. 8): maximise entropy subject to quality and KL constraints. "
              "Optimal policy π ∝ π_ref^{β2/(β1+β2)} exp(r/(β1+β2))."))
register_method(Method(
    "dpo", ("offline",), {"beta": 1e-2},
    policy_coef=lambda k: k["beta"], ref_coef=lambda k: k["beta"],
    title="DPO (Eq. 4, the paper's RLHF baseline)", meanings={"beta": "β"},
    card_text="DPO (the paper's RLHF baseline). Optimal policy π ∝ π_ref exp(r/β).",
    # TRL's f-DPO: its c/a = 1, so TRL's loss sees the reference log-probs unscaled, as TRL intends.
    trl_settings={"f_divergence_type": ("reverse_kl", "js_divergence", "forward_kl")}), aliases=("rlhf",))
register_method(Method(
    "spl", ("offline",), {"alpha": 2e-2, "beta": 1e-2},
    policy_coef=lambda k: k["alpha"], ref_coef=lambda k: k["beta"],
    title="Soft Preference Learning (baseline)",
    meanings={"alpha": "policy coefficient", "beta": "reference coefficient"},
    card_text="Soft Preference Learning (baseline). Optimal policy π ∝ π_ref^{β/α} exp(r/α)."))
register_method(Method(
    "gvpo", ("online",), {"beta": 1e-2},
    policy_coef=lambda k: k["beta"], ref_coef=lambda k: k["beta"],
    title="GVPO (Eq. 8 with a = c = β, the paper's online RLHF baseline)", meanings={"beta": "β"},
    card_text="GVPO (the paper's online RLHF baseline). Optimal policy π ∝ π_ref exp(r/β).",
    gate="none"))  # the paper gates QEMPO and QEMPO-KL only (Section 3.4); GVPO as published is ungated
register_method(Method(
    "grpo", ("online",), {},
    title="GRPO (TRL's own loss, the baseline users reach for; its entropy bonus and clip-higher allowed)",
    card_text="GRPO (TRL's GRPOTrainer loss, unchanged): group-normalised advantages, PPO-style clipped ratio.",
    gate="none", trl_loss=True,
    # TRL's anti-collapse settings: its entropy bonus (fixed or adaptive), clip-higher (DAPO) and
    # the high-entropy-token mask; the other methods replace the loss they shape.
    trl_settings=dict.fromkeys(("entropy_coef", "use_adaptive_entropy", "entropy_coef_min", "entropy_coef_max",
                                "entropy_coef_delta", "entropy_target", "top_entropy_quantile", "epsilon_high"))))


__all__ = ["MAX_COEFFICIENT", "MODES", "Method", "MethodSettings", "coefficient_help", "coefficient_names", "get_method",
           "loss_coefficients", "method_help", "method_names", "register_method", "resolve", "unregister_method"]
