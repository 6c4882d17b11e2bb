"""Names of the downstream conditions and headline figures: what run.py computes, report.py draws
and pipeline/headline.py puts into the DVC metrics. A leaf module, so none of them imports another."""

REFERENCE = "real_only"                               # every condition is compared with this one
SYNTH_PREFIX = "real_synth_"                          # + model name: real + that model's synthetic set
CLASSICAL_SUFFIX = "_classical"                       # ... + classical augmentation
HEADLINE = ("balanced_accuracy", "macro_f1")          # compared as paired differences
