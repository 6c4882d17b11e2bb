"""Read what evaluation and the downstream classifier compare: prepared real data and synthetic sets.

Real images come through the data package's decoder (`pipeline.data.datasets.decode_images`),
so there is one reader of `images.parquet` in the project. Synthetic sets are read here:

  data/synthetic/<model>/samples.parquet  id, label (class name or "defect"), label_idx
      (-1 for "defect"), image_png, mask_png, region_png (0/255, may be null), model
  data/synthetic/<model>/manifest.json     {"model": ..., "classes": [...], ...}

The "do nothing" baseline (`load_do_nothing`) is an image-to-image model's samples with every
generated image replaced by the unmodified normal image it was made from (`normal_id`), and
empty masks: the score a defect generator has to beat to have changed anything that matters.

A model folder that does not exist is skipped (with a note); one that exists without
samples.parquet, or whose samples do not match the prepared data (unknown class names, wrong
label_idx, wrong resolution or channel count), is an error naming the file.
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.errors import DataError

log = logging.getLogger(__name__)

DEFECT_LABEL = "defect"          # models that cannot choose a class write this label, label_idx -1
SAMPLES_FILE = "samples.parquet"
REQUIRED_COLUMNS = ("id", "label", "label_idx", "image_png", "mask_png")


@dataclass(frozen=True)
class PreparedInfo:
    """classes.json of a prepared folder. classes[0] == "normal"."""

    path: Path
    classes: list[str]
    resolution: int
    channels: int


@dataclass
class ImageSet:
    """Images with labels. images uint8 (N, C, H, W); masks uint8 (N, 1, H, W) 0/1; labels int64 (N,);
    has_mask bool (N,): the mask is known (an empty mask of a defect image without one means
    "unknown", not "clean"; None: every mask is known)."""

    images: np.ndarray
    masks: np.ndarray
    labels: np.ndarray
    has_mask: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def known_masks(self) -> np.ndarray:
        """bool (N,): rows whose mask can be trusted (normals always: their mask is empty by definition)."""
        known = np.ones(len(self.labels), bool) if self.has_mask is None else np.asarray(self.has_mask, bool)
        return known | (self.labels == 0)

    def take(self, idx: np.ndarray) -> "ImageSet":
        return ImageSet(self.images[idx], self.masks[idx], self.labels[idx],
                        None if self.has_mask is None else self.has_mask[idx])


@dataclass
class SyntheticSet:
    """One model's generated samples. label_idx -1 means "defect" (class not chosen)."""

    model: str
    path: Path                   # the samples.parquet file
    images: np.ndarray           # uint8 (M, C, H, W)
    masks: np.ndarray            # uint8 (M, 1, H, W) 0/1
    regions: np.ndarray          # uint8 (M, 1, H, W) 0/1 (zeros where has_region is False)
    has_region: np.ndarray       # bool (M,)
    label_names: np.ndarray      # str (M,)
    label_idx: np.ndarray        # int64 (M,)

    def __len__(self) -> int:
        return len(self.label_idx)

    @property
    def class_labelled(self) -> bool:
        """True when at least one sample carries a real defect class (label_idx >= 1)."""
        return bool((self.label_idx >= 1).any())


# --------------------------------------------------------------------------- real data

def read_prepared_info(prepared_dir: Path) -> PreparedInfo:
    """classes.json through the data package's reader (which checks the schema version)."""
    from pipeline.data.datasets import read_classes

    path = Path(prepared_dir) / "classes.json"
    meta = read_classes(Path(prepared_dir))
    try:
        info = PreparedInfo(path, [str(c) for c in meta["classes"]], int(meta["resolution"]), int(meta["channels"]))
    except (KeyError, TypeError, ValueError) as err:
        raise DataError(f"{path} is not a valid classes.json ({type(err).__name__}: {err}); "
                        "it needs classes, resolution and channels. Re-run `pipeline prepare`.") from None
    if not info.classes or info.classes[0] != "normal":
        raise DataError(f"{path}: the first class must be 'normal', got {info.classes[:1]}. "
                        "Re-run `pipeline prepare`.")
    return info


