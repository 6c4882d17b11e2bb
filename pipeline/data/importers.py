"""Data sources: list what to import (cheap), then load each item on demand.

`collect(params)` returns a `Collected`: the defect classes in order, the image items and pair
items to load, notes, and problems found while listing (files that cannot be used). Layout
problems that make the whole source unusable (missing root, empty class folder, ...) raise
`DataError` right away. Loading an item (`item.load(ctx)`) opens, validates, converts and
resizes its files and raises `BadInput` for a bad file; `prepare` stops or skips on it.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from pipeline.data import images as im
from pipeline.data.images import BadInput
from pipeline.errors import DataError

NORMAL = "normal"
DEFECT = "defect"


# --------------------------------------------------------------------------- loaded results

@dataclass
class Ctx:
    resolution: int
    channels: int
    resize: str
    mask_threshold: int
    notes: Counter = field(default_factory=Counter)


@dataclass
class LoadedImage:
    image: np.ndarray          # HxWxC uint8
    mask: np.ndarray           # HxW uint8 0/1
    has_mask: bool


@dataclass
class LoadedPair:
    a: np.ndarray
    b: np.ndarray
    mask: np.ndarray
    has_mask: bool


# --------------------------------------------------------------------------- items

@dataclass
class ImageItem:
    id: str
    label: str
    source_id: str
    source_path: str

    def load(self, ctx: Ctx) -> LoadedImage:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass
class FileImage(ImageItem):
    path: Path = Path()
    mask_path: Optional[Path] = None
    mask_mode: str = "file"            # "empty" (normal: known all-zero), "file" (use mask_path if any)
    masks_required: bool = False
    mask_hint: str = ""                # where the mask was looked for (for messages)

    def load(self, ctx: Ctx) -> LoadedImage:
        if self.mask_mode == "file" and self.mask_path is None and self.masks_required:
            raise BadInput(self.path, f"has no mask (looked for {self.mask_hint})",
                           "add the mask file, fix prepare.folder.mask_pattern, or set "
                           "prepare.folder.masks_required: false")
        image, size = im.load_image(self.path, ctx.channels, ctx.resolution, ctx.resize, ctx.notes)
        zero = np.zeros((ctx.resolution, ctx.resolution), np.uint8)
        if self.mask_mode == "empty":
            return LoadedImage(image, zero, True)
        if self.mask_path is None:
            return LoadedImage(image, zero, False)
        mask = im.load_mask(self.mask_path, ctx.mask_threshold, ctx.resolution, ctx.resize, size, self.path)
        return LoadedImage(image, mask, True)


@dataclass
class SyntheticItem(ImageItem):
    spec: tuple = ()

    def load(self, ctx: Ctx) -> LoadedImage:
        from pipeline.data.synthetic import render_spec

        clean, mask, bad = render_spec(self.spec, ctx.resolution, ctx.channels)
        return LoadedImage(clean if bad is None else bad, mask, True)


@dataclass
class PairItem:
    id: str
    label: str
    source_id: str
    source_path: str
    add_to_images: bool = False        # also write A (normal) and B (label) rows to images.parquet
    a_source_path: str = ""
    b_source_path: str = ""

    def load(self, ctx: Ctx) -> LoadedPair:  # pragma: no cover - abstract
        raise NotImplementedError


def _pair_mask(a: np.ndarray, b: np.ndarray, mask_path: Optional[Path], size, image_path, ctx: Ctx,
               diff_threshold: int) -> tuple[np.ndarray, bool]:
    if mask_path is not None:
        return im.load_mask(mask_path, ctx.mask_threshold, ctx.resolution, ctx.resize, size, image_path), True
    if diff_threshold > 0:
        diff = np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2)
        return (diff > diff_threshold).astype(np.uint8), True
    return np.zeros(a.shape[:2], np.uint8), False


@dataclass
class FilePair(PairItem):
    a_path: Path = Path()
    b_path: Path = Path()
    mask_path: Optional[Path] = None
    diff_threshold: int = 0

    def load(self, ctx: Ctx) -> LoadedPair:
        a_img = im.open_image(self.a_path)
        b_img = im.open_image(self.b_path)
        if a_img.size != b_img.size:
            raise BadInput(self.b_path, f"is {b_img.width}x{b_img.height} but its A image {self.a_path} is "
                                        f"{a_img.width}x{a_img.height}", "re-export A and B at the same size")
        size = a_img.size
        a = im.image_array(im.fit(im.to_channels(a_img, ctx.channels, ctx.notes), ctx.resolution, ctx.resize))
        b = im.image_array(im.fit(im.to_channels(b_img, ctx.channels, ctx.notes), ctx.resolution, ctx.resize))
        mask, has = _pair_mask(a, b, self.mask_path, size, self.b_path, ctx, self.diff_threshold)
        return LoadedPair(a, b, mask, has)


@dataclass
class ABPair(PairItem):
    path: Path = Path()
    mask_path: Optional[Path] = None
    diff_threshold: int = 0

    def load(self, ctx: Ctx) -> LoadedPair:
        img = im.open_image(self.path)
        if img.width % 2 or img.width < 2:
            raise BadInput(self.path, f"is {img.width} px wide; a side-by-side AB image needs an even width "
                                      "(A = left half, B = right half)",
                           "re-export it, or set prepare.paired.layout: split with A/ and B/ folders")
        half = img.width // 2
        a_img = img.crop((0, 0, half, img.height))
        b_img = img.crop((half, 0, img.width, img.height))
        size = a_img.size
        a = im.image_array(im.fit(im.to_channels(a_img, ctx.channels, ctx.notes), ctx.resolution, ctx.resize))
        b = im.image_array(im.fit(im.to_channels(b_img, ctx.channels, ctx.notes), ctx.resolution, ctx.resize))
        mask, has = _pair_mask(a, b, self.mask_path, size, self.path, ctx, self.diff_threshold)
        return LoadedPair(a, b, mask, has)


@dataclass
class SyntheticPair(PairItem):
    spec: tuple = ()

    def load(self, ctx: Ctx) -> LoadedPair:
        from pipeline.data.synthetic import render_spec

        clean, mask, bad = render_spec(self.spec, ctx.resolution, ctx.channels)
        return LoadedPair(clean, bad, mask, True)


@dataclass
class Collected:
    classes: list[str]                                  # defect classes in label order (no "normal")
    images: list[ImageItem] = field(default_factory=list)
    pairs: list[PairItem] = field(default_factory=list)
    problems: list[BadInput] = field(default_factory=list)   # unusable files found while listing
    notes: list[str] = field(default_factory=list)
    root: Optional[str] = None


# --------------------------------------------------------------------------- helpers

def _root(value: str, key: str, what: str) -> Path:
    root = Path(value).expanduser()
    if not root.exists():
        raise DataError(f"{key}: {root} does not exist. Set {key} to {what}.")
    if not root.is_dir():
        raise DataError(f"{key}: {root} is not a folder. Set {key} to {what}.")
    return root.absolute()


def _rel(path: Path, root: Path) -> str:
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return path.as_posix()


def _images_in(folder: Path) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `folder`, recursively, sorted; hidden entries ignored."""
    imgs, other = [], []
    for p in sorted(folder.rglob("*")):
        if any(part.startswith(".") for part in p.relative_to(folder).parts) or not p.is_file():
            continue
        (imgs if im.is_image_file(p) else other).append(p)
    return imgs, other


