"""Class fidelity: are the generated defects of the class they were asked for?

`class_accuracy_domain` (METHODS.md "class accuracy of samples"): the domain network of the
evaluate stage (pipeline/metrics/features.py, a classifier trained on the real training split
with its classification head) assigns each synthetic sample a class; the score is the share
assigned to the class the sample was asked for. A sample asked for `defect` (models that
cannot choose a class) counts as correct when it is assigned any defect class, i.e. not
`normal`. Read it against the network's own accuracy on the real test split
(`features.domain.test_accuracy` and `test_recall` in metrics.json): real images of class k
score that recall, so it is the ceiling a perfect generator reaches.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.metrics.registry import MetricContext, register_metric

DOMAIN_CLASS_SPACE = "domain_class"    # feature space: the domain network's predicted class (N,)


def assigned_to_requested(predicted: np.ndarray, requested: np.ndarray) -> np.ndarray:
    """Per sample: True when `predicted` (class index) is the `requested` one; requested -1
    ("defect", class not chosen) accepts every defect class (index >= 1)."""
    predicted, requested = np.asarray(predicted), np.asarray(requested)
    return np.where(requested >= 0, predicted == requested, predicted >= 1)


@register_metric("class_accuracy_domain", needs=(DOMAIN_CLASS_SPACE,), lower_is_better=False,
                 description="share of samples the domain classifier (trained on real data) assigns to the "
                             "class they were asked for")
def class_accuracy_domain(real: np.ndarray, fake: np.ndarray, ctx: MetricContext) -> float:
    """Share of samples assigned their requested class; NaN without requested labels."""
    _, predicted = ctx.require_features(DOMAIN_CLASS_SPACE)
    if ctx.fake_labels is None or len(predicted) == 0:
        return math.nan
    ctx.detail("as_normal", float(np.mean(predicted == 0)))      # "the generator changed nothing visible"
    return float(np.mean(assigned_to_requested(predicted, ctx.fake_labels)))