def load_real(prepared_dir: Path, splits: list[str] | tuple[str, ...]) -> ImageSet:
    """The prepared images of `splits`, concatenated, via the data package's decoder."""
    from pipeline.data.datasets import decode_images  # the project's one images.parquet reader

    parts = [decode_images(Path(prepared_dir), split=split) for split in splits]
    as_np = lambda t, dtype: np.asarray(t.numpy() if hasattr(t, "numpy") else t, dtype)  # noqa: E731
    return ImageSet(
        images=np.concatenate([as_np(p["image"], np.uint8) for p in parts]),
        masks=np.concatenate([as_np(p["mask"], np.uint8) for p in parts]),
        labels=np.concatenate([as_np(p["label"], np.int64) for p in parts]),
        has_mask=np.concatenate([as_np(p["has_mask"], bool) for p in parts]),
    )


# --------------------------------------------------------------------------- synthetic sets

def find_model_folders(synthetic_root: Path, models: list[str]) -> tuple[dict[str, Path], list[str]]:
    """({model: samples.parquet path} for the folders that exist, notes on the skipped ones)."""
    found: dict[str, Path] = {}
    notes: list[str] = []
    for model in models:
        folder = Path(synthetic_root) / model
        if not folder.exists():
            note = f"{model}: no synthetic folder {folder}; skipped (run `pipeline generate --model {model}`)."
            log.warning(note)
            notes.append(note)
            continue
        samples = folder / SAMPLES_FILE
        if not samples.is_file():
            raise DataError(f"{folder} exists but has no {SAMPLES_FILE}: the generation stage did not "
                            f"finish. Re-run `pipeline generate --model {model}` or remove {folder}.")
        if _row_count(samples) == 0:
            # A model that learned no visible defects has every sample dropped by the quality
            # filter; that is a finding to report, not a reason to stop the whole DAG.
            note = (f"{model}: the generation stage kept no samples (every mask was empty or full, see "
                    f"{folder / 'manifest.json'}); skipped. Train longer or relax generate.min_mask_fraction.")
            log.warning(note)
            notes.append(note)
            continue
        found[model] = samples
    return found, notes


def _row_count(samples: Path) -> int:
    import pyarrow.parquet as pq

    try:
        return pq.read_metadata(samples).num_rows
    except Exception:  # noqa: BLE001 - unreadable files are reported by load_synthetic
        return -1


def _decode(data: bytes, what: str, path: Path, row_id: str) -> np.ndarray:
    try:
        with Image.open(io.BytesIO(data)) as img:
            a = np.asarray(img).copy()
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path}: {what} of sample {row_id!r} is not a readable PNG ({err}). "
                        "Re-run the generation stage.") from None
    return a[:, :, None] if a.ndim == 2 else a                     # (H, W, C)


