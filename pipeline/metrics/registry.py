"""Metric registry: `@register_metric("name")` puts a function into the explicit `METRICS` dict.

Pattern from stylegan2-ada-pytorch `metrics/metric_main.py`: metrics are plain functions
found by name, and names are validated when params are loaded, before any work starts.

Every metric has the same signature:

    fn(real: uint8 (N, C, H, W), fake: uint8 (M, C, H, W), ctx: MetricContext) -> float

Lower is better unless the metric's spec says otherwise. A metric may record extra named
values (SWD per pyramid level, the real-set reference of a diversity score) with
`ctx.detail("suffix", value)`; they are reported as `<name>_<suffix>`. A metric registered with
`overall_only=True` (c2st: it trains classifiers, and a class's dozen real images leave a test
split of three) is computed for the overall comparison only, not per class.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import numpy as np

from pipeline.config import METRIC_NAMES, check_metric_names
from pipeline.errors import PipelineError

MetricFn = Callable[[np.ndarray, np.ndarray, "MetricContext"], float]


@dataclass(frozen=True)
class MetricSpec:
    name: str
    fn: MetricFn
    needs: frozenset[str]        # feature spaces it reads: "domain", "domain_class", "inception"
    lower_is_better: bool
    description: str
    overall_only: bool = False   # computed for the overall comparison only, never per class


METRICS: dict[str, MetricSpec] = {}


def register_metric(name: str, *, needs: tuple[str, ...] = (), lower_is_better: bool = True,
                    description: str = "", overall_only: bool = False) -> Callable[[MetricFn], MetricFn]:
    """Decorator: register `fn` under `name` (names are unique)."""

    def decorator(fn: MetricFn) -> MetricFn:
        if name not in METRIC_NAMES:
            raise ValueError(f"metric {name!r} is not declared in pipeline.config.METRIC_NAMES")
        if name in METRICS:
            raise ValueError(f"metric {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        METRICS[name] = MetricSpec(name, fn, frozenset(needs), lower_is_better,
                                   description or (doc[0] if doc else name), overall_only)
        return fn

    return decorator


def known_metrics() -> list[str]:
    _load_builtin_metrics()
    return sorted(METRICS)


def validate_metric_names(names: list[str], key: str = "evaluate.metrics") -> list[MetricSpec]:
    """The specs for `names`; an unknown name is a ParamsError listing the known ones."""
    check_metric_names(names, key)
    _load_builtin_metrics()
    return [METRICS[name] for name in names]


def _load_builtin_metrics() -> None:
    """Import the modules whose decorators fill METRICS (explicit list, grep-able)."""
    from pipeline.metrics import diversity, fidelity, inception, kernel, placement, swd, two_sample  # noqa: F401


@dataclass
class MetricContext:
    """What a metric may need besides the two image sets. Arrays are aligned with the sets.

    features: {"domain": (real (N, D), fake (M, D)), "inception": (...)} for the feature
    spaces that requested metrics need ("domain_class": the domain network's predicted class,
    (N,) and (M,)). fake_masks: (M, 1, H, W) 0/1; fake_regions:
    (M, 1, H, W) 0/1 with has_region (M,) bool saying which rows carry a placement region.
    fake_labels: (M,) int64 class index each sample was asked for (-1: "defect", class not chosen).
    """

    params: Any                                   # EvaluateParams
    seed: int = 0
    features: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    fake_masks: Optional[np.ndarray] = None
    fake_regions: Optional[np.ndarray] = None
    has_region: Optional[np.ndarray] = None
    fake_labels: Optional[np.ndarray] = None
    details: dict[str, float] = field(default_factory=dict)
    _current: str = ""

    def detail(self, suffix: str, value: float) -> None:
        """Record an extra value reported as `<metric>_<suffix>`."""
        self.details[f"{self._current}_{suffix}"] = float(value)

    def require_features(self, space: str = "domain") -> tuple[np.ndarray, np.ndarray]:
        """(real, fake) features in `space`; a missing space is a bug in the caller."""
        if space not in self.features:
            raise PipelineError(f"metric {self._current!r} needs {space} features, but none were computed.")
        return self.features[space]


def compute_metric(spec: MetricSpec, real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> dict[str, float]:
    """{name: value, name_suffix: detail...} for one metric on one pair of sets."""
    ctx._current = spec.name
    before = set(ctx.details)
    value = float(spec.fn(real, fake, ctx))
    out = {spec.name: value}
    out.update({k: v for k, v in ctx.details.items() if k not in before})
    return out
