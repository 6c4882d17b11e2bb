"""The downstream check: a defect classifier trained on real / real + classical augmentation /
real + copy-paste / real + synthetic images and scored on held-out real images.

classifier.py  small CNN from scratch: class-balanced, early-stopped and selected on val
copy_paste.py  the copy-paste baseline (real defects cut by their masks, pasted on normals)
scores.py      accuracy, balanced accuracy, macro-F1, per-class recall, confusion, degenerate flag
stats.py       mean/std over seeds, paired t interval of the differences vs real_only
run.py         run_downstream: the stage (conditions x shots x seeds, CAS), worker processes
report.py      plots and summary.md
"""