def load_synthetic(samples_path: Path, info: PreparedInfo, model: str | None = None) -> SyntheticSet:
    """Read and check one samples.parquet against the prepared data's classes and image size."""
    import pyarrow.parquet as pq

    path = Path(samples_path)
    model = model or path.parent.name
    try:
        names_in_file = pq.read_schema(path).names
        table = pq.read_table(path, columns=[c for c in REQUIRED_COLUMNS + ("region_png",) if c in names_in_file])
    except Exception as err:  # noqa: BLE001
        raise DataError(f"{path} is not a readable Parquet file ({err}). Re-run the generation stage.") from None
    missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
    if missing:
        raise DataError(f"{path} lacks columns {missing}; expected {list(REQUIRED_COLUMNS)} (+ region_png). "
                        "Re-run the generation stage.")
    if table.num_rows == 0:
        raise DataError(f"{path} has no samples. Re-run `pipeline generate --model {model}` "
                        "(check generate.min_mask_fraction / max_mask_fraction if everything was filtered).")
    cols = {c: table.column(c).to_pylist() for c in table.column_names}
    names = [str(x) for x in cols["label"]]
    idx = np.asarray(cols["label_idx"], np.int64)

    known = set(info.classes) | {DEFECT_LABEL}
    unknown = sorted(set(names) - known)
    if unknown:
        raise DataError(f"{path}: labels {unknown} are not classes of {info.path} ({info.classes}, or "
                        f"'{DEFECT_LABEL}'). The synthetic set was made for other data: regenerate it "
                        "from a model trained on this prepared dataset.")
    expected = np.asarray([-1 if n == DEFECT_LABEL and n not in info.classes else info.classes.index(n)
                           for n in names], np.int64)
    # Data whose one defect class is itself named "defect" (elpv): class-conditional models write
    # it with its class index, unconditional ones with -1; both are that class.
    either = (np.asarray(names) == DEFECT_LABEL) & (idx == -1)
    bad = np.nonzero((expected != idx) & ~either)[0]
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: sample {cols['id'][i]!r} has label {names[i]!r} but label_idx {idx[i]} "
                        f"(expected {expected[i]} from {info.path}). Regenerate the synthetic set.")

    r, c = info.resolution, info.channels
    images, masks, regions, has_region = [], [], [], []
    for i, row_id in enumerate(cols["id"]):
        img = _decode(cols["image_png"][i], "image_png", path, row_id)
        if img.shape != (r, r, c):
            raise DataError(f"{path}: sample {row_id!r} is {img.shape[1]}x{img.shape[0]} with {img.shape[2]} "
                            f"channel(s), but the prepared data ({info.path}) is {r}x{r} with {c}. "
                            "Regenerate the synthetic set from a model trained on this prepared dataset.")
        mask = _decode(cols["mask_png"][i], "mask_png", path, row_id)[:, :, :1]
        if mask.shape[:2] != (r, r):
            raise DataError(f"{path}: mask of sample {row_id!r} is {mask.shape[1]}x{mask.shape[0]}, "
                            f"expected {r}x{r}. Regenerate the synthetic set.")
        region_png = cols.get("region_png", [None] * len(names))[i]
        region = np.zeros((r, r, 1), np.uint8)
        if region_png:
            region = _decode(region_png, "region_png", path, row_id)[:, :, :1]
            if region.shape[:2] != (r, r):
                raise DataError(f"{path}: region of sample {row_id!r} is {region.shape[1]}x{region.shape[0]}, "
                                f"expected {r}x{r}. Regenerate the synthetic set.")
        images.append(img.transpose(2, 0, 1))
        masks.append((mask > 127).astype(np.uint8).transpose(2, 0, 1))
        regions.append((region > 127).astype(np.uint8).transpose(2, 0, 1))
        has_region.append(bool(region_png))
    return SyntheticSet(model=model, path=path, images=np.stack(images), masks=np.stack(masks),
                        regions=np.stack(regions), has_region=np.asarray(has_region, bool),
                        label_names=np.asarray(names), label_idx=idx)


DO_NOTHING = "do_nothing"       # the baseline row's model name in evaluate's outputs


def load_do_nothing(source: SyntheticSet, prepared_dir: Path) -> SyntheticSet | None:
    """`source`'s samples with each image replaced by its unmodified normal input, empty masks and
    the same labels and regions. None when `source` has no `normal_id` column (noise-based
    families: no input image)."""
    import pyarrow.parquet as pq

    from pipeline.data.manifest import read_table

    if "normal_id" not in pq.read_schema(source.path).names:
        return None
    wanted = [str(x) for x in pq.read_table(source.path, columns=["normal_id"]).column("normal_id").to_pylist()]
    table = read_table(Path(prepared_dir), columns=["id", "image_png"])
    wanted_set = set(wanted)
    png = {i: b for i, b in zip(table.column("id").to_pylist(), table.column("image_png").to_pylist())
           if i in wanted_set}
    missing = sorted(wanted_set - set(png))
    if missing:
        raise DataError(f"{source.path}: normal inputs {missing[:3]} are not in {prepared_dir}/images.parquet; "
                        "the synthetic set was made from other prepared data. Regenerate it.")
    decoded = {i: _decode(b, "image_png", Path(prepared_dir) / "images.parquet", i).transpose(2, 0, 1)
               for i, b in png.items()}
    images = np.stack([decoded[i] for i in wanted])
    if images.shape[1:] != source.images.shape[1:]:
        raise DataError(f"{prepared_dir}: normal images are {images.shape[1:]} but {source.path} holds "
                        f"{source.images.shape[1:]}. Regenerate the synthetic set from this prepared data.")
    return SyntheticSet(model=DO_NOTHING, path=source.path, images=images, masks=np.zeros_like(source.masks),
                        regions=source.regions, has_region=source.has_region,
                        label_names=source.label_names, label_idx=source.label_idx)
