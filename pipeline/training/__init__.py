"""The one training engine: a shared adversarial step, a loop counted in images shown,
exact-resume checkpoints. Plain PyTorch: no Ray, no MLflow here (ray_train.py wraps it)."""
