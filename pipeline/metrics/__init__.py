"""Offline metrics for synthetic defect sets (nothing is downloaded).

registry.py   `@register_metric`, METRICS, name validation, MetricContext
swd.py        ProGAN's sliced Wasserstein distance on Laplacian-pyramid patches
features.py   the domain feature network (small CNN trained on the real data, not Inception)
kernel.py     KID / FID / Gaussian MMD math and the `*_domain` metrics
diversity.py  duplicate_rate (birthday-paradox style) and mean_pairwise_distance
placement.py  mask_in_region (generated mask inside the requested region), mask_area_in_range
inception.py  inception_fid / inception_kid from user-supplied local weights only
two_sample.py c2st: classifier two-sample test, held-out accuracy telling a set from real defects
data.py       reading prepared real data and synthetic sets (shared with pipeline.downstream)
evaluate.py   run_evaluate: the evaluate stage
"""

from pipeline.metrics.registry import METRICS, MetricContext, known_metrics, register_metric, validate_metric_names

__all__ = ["METRICS", "MetricContext", "known_metrics", "register_metric", "validate_metric_names"]

from pipeline.metrics import diversity, inception, kernel, placement, swd, two_sample  # noqa: E402,F401  (fill METRICS)
