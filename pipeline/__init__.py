"""Synthetic defect dataset pipeline: prepare -> train GANs on Ray -> generate -> evaluate -> downstream."""

__version__ = "0.1.0"