def _require_images(folder: Path, files: list[Path], what: str) -> None:
    if not files:
        raise DataError(f"{what} folder {folder} is empty (no image files: {', '.join(im.IMAGE_EXTS)}). "
                        "Add images to it or remove the folder.")


def _note_other(notes: list[str], other: list[Path], root: Path) -> None:
    if other:
        shown = ", ".join(_rel(p, root) for p in other[:5])
        notes.append(f"{len(other)} non-image file(s) ignored (extension not in {', '.join(im.IMAGE_EXTS)}): "
                     f"{shown}{' ...' if len(other) > 5 else ''}")


# --------------------------------------------------------------------------- synthetic

def collect_synthetic(p) -> Collected:
    from pipeline.data.synthetic import specs

    sp = p.synthetic
    layout = sp.layout()
    col = Collected(classes=list(layout.class_counts), root=None)
    for spec in specs(sp, p.seed):
        kind, label, index, texture = spec[0], spec[1], spec[2], spec[3]
        sid = f"synthetic/{kind}/{label}/{index:05d}"
        path = f"synthetic://{texture}/{kind}/{label}/{index:05d}"
        if kind == "pair":
            col.pairs.append(SyntheticPair(id=f"pair/{label}/{index:05d}", label=label, source_id=sid,
                                           source_path=path, spec=spec))
        else:
            col.images.append(SyntheticItem(id=f"{label}/{index:05d}", label=label, source_id=sid,
                                            source_path=path, spec=spec))
    col.notes.append(f"synthetic source ({sp.preset} preset): {len(layout.class_counts)} defect classes on "
                     f"textures {', '.join(layout.textures)}, seed {p.seed}")
    return col


