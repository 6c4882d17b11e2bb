"""Names of the downstream conditions and headline figures: what run.py computes, report.py draws
and pipeline/headline.py puts into the DVC metrics. A leaf module, so none of them imports another."""

REFERENCE = "real_only"                               # every condition is compared with this one
COPY_PASTE = "real_copy_paste"                        # the baseline a synthetic set must not fall below
SYNTH_PREFIX = "real_synth_"                          # + model name: real + that model's synthetic set
CLASSICAL_SUFFIX = "_classical"                       # ... + classical augmentation
HEADLINE = ("balanced_accuracy", "macro_f1")          # compared as paired differences

SEGMENT = "segment"                                   # task kind and key prefix of the segmenter's figures
DRAEM = "real_draem"                                  # + DRAEM-style Perlin-mask anomalies (segmenter only)
SEGMENT_SCORES = ("pixel_ap", "pixel_f1", "image_auroc", "mean_iou")   # per segmenter, on the test split
SEGMENT_HEADLINE = ("pixel_ap", "pixel_f1", "image_auroc")             # compared as paired differences
