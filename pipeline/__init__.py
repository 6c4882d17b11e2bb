"""Synthetic defect dataset pipeline: prepare -> train GANs on Ray -> generate -> evaluate -> downstream."""

from pipeline import environment as _environment

__version__ = "0.1.0"

# Offline-safe, quiet library defaults, set before anything imports torch (pipeline/environment.py:
# the table and its rule, a variable the user set wins).
_environment.apply_defaults()