# --------------------------------------------------------------------------- folder

def _mask_for(image: Path, pattern: Optional[str], root: Path, class_dir: Path) -> Optional[Path]:
    if not pattern:
        return None
    rel_parent = image.parent.relative_to(root).as_posix()
    text = pattern.format(stem=image.stem, name=image.name, ext=image.suffix.lstrip("."),
                          folder=image.parent.name, **{"class": class_dir.name}, rel=rel_parent, root=str(root))
    cand = Path(text)
    if not cand.is_absolute():
        cand = image.parent / cand
    return Path(_normpath(cand))


def _normpath(p: Path) -> str:
    import os

    return os.path.normpath(str(p))


def collect_folder(p) -> Collected:
    fp = p.folder
    root = _root(fp.root, "prepare.folder.root", "a folder with one sub-folder per class (e.g. normal/, scratch/)")
    col = Collected(classes=[], root=str(root))
    dirs = sorted(d for d in root.iterdir()
                  if d.is_dir() and not d.name.startswith(".") and d.name not in fp.exclude_dirs)
    if not dirs:
        raise DataError(f"prepare.folder.root: {root} has no class sub-folders. Put each class in its own "
                        f"folder (normal images in one of: {', '.join(fp.normal_names)}).")
    regex = re.compile(fp.class_regex) if fp.class_regex else None
    source_re = re.compile(fp.source_regex) if fp.source_regex else None
    has_normal = False
    for d in dirs:
        name = d.name
        if name in fp.normal_names:
            cls = NORMAL
        elif name in fp.class_map:
            cls = fp.class_map[name]
        elif regex is not None:
            m = regex.search(name)
            if not m or not m.group(1):
                col.notes.append(f"folder {_rel(d, root)} ignored: its name does not match "
                                 f"prepare.folder.class_regex {fp.class_regex!r}")
                continue
            cls = m.group(1)
        else:
            cls = name
        if cls in fp.normal_names:
            cls = NORMAL
        files, other = _images_in(d)
        _note_other(col.notes, other, root)
        masks = {m for f in files if (m := _mask_for(f, fp.mask_pattern, root, d)) is not None and m != Path(_normpath(f))}
        imgs = [f for f in files if Path(_normpath(f)) not in masks]
        _require_images(d, imgs, f"class '{cls}'")
        if cls == NORMAL:
            has_normal = True
        elif cls not in col.classes:
            col.classes.append(cls)
        for f in imgs:
            rel = _rel(f, root)
            sid = rel
            if source_re is not None and (m := source_re.search(f.stem)) and m.group(1):
                sid = m.group(1)
            mask = _mask_for(f, fp.mask_pattern, root, d)
            mask = mask if mask is not None and mask != Path(_normpath(f)) and mask.is_file() else None
            col.images.append(FileImage(
                id=rel, label=cls, source_id=sid, source_path=rel, path=f, mask_path=mask,
                mask_mode="empty" if cls == NORMAL else "file", masks_required=fp.masks_required,
                mask_hint=str(_mask_for(f, fp.mask_pattern, root, d)) if fp.mask_pattern else
                "nothing: prepare.folder.mask_pattern is not set"))
    if not col.classes:
        raise DataError(f"prepare.folder.root: {root} has no defect class folders, only normal ones "
                        f"({', '.join(fp.normal_names)}). Add one folder per defect class.")
    if not has_normal:
        col.notes.append(f"no normal folder (prepare.folder.normal_names: {fp.normal_names}) found: "
                         "the unpaired normal pool is empty")
    return col


# --------------------------------------------------------------------------- mvtec

