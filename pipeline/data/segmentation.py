"""`prepare.source: segmentation`: the common semantic-segmentation layout, class-index masks.

    <root>/<images_dir>/<split>/<id>.<ext>       images (any image format; sub-folders kept)
    <root>/<masks_dir>/<split>/<id><mask_ext>    one class index per pixel: 0 background,
                                                 k > 0 the class prepare.segmentation.class_names[k]

This is the layout of NEU-Seg (`img_dir/` + `ann_dir/`, `{train,val,test}`, ../shared/data/neu-seg)
and of most segmentation releases (mmsegmentation's `img_dir` / `ann_dir`). The dataset's own
split folders are pooled and re-split by `prepare.split` like every source (stratified, grouped
by source image), so a patch never lands in another split than its image.

Classes are `class_names` in index order. A whole-image row (`prepare.resize: crop | stretch`)
takes the class with the most pixels (a tie: the lower index); in patch mode each connected
defect component takes the majority class of its own pixels (pipeline/data/patches.py). An
image whose mask is all 0 is a normal image (known defect-free).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline.data import images as im
from pipeline.data.images import BadInput
from pipeline.data.importers import (NORMAL, Collected, Ctx, ImageItem, LoadedImage, NativeImage, _images_in,
                                     _note_other, _rel, _root)
from pipeline.errors import DataError

KEY = "prepare.segmentation"


def class_counts(values: np.ndarray, mask_path: Path, class_names: dict[int, str]) -> np.ndarray:
    """Pixels per index (256,) of a class-index mask; an index `class_names` does not list is a bad file."""
    counts = np.bincount(values.ravel(), minlength=256)
    unknown = [int(v) for v in np.flatnonzero(counts) if v != 0 and int(v) not in class_names]
    if unknown:
        shown = ", ".join(f"{v} ({counts[v]} px)" for v in unknown[:5])
        mapping = ", ".join(f"{k}: {n}" for k, n in sorted(class_names.items()))
        hint = (" (values 0/255 look like a black-and-white drawing of the mask, not class indices)"
                if unknown == [255] else "")
        raise BadInput(mask_path, f"holds class index {shown} that {KEY}.class_names does not list "
                                  f"(it maps {{{mapping}}}; 0 is background){hint}",
                       f"add the index and its class name to {KEY}.class_names, or fix the mask")
    return counts


def majority_class(counts: np.ndarray, class_names: dict[int, str]) -> str:
    """The class with the most pixels (a tie: the lower index); normal when no pixel is > 0."""
    defect = counts[1:]
    if not defect.any():
        return NORMAL
    return class_names[int(np.argmax(defect)) + 1]   # argmax: the first (lowest) index of a tie


@dataclass
class SegmentationImage(ImageItem):
    """One image and its class-index mask. `label` is only known once the mask is read."""

    path: Path = Path()
    mask_path: Path = Path()
    class_names: dict[int, str] = field(default_factory=dict)

    def load(self, ctx: Ctx) -> LoadedImage:
        image, size = im.load_image(self.path, ctx.channels, ctx.resolution, ctx.resize, ctx.notes)
        values = im.load_index_mask(self.mask_path, size, self.path, ctx.notes)
        counts = class_counts(values, self.mask_path, self.class_names)
        label = majority_class(counts, self.class_names)
        if label == NORMAL:
            return LoadedImage(image, np.zeros((ctx.resolution, ctx.resolution), np.uint8), True, NORMAL)
        from PIL import Image

        binary = Image.fromarray((values > 0).astype(np.uint8) * 255)
        fitted = (np.asarray(im.fit(binary, ctx.resolution, ctx.resize, is_mask=True)) > 127).astype(np.uint8)
        defect_pixels = int(counts[1:].sum())
        mask, has = ctx.checked_mask(im.LoadedMask(fitted, defect_pixels, int(values.max())), self.mask_path)
        return LoadedImage(image, mask, has, label)

    def load_native(self, ctx: Ctx) -> NativeImage:
        image = im.load_image_native(self.path, ctx.channels, ctx.notes)
        height, width = image.shape[:2]
        values = im.load_index_mask(self.mask_path, (width, height), self.path, ctx.notes)
        label = majority_class(class_counts(values, self.mask_path, self.class_names), self.class_names)
        return NativeImage(image, values, dict(self.class_names), True, label)


def collect_segmentation(p) -> Collected:
    sp = p.segmentation
    root = _root(sp.root, f"{KEY}.root",
                 f"the dataset folder holding {sp.images_dir}/ (images) and {sp.masks_dir}/ (class-index masks)")
    images_dir, masks_dir = root / sp.images_dir, root / sp.masks_dir
    layout = (f"{sp.images_dir}/<split>/<id>.<ext> images and {sp.masks_dir}/<split>/<id>{sp.mask_ext} "
              "class-index masks")
    for folder, key in ((images_dir, "images_dir"), (masks_dir, "masks_dir")):
        if not folder.is_dir():
            raise DataError(f"{KEY}.root: {root} has no {folder.name}/ folder ({KEY}.{key}). The segmentation "
                            f"layout is {layout}; set {KEY}.{key} to the folder's name.")
    col = Collected(classes=[sp.class_names[k] for k in sorted(sp.class_names)], root=str(root))
    if sp.splits:
        folders = [images_dir / s for s in sp.splits if (images_dir / s).is_dir()]
        missing = [s for s in sp.splits if not (images_dir / s).is_dir()]
        if not folders:
            present = sorted(d.name for d in images_dir.iterdir() if d.is_dir() and not d.name.startswith("."))
            raise DataError(f"{KEY}.splits: {images_dir} has none of the folders {sp.splits}"
                            + (f" (it has {', '.join(present)})" if present else "")
                            + f". Set {KEY}.splits to its sub-folders, or to [] when the images lie directly "
                              f"in {sp.images_dir}/.")
        if missing:
            col.notes.append(f"segmentation source: split folder(s) {', '.join(missing)} of {KEY}.splits not "
                             f"found in {images_dir}, read the others")
    else:
        folders = [images_dir]
    files: list[Path] = []
    for folder in folders:
        found, other = _images_in(folder, col)
        files += found
        _note_other(col.notes, other, root)
    if not files:
        raise DataError(f"{KEY}.root: no image files under {', '.join(str(f) for f in folders)} "
                        f"(extensions {', '.join(im.IMAGE_EXTS)}). Expected {layout}.")
    stems: dict[str, int] = {}
    for f in files:
        key = f.relative_to(images_dir).with_suffix("").as_posix()
        stems[key] = stems.get(key, 0) + 1
    used_masks = set()
    for f in files:
        rel_in = f.relative_to(images_dir)
        mask = masks_dir / rel_in.with_suffix(sp.mask_ext)
        rel = _rel(f, root)
        if not mask.is_file():
            col.problems.append(BadInput(f, f"has no mask (looked for {mask})",
                                         f"add its class-index mask, or fix {KEY}.masks_dir / {KEY}.mask_ext"))
            continue
        used_masks.add(mask)
        # x.png and x.jpg share one mask: one picture saved twice, one source (one split).
        sid = rel if stems[rel_in.with_suffix("").as_posix()] == 1 else rel[: -len(f.suffix)]
        col.images.append(SegmentationImage(id=rel, label="", source_id=sid, source_path=rel, path=f,
                                            mask_path=mask, class_names=dict(sp.class_names)))
    mask_folders = [masks_dir / s for s in sp.splits] if sp.splits else [masks_dir]
    stray = [m for d in mask_folders if d.is_dir() for m in _images_in(d)[0] if m not in used_masks]
    if stray:
        shown = ", ".join(_rel(m, root) for m in stray[:5])
        more = " ..." if len(stray) > 5 else ""
        col.notes.append(f"{len(stray)} mask file(s) without an image ignored: {shown}{more}")
    where = ", ".join(_rel(f, root) for f in folders)
    col.notes.append(f"segmentation source: {len(files)} image(s) from {where}, pooled and re-split by "
                     f"prepare.split; classes by mask index {dict(sorted(sp.class_names.items()))}; an image "
                     "takes its majority class, a patch its component's")
    return col
