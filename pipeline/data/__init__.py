"""Data layer: sources -> validated, converted, split Parquet dataset -> torch datasets.

    pipeline.data.prepare.run_prepare(PrepareParams, out_dir) -> stats     (writes the dataset)
    pipeline.data.datasets: read_classes, decode_images, decode_pairs, build_augment,
                            LabelledDataset, PairedDataset, UnpairedDataset
    pipeline.data.manifest: schemas, SCHEMA_VERSION (whole images), PATCH_SCHEMA_VERSION, read_table
    pipeline.data.patches:  patch mode (prepare.resize: patches), cutting at native scale
    pipeline.data.segmentation: the segmentation source (class-index masks)

The on-disk layout is documented in pipeline/data/SCHEMA.md. Submodules are imported on demand
(this package import stays light: no torch, no albumentations).
"""
