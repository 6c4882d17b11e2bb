"""Synthetic dataset generation: trained generator + normal images -> labelled, masked defects.

    placement.py     where defects go (random control-map boxes or user masks)
    sampler.py       pure per-sample synthesis, PNG coding, quality filter (no Ray)
    ray_generate.py  the batch stage on Ray Data (`run_generate`); the only ray.data import
    writer.py        samples.parquet + ImageFolder tree + manifest.json + preview.png

Nothing is imported here so `import pipeline.generation.sampler` does not pull in Ray.
"""
