"""Data layer: sources -> validated, converted, split Parquet dataset -> torch datasets.

    pipeline.data.prepare.run_prepare(PrepareParams, out_dir) -> stats     (writes the dataset)
    pipeline.data.datasets: read_classes, decode_images, decode_pairs, build_augment,
                            LabelledDataset, PairedDataset, UnpairedDataset
    pipeline.data.manifest: schemas, SCHEMA_VERSION, read_table

The on-disk layout is documented in pipeline/data/SCHEMA.md. Submodules are imported on demand
(this package import stays light: no torch, no albumentations).
"""