def collect_mvtec(p) -> Collected:
    root = _root(p.mvtec.root, "prepare.mvtec.root", "one MVTec AD category folder (e.g. .../mvtec/bottle)")
    if not (root / "test").is_dir() or not ((root / "train" / "good").is_dir() or (root / "test" / "good").is_dir()):
        cats = sorted(d.name for d in root.iterdir() if (d / "test").is_dir())
        hint = f" It contains categories {', '.join(cats[:6])}: point at one of them." if cats else ""
        raise DataError(f"prepare.mvtec.root: {root} is not an MVTec AD category (expected train/good/, "
                        f"test/<defect>/, ground_truth/<defect>/).{hint}")
    col = Collected(classes=[], root=str(root))
    for sub in ("train/good", "test/good"):
        d = root / sub
        if not d.is_dir():
            continue
        files, other = _images_in(d)
        _note_other(col.notes, other, root)
        for f in files:
            rel = _rel(f, root)
            col.images.append(FileImage(id=rel, label=NORMAL, source_id=rel, source_path=rel, path=f,
                                        mask_mode="empty"))
    missing_gt = 0
    for d in sorted(x for x in (root / "test").iterdir() if x.is_dir() and x.name != "good"
                    and not x.name.startswith(".")):
        files, other = _images_in(d)
        _note_other(col.notes, other, root)
        _require_images(d, files, f"MVTec defect '{d.name}'")
        col.classes.append(d.name)
        for f in files:
            rel = _rel(f, root)
            gt = root / "ground_truth" / d.name / f"{f.stem}_mask.png"
            if not gt.is_file():
                missing_gt += 1
            col.images.append(FileImage(id=rel, label=d.name, source_id=rel, source_path=rel, path=f,
                                        mask_path=gt if gt.is_file() else None, mask_mode="file",
                                        mask_hint=str(gt)))
    if not col.classes:
        raise DataError(f"prepare.mvtec.root: {root}/test has no defect folders (only good/).")
    if missing_gt:
        col.notes.append(f"{missing_gt} MVTec defect image(s) without ground_truth/<defect>/<stem>_mask.png: "
                         "written with has_mask false")
    return col


# --------------------------------------------------------------------------- cyclegan

def collect_cyclegan(p) -> Collected:
    root = _root(p.cyclegan.root, "prepare.cyclegan.root", "a folder with trainA/ (normal) and trainB/ (defect)")
    for need in ("trainA", "trainB"):
        if not (root / need).is_dir():
            raise DataError(f"prepare.cyclegan.root: {root} has no {need}/ folder. A CycleGAN layout is "
                            "trainA/ testA/ (normal) and trainB/ testB/ (defect).")
    col = Collected(classes=[DEFECT], root=str(root))
    for sub, label in (("trainA", NORMAL), ("testA", NORMAL), ("trainB", DEFECT), ("testB", DEFECT)):
        d = root / sub
        if not d.is_dir():
            continue
        files, other = _images_in(d)
        _note_other(col.notes, other, root)
        if sub.startswith("train"):
            _require_images(d, files, f"CycleGAN {sub}")
        for f in files:
            rel = _rel(f, root)
            col.images.append(FileImage(id=rel, label=label, source_id=rel, source_path=rel, path=f,
                                        mask_mode="empty" if label == NORMAL else "file"))
    col.notes.append("cyclegan source: trainA/testA are 'normal', trainB/testB are 'defect' (no masks); "
                     "train/test folders are pooled and re-split by prepare.split")
    return col


# --------------------------------------------------------------------------- paired

def collect_paired(p) -> Collected:
    pp = p.paired
    root = _root(pp.root, "prepare.paired.root",
                 "a folder with A/ (clean) and B/ (defective) images of the same names, or AB images")
    col = Collected(classes=[DEFECT], root=str(root))
    masks_dir = root / "masks"

    def mask_for(stem_rel: str) -> Optional[Path]:
        for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
            cand = masks_dir / f"{stem_rel}{ext}"
            if cand.is_file():
                return cand
        return None

    if pp.layout == "split":
        a_dir, b_dir = root / "A", root / "B"
        for d in (a_dir, b_dir):
            if not d.is_dir():
                raise DataError(f"prepare.paired.root: {root} has no {d.name}/ folder. The 'split' layout is "
                                "A/ (clean) and B/ (defective) with matching file names; for side-by-side "
                                "images set prepare.paired.layout: AB.")
        a_files, other = _images_in(a_dir)
        b_files, other_b = _images_in(b_dir)
        _note_other(col.notes, other + other_b, root)
        _require_images(a_dir, a_files, "paired A")
        _require_images(b_dir, b_files, "paired B")
        b_by_stem = {}
        for f in b_files:
            b_by_stem.setdefault(Path(_rel(f, b_dir)).with_suffix("").as_posix(), f)
        used = set()
        for a in a_files:
            rel_a = _rel(a, a_dir)
            key = Path(rel_a).with_suffix("").as_posix()
            b = b_dir / rel_a if (b_dir / rel_a).is_file() else b_by_stem.get(key)
            if b is None:
                col.problems.append(BadInput(a, f"has no matching B image (looked for B/{key}.*)",
                                             "add the B image or remove the A image"))
                continue
            used.add(b)
            col.pairs.append(FilePair(id=key, label=DEFECT, source_id=key, source_path=f"A/{rel_a}|B/{_rel(b, b_dir)}",
                                      add_to_images=True, a_source_path=f"A/{rel_a}",
                                      b_source_path=f"B/{_rel(b, b_dir)}", a_path=a, b_path=b,
                                      mask_path=mask_for(key), diff_threshold=pp.diff_mask_threshold))
        for b in b_files:
            if b not in used:
                col.problems.append(BadInput(b, "has no matching A image", "add the A image or remove the B image"))
    else:
        files, other = [], []
        for f in _images_in(root)[0]:
            if _rel(f, root).split("/")[0] != "masks":
                files.append(f)
        _require_images(root, files, "paired AB")
        for f in files:
            key = Path(_rel(f, root)).with_suffix("").as_posix()
            col.pairs.append(ABPair(id=key, label=DEFECT, source_id=key, source_path=_rel(f, root),
                                    add_to_images=True, a_source_path=_rel(f, root) + "#A",
                                    b_source_path=_rel(f, root) + "#B", path=f,
                                    mask_path=mask_for(key), diff_threshold=pp.diff_mask_threshold))
    if pp.diff_mask_threshold == 0 and not masks_dir.is_dir():
        col.notes.append("paired source: no masks/ folder and prepare.paired.diff_mask_threshold is 0: "
                         "pairs have has_mask false")
    col.notes.append("paired source: A images are also written to images.parquet as 'normal' and B images as "
                     "'defect' (same source_id, so A images are not in the unpaired normal pool)")
    return col


