"""The downstream check: a defect classifier trained on real / real + augmentation /
real + synthetic images and scored on held-out real images.

classifier.py  small ResNet from scratch, seeded training, predict
scores.py      accuracy, macro-F1, per-class recall, confusion matrix
run.py         run_downstream: the stage (conditions x shots x seeds)
report.py      plots and summary.md
"""