# --------------------------------------------------------------------------- elpv

def collect_elpv(p) -> Collected:
    ep = p.elpv
    try:
        import elpv_dataset.utils as eu
    except ImportError:
        raise DataError("prepare.source is 'elpv' but the elpv-dataset package is not installed. "
                        "Install it with `pip install elpv-dataset` (or `pip install -e .[elpv]`).") from None
    labels = Path(eu.__file__).parent / "data" / "labels.csv"
    if not labels.is_file():
        raise DataError(f"elpv-dataset is installed but {labels} is missing. Reinstall elpv-dataset.")
    # Same parsing as elpv_dataset.utils.load_dataset, but images are read lazily (only those kept).
    data = np.genfromtxt(labels, dtype=["|S19", "<f8", "|S4"], names=["path", "probability", "type"])
    paths = np.char.decode(data["path"])
    probs = data["probability"]
    types = np.char.decode(data["type"])
    keep_type = np.ones(len(paths), bool) if ep.cell_type == "any" else types == ep.cell_type
    normal_idx = np.flatnonzero(keep_type & (probs == 0))
    defect_idx = np.flatnonzero(keep_type & (probs >= ep.defect_threshold))
    left_out = int((keep_type & (probs > 0) & (probs < ep.defect_threshold)).sum())
    rng = np.random.default_rng([p.seed, 7])
    col = Collected(classes=[DEFECT], root=str(labels.parent))
    for label, idx in ((NORMAL, normal_idx), (DEFECT, defect_idx)):
        if ep.per_class and len(idx) > ep.per_class:
            idx = np.sort(rng.choice(idx, size=ep.per_class, replace=False))
        for i in idx:
            rel = str(paths[i])
            stem = Path(rel).stem
            col.images.append(FileImage(id=f"{label}/{stem}", label=label, source_id=stem,
                                        source_path=f"elpv:{rel}", path=labels.parent / rel,
                                        mask_mode="empty" if label == NORMAL else "file"))
    col.notes.append(f"elpv source: {len(normal_idx)} normal (probability 0) and {len(defect_idx)} defect "
                     f"(probability >= {ep.defect_threshold:g}) cells available, cell_type {ep.cell_type}; "
                     f"{left_out} cells with probability in (0, {ep.defect_threshold:g}) left out; "
                     "no masks (defect has_mask false); images CC BY-NC-SA 4.0")
    return col


COLLECTORS = {
    "synthetic": collect_synthetic,
    "folder": collect_folder,
    "mvtec": collect_mvtec,
    "cyclegan": collect_cyclegan,
    "paired": collect_paired,
    "elpv": collect_elpv,
}


def collect(p) -> Collected:
    try:
        fn = COLLECTORS[p.source]
    except KeyError:
        from pipeline.errors import ParamsError

        raise ParamsError(f"params key 'prepare.source' is {p.source!r}; allowed values: "
                          f"{', '.join(map(repr, COLLECTORS))}.") from None
    return fn(p)
