"""Data sources: list what to import (cheap), then load each item on demand.

`collect(params)` returns a `Collected`: the defect classes in order, the image items and pair
items to load, notes, and problems found while listing (files that cannot be used). Layout
problems that make the whole source unusable (missing root, empty class folder, ...) raise
`DataError` right away. Loading an item (`item.load(ctx)`) opens, validates, converts and
resizes its files and raises `BadInput` for a bad file; `prepare` stops or skips on it.
"""

from __future__ import annotations

import math
import os
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
    notes: Counter = field(default_factory=im.Notes)

    def checked_mask(self, loaded: im.LoadedMask, mask_path: Path) -> tuple[np.ndarray, bool]:
        """(mask, has_mask): a mask that marks no defect pixel is no mask at all.

        A defect image whose mask is empty would otherwise be written as "known: no defective
        pixels"; it is written with has_mask false (mask unknown) and the file is named in the
        notes, with why it is empty.
        """
        if loaded.mask.any():
            return loaded.mask, True
        if loaded.source_pixels:
            why = (f"mask's defect is too small to survive the resize to {self.resolution} px "
                   "(has_mask false; raise prepare.resolution to keep it)")
        elif loaded.max_value:
            why = (f"mask has no value above prepare.mask_threshold ({self.mask_threshold}) "
                   "(has_mask false; a 0/1 label mask needs prepare.mask_threshold: 0)")
        else:
            why = "mask file is all zero, it marks no defect (has_mask false)"
        im.remark(self.notes, why, mask_path)
        return loaded.mask, False


@dataclass
class LoadedImage:
    image: np.ndarray          # HxWxC uint8
    mask: np.ndarray           # HxW uint8 0/1
    has_mask: bool
    label: Optional[str] = None   # the image's class when only its mask tells (segmentation); None: item.label


@dataclass
class NativeImage:
    """One image at its own size, for patch mode (`prepare.resize: patches`, pipeline/data/patches.py)."""

    image: np.ndarray          # HxWxC uint8, as displayed
    mask: np.ndarray           # HxW uint8: 0 background, > 0 defect (a class index where `classes` is set)
    classes: Optional[dict[int, str]]   # mask value -> class name; None: every defect pixel is of `label`
    has_mask: bool             # false: the mask is unknown (no file, or it marks nothing)
    label: str                 # the image's class (normal, or its defect class)
    why_no_mask: str = ""      # when has_mask is false: why, for stats.json


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

    def _require_mask(self) -> None:
        if self.mode_needs_mask() and self.masks_required:
            raise BadInput(self.path, f"has no mask (looked for {self.mask_hint})",
                           "add the mask file, fix prepare.folder.mask_pattern, or set "
                           "prepare.folder.masks_required: false")

    def mode_needs_mask(self) -> bool:
        return self.mask_mode == "file" and self.mask_path is None

    def load(self, ctx: Ctx) -> LoadedImage:
        self._require_mask()
        image, size = im.load_image(self.path, ctx.channels, ctx.resolution, ctx.resize, ctx.notes)
        zero = np.zeros((ctx.resolution, ctx.resolution), np.uint8)
        if self.mask_mode == "empty":
            return LoadedImage(image, zero, True)
        if self.mask_path is None:
            return LoadedImage(image, zero, False)
        loaded = im.load_mask(self.mask_path, ctx.mask_threshold, ctx.resolution, ctx.resize, size, self.path,
                              ctx.notes)
        return LoadedImage(image, *ctx.checked_mask(loaded, self.mask_path))

    def load_native(self, ctx: Ctx) -> NativeImage:
        """The image and its 0/1 mask at the file's own size (patch mode)."""
        self._require_mask()
        image = im.load_image_native(self.path, ctx.channels, ctx.notes)
        height, width = image.shape[:2]
        zero = np.zeros((height, width), np.uint8)
        if self.mask_mode == "empty":
            return NativeImage(image, zero, None, True, self.label)
        if self.mask_path is None:
            return NativeImage(image, zero, None, False, self.label, f"has no mask (looked for {self.mask_hint})")
        mask, max_value = im.load_binary_mask_native(self.mask_path, ctx.mask_threshold, (width, height),
                                                     self.path, ctx.notes)
        if mask.any():
            return NativeImage(image, mask, None, True, self.label)
        why = (f"its mask {self.mask_path} has no value above prepare.mask_threshold ({ctx.mask_threshold}); a 0/1 "
               "label mask needs prepare.mask_threshold: 0" if max_value else
               f"its mask {self.mask_path} is all zero, it marks no defect")
        return NativeImage(image, mask, None, False, self.label, why)


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


@dataclass
class PairMaskSource:
    """Where a file pair's mask comes from, first that applies: a mask file, box annotations,
    the A/B difference (`diff_threshold` > 0); else the mask is unknown."""

    mask_path: Optional[Path] = None
    boxes: Optional["BoxFile"] = None
    diff_threshold: int = 0


def _load_file_pair(a_img, b_img, b_path: Path, src: PairMaskSource, ctx: Ctx) -> LoadedPair:
    """Convert and resize A and B (same displayed size) and build the pair's mask."""
    size = a_img.size
    a = im.image_array(im.fit(im.to_channels(a_img, ctx.channels, ctx.notes), ctx.resolution, ctx.resize))
    b = im.image_array(im.fit(im.to_channels(b_img, ctx.channels, ctx.notes), ctx.resolution, ctx.resize))
    if np.array_equal(a, b):
        raise BadInput(b_path, "is identical to its A (clean) image after conversion: the pair shows no defect",
                       "pair it with its real defective image, or remove the pair")
    if src.mask_path is not None:
        loaded = im.load_mask(src.mask_path, ctx.mask_threshold, ctx.resolution, ctx.resize, size, b_path,
                              ctx.notes)
        mask, has = ctx.checked_mask(loaded, src.mask_path)
    elif src.boxes is not None:
        mask, has = src.boxes.mask(size, ctx), True
    elif src.diff_threshold > 0:
        mask = (np.abs(a.astype(np.int16) - b.astype(np.int16)).max(axis=2) > src.diff_threshold).astype(np.uint8)
        has = bool(mask.any())
        if not has:
            im.remark(ctx.notes, "A and B differ nowhere by more than prepare.paired.diff_mask_threshold "
                                 "(has_mask false)", b_path)
    else:
        mask, has = np.zeros(a.shape[:2], np.uint8), False
    return LoadedPair(a, b, mask, has)


@dataclass
class FilePair(PairItem):
    a_path: Path = Path()
    b_path: Path = Path()
    masks: PairMaskSource = field(default_factory=PairMaskSource)

    def load(self, ctx: Ctx) -> LoadedPair:
        a_img = im.open_image(self.a_path, ctx.notes)
        b_img = im.open_image(self.b_path, ctx.notes)
        if a_img.size != b_img.size:
            raise BadInput(self.b_path, f"is {b_img.width}x{b_img.height} but its A image {self.a_path} is "
                                        f"{a_img.width}x{a_img.height}", "re-export A and B at the same size")
        return _load_file_pair(a_img, b_img, self.b_path, self.masks, ctx)


@dataclass
class ABPair(PairItem):
    path: Path = Path()
    masks: PairMaskSource = field(default_factory=PairMaskSource)

    def load(self, ctx: Ctx) -> LoadedPair:
        img = im.open_image(self.path, ctx.notes)
        if img.width % 2 or img.width < 2:
            raise BadInput(self.path, f"is {img.width} px wide; a side-by-side AB image needs an even width "
                                      "(A = left half, B = right half)",
                           "re-export it, or set prepare.paired.layout: split with A/ and B/ folders")
        half = img.width // 2
        a_img = img.crop((0, 0, half, img.height))
        b_img = img.crop((half, 0, img.width, img.height))
        return _load_file_pair(a_img, b_img, self.path, self.masks, ctx)


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
    """`path` relative to `root`, as the text written to ids and stats. A name that is not
    UTF-8 (archives from other systems) keeps its odd bytes as `\\xe9` escapes."""
    try:
        rel = path.relative_to(root).as_posix()
    except ValueError:
        rel = path.as_posix()
    return rel.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _images_in(folder: Path, col: Optional["Collected"] = None) -> tuple[list[Path], list[Path]]:
    """(image files, other files) under `folder`, recursively, sorted; hidden entries ignored.

    Linked folders are followed (a folder reached twice, e.g. by a link back up the tree, is
    read once); a broken link is a problem in `col` (skipped with its reason), not silence.
    """
    imgs, other, seen = [], [], set()

    def walk(d: Path) -> None:
        real = os.path.realpath(d)
        if real in seen:
            return
        seen.add(real)
        for entry in sorted(os.scandir(d), key=lambda e: e.name):
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            if entry.is_dir():
                walk(path)
            elif entry.is_file():
                (imgs if im.is_image_file(path) else other).append(path)
            elif entry.is_symlink() and col is not None:
                col.problems.append(BadInput(path, f"is a broken link (to {os.readlink(path)}, which does not exist)",
                                             "fix the link or remove it"))

    walk(folder)
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
    return os.path.normpath(str(p))


def _mask_key(path: Path) -> str:
    """A path without its image extension (`x_mask.PNG`, `x_mask.jpg` -> `.../x_mask`): masks
    are found whatever image extension, in whatever case, they were saved with."""
    text = _normpath(path)
    stem, ext = os.path.splitext(text)
    return stem if ext.lower() in im.IMAGE_EXTS else text


def _mask_name_regex(pattern: str) -> re.Pattern:
    """A regex for the names (without image extension, as `_mask_key`) that `pattern` gives
    masks (its last path component), capturing stem / name."""
    import string

    last = pattern.replace("\\", "/").rsplit("/", 1)[-1]
    fields = list(string.Formatter().parse(last))
    text, name = fields[-1][0], fields[-1][1]
    if name == "ext" and text.endswith("."):              # "{stem}_mask.{ext}"
        fields[-1] = (text[:-1], None, None, None)
    elif name is None and (ext := next((e for e in im.IMAGE_EXTS if text.lower().endswith(e)), None)):
        fields[-1] = (text[: -len(ext)], None, None, None)                      # "{stem}_mask.png"
    parts, seen = [], set()
    for text, name, _, _ in fields:
        parts.append(re.escape(text))
        if name is None:
            continue
        if name in seen:
            parts.append(f"(?P={name})")
        elif name in ("stem", "name"):
            seen.add(name)
            parts.append(f"(?P<{name}>.+)")
        else:
            parts.append("[^/]+")
    return re.compile("".join(parts) + r"\Z")


class _MaskFinder:
    """Each image's mask by `prepare.folder.mask_pattern`, in one class folder.

    The pattern's file is used when it exists; otherwise the same name with another image
    extension or its case (`x_mask.PNG`, `x_mask.jpg` for `{stem}_mask.png`), counted in
    `other_extension` for a note. A pattern that names the image's own stem (`{stem}.png` for
    `x.jpg`) takes only its exact file, so an image is never taken for another's mask.
    """

    def __init__(self, pattern: Optional[str], root: Path, class_dir: Path):
        self.pattern, self.root, self.class_dir = pattern, root, class_dir
        self.other_extension: list[str] = []
        self._listings: dict[str, dict[str, list[Path]]] = {}

    def expected(self, image: Path) -> Optional[Path]:
        return _mask_for(image, self.pattern, self.root, self.class_dir)

    def find(self, image: Path) -> Optional[Path]:
        cand = self.expected(image)
        if cand is None or _normpath(cand) == _normpath(image):
            return None
        if cand.is_file():
            return cand
        if _mask_key(cand) == _mask_key(image):
            return None
        hits = [h for h in self._listing(cand.parent).get(_mask_key(cand), []) if _normpath(h) != _normpath(image)]
        if not hits:
            return None
        self.other_extension.append(f"{_rel(hits[0], self.root)} for {cand.name}")
        return hits[0]

    def _listing(self, folder: Path) -> dict[str, list[Path]]:
        key = _normpath(folder)
        if key not in self._listings:
            by_key: dict[str, list[Path]] = {}
            if folder.is_dir():
                for entry in sorted(os.scandir(folder), key=lambda e: e.name):
                    if entry.is_file() and not entry.name.startswith("."):
                        by_key.setdefault(_mask_key(Path(entry.path)), []).append(Path(entry.path))
            self._listings[key] = by_key
        return self._listings[key]

    def orphans(self, files: list[Path], owned: set[str]) -> dict[Path, Path]:
        """{file: the image it would be the mask of} for files named like a mask whose image
        does not exist. Without this they would be imported as defect images.

        A file is named like a mask when some image name in one of the class's folders would
        have it as its mask. A pattern that maps a name onto itself (``{stem}.png`` and a PNG
        image) cannot tell a lone mask from an image: such files stay images.
        """
        if not self.pattern:
            return {}
        regex = _mask_name_regex(self.pattern)
        folders = sorted({f.parent for f in files} | {self.class_dir})
        found = {}
        for f in files:
            key = _mask_key(f)
            if _normpath(f) in owned or not (m := regex.match(os.path.basename(key))):
                continue
            groups = m.groupdict()
            stem = groups.get("stem") or Path(groups.get("name") or "").stem
            name = groups.get("name") or f"{stem}.png"
            for folder in folders:
                image = folder / name
                expected = self.expected(image)
                if _mask_key(image) != key and expected is not None and _mask_key(expected) == key:
                    found[f] = folder / stem
                    break
        return found


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
    normal_with_mask: list[str] = []
    other_extension: list[str] = []
    same_stem: list[str] = []
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
        files, other = _images_in(d, col)
        _note_other(col.notes, other, root)
        finder = _MaskFinder(fp.mask_pattern, root, d)
        mask_of = {f: finder.find(f) for f in files}
        owned = {_normpath(m) for m in mask_of.values() if m is not None}
        orphans = finder.orphans(files, owned)
        for f, image in orphans.items():
            col.problems.append(BadInput(f, f"is named like a mask (prepare.folder.mask_pattern "
                                            f"{fp.mask_pattern!r}) but its image {image}.* does not exist; "
                                            "it is not imported as an image",
                                         "add its image, delete the stray mask, or change "
                                         "prepare.folder.mask_pattern"))
        imgs = [f for f in files if _normpath(f) not in owned and f not in orphans]
        _require_images(d, imgs, f"class '{cls}'")
        other_extension += finder.other_extension
        # x.png and x.jpg in one folder are one picture saved twice: one source, one split.
        stems = Counter((f.parent, f.stem) for f in imgs)
        if cls == NORMAL:
            has_normal = True
        elif cls not in col.classes:
            col.classes.append(cls)
        for f in imgs:
            rel = _rel(f, root)
            sid = rel
            if stems[(f.parent, f.stem)] > 1:
                sid = rel[: -len(f.suffix)]
                same_stem.append(rel)
            if source_re is not None and (m := source_re.search(f.stem)) and m.group(1):
                sid = m.group(1)
            mask = mask_of[f]
            if cls == NORMAL and mask is not None:
                normal_with_mask.append(rel)
            col.images.append(FileImage(
                id=rel, label=cls, source_id=sid, source_path=rel, path=f, mask_path=mask,
                mask_mode="empty" if cls == NORMAL else "file", masks_required=fp.masks_required,
                mask_hint=f"{finder.expected(f)} or that name with another image extension" if fp.mask_pattern
                else "nothing: prepare.folder.mask_pattern is not set"))
    if not col.classes:
        raise DataError(f"prepare.folder.root: {root} has no defect class folders, only normal ones "
                        f"({', '.join(fp.normal_names)}). Add one folder per defect class.")
    if not has_normal:
        col.notes.append(f"no normal folder (prepare.folder.normal_names: {fp.normal_names}) found: "
                         "the unpaired normal pool is empty")
    for files, what in ((normal_with_mask, "normal image(s) have a mask file, ignored (normal images are written "
                                           "with an empty mask)"),
                        (other_extension, f"mask(s) found with another image extension than "
                                          f"prepare.folder.mask_pattern {fp.mask_pattern!r} gives"),
                        (same_stem, "image(s) share folder and name with an image of another extension "
                                    "(x.png + x.jpg): each such set is one source, kept in one split")):
        if files:
            col.notes.append(f"{len(files)} {what}: {', '.join(files[:5])}{' ...' if len(files) > 5 else ''}")
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
        files, other = _images_in(d, col)
        _note_other(col.notes, other, root)
        for f in files:
            rel = _rel(f, root)
            col.images.append(FileImage(id=rel, label=NORMAL, source_id=rel, source_path=rel, path=f,
                                        mask_mode="empty"))
    missing_gt = 0
    for d in sorted(x for x in (root / "test").iterdir() if x.is_dir() and x.name != "good"
                    and not x.name.startswith(".")):
        files, other = _images_in(d, col)
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
        files, other = _images_in(d, col)
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


# --------------------------------------------------------------------------- box annotations

@dataclass
class Box:
    """One annotated box, corners in the file's units (pixels, or fractions of width/height)."""

    x0: float
    y0: float
    x1: float
    y1: float
    label: str
    line: int


@dataclass
class BoxFile:
    path: Path
    boxes: list[Box]
    units: str                         # "pixel" | "fraction"

    def mask(self, size: tuple[int, int], ctx: Ctx) -> np.ndarray:
        """0/1 mask at the target resolution marking every pixel any box overlaps (all classes).

        Coordinates are continuous (pixel i spans [i, i+1)), so `5,5,12,12` marks pixels 5..11.
        """
        from PIL import Image

        width, height = size
        sx, sy = (width, height) if self.units == "fraction" else (1, 1)
        eps = 1e-6                      # 0.35 * 20 is 7.000000000000001, not a reason to mark pixel 7
        full = np.zeros((height, width), np.uint8)
        clipped = False
        for b in self.boxes:
            c0, c1 = math.floor(b.x0 * sx + eps), math.ceil(b.x1 * sx - eps)
            r0, r1 = math.floor(b.y0 * sy + eps), math.ceil(b.y1 * sy - eps)
            clipped |= c0 < 0 or r0 < 0 or c1 > width or r1 > height
            c0, r0, c1, r1 = max(c0, 0), max(r0, 0), min(c1, width), min(r1, height)
            if c0 >= c1 or r0 >= r1:
                raise BadInput(self.path, f"line {b.line}: the box lies outside its {width}x{height} image",
                               "fix the box, or prepare.paired.boxes.units / columns if the file uses another format")
            full[r0:r1, c0:c1] = 255
        if clipped:
            im.remark(ctx.notes, "box annotations reaching past the image edge clipped to it", self.path)
        fitted = im.fit(Image.fromarray(full), ctx.resolution, ctx.resize, is_mask=True)
        return (np.asarray(fitted) > 127).astype(np.uint8)

    def image_class(self, order: list[str]) -> str:
        """The pair's class: the class whose boxes cover the largest area (union of that class's
        boxes as written); a tie goes to the class that comes first in `order`."""
        area = {c: _union_area([b for b in self.boxes if b.label == c]) for c in {b.label for b in self.boxes}}
        largest = max(area.values())
        # A tie within rounding: 0.9 - 0.7 is 0.19999999999999996 in fractions, 0.2 elsewhere.
        tied = [c for c, a in area.items() if a >= largest * (1 - 1e-9)]
        return min(tied, key=order.index)


def _union_area(boxes: list[Box]) -> float:
    """Exact area covered by axis-aligned boxes (coordinate compression; files hold a few boxes)."""
    xs = sorted({v for b in boxes for v in (b.x0, b.x1)})
    ys = sorted({v for b in boxes for v in (b.y0, b.y1)})
    covered = np.zeros((len(ys) - 1, len(xs) - 1), bool)
    for b in boxes:
        covered[ys.index(b.y0):ys.index(b.y1), xs.index(b.x0):xs.index(b.x1)] = True
    cell = np.diff(ys)[:, None] * np.diff(xs)[None, :]
    return float(cell[covered].sum())


def _corners(v: dict[str, float]) -> tuple[float, float, float, float]:
    if "x1" in v:
        return v["x1"], v["y1"], v["x2"], v["y2"]
    if "cx" in v:
        return v["cx"] - v["w"] / 2, v["cy"] - v["h"] / 2, v["cx"] + v["w"] / 2, v["cy"] + v["h"] / 2
    return v["x"], v["y"], v["x"] + v["w"], v["y"] + v["h"]


def parse_box_file(path: Path, fmt) -> BoxFile:
    """Read one annotation text file in the format of `prepare.paired.boxes` (`fmt`).

    One box per line; blank lines, lines starting with '#' and the first `skip_lines` lines are
    skipped. A malformed line is a `BadInput` naming the file and line.
    """
    key = "prepare.paired.boxes"
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise BadInput(path, "is not a UTF-8 text file", f"save it as text, or fix {key}.pattern") from None
    except OSError as err:
        raise BadInput(path, f"cannot be read ({err.strerror})", "check the path and its permissions") from None
    columns = list(fmt.columns)
    boxes = []
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if n <= fmt.skip_lines or not line or line.startswith("#"):
            continue
        fields = [f.strip() for f in (line.split(fmt.delimiter) if fmt.delimiter else line.split())]
        if len(fields) != len(columns):
            raise BadInput(path, f"line {n} ({line!r}) has {len(fields)} field(s) but {key}.columns has "
                                 f"{len(columns)} ({', '.join(columns)})",
                           f"fix the line, or set {key}.columns / delimiter to the file's format")
        values = dict(zip(columns, fields))
        numbers = {}
        for name in columns:
            if name in ("class", "_"):
                continue
            try:
                numbers[name] = float(values[name])
            except ValueError:
                raise BadInput(path, f"line {n}: {name} is {values[name]!r}, not a number",
                               f"fix the line, or set {key}.columns to the file's column order") from None
            if not math.isfinite(numbers[name]):
                raise BadInput(path, f"line {n}: {name} is {values[name]!r}", "fix the line")
        if fmt.units == "fraction" and max(abs(v) for v in numbers.values()) > 1.01:
            raise BadInput(path, f"line {n}: values above 1 ({line!r}) but {key}.units is fraction",
                           f"set {key}.units: pixel if the file holds pixel coordinates")
        x0, y0, x1, y1 = _corners(numbers)
        if not (x1 > x0 and y1 > y0):
            raise BadInput(path, f"line {n} ({line!r}): the box has no area (x {x0:g}..{x1:g}, y {y0:g}..{y1:g})",
                           f"fix the line, or {key}.columns if the file uses another geometry")
        raw_class = values.get("class", DEFECT)
        if fmt.class_names:
            if raw_class not in fmt.class_names:
                raise BadInput(path, f"line {n}: class {raw_class!r} is not in {key}.class_names "
                                     f"({', '.join(map(repr, fmt.class_names))})",
                               f"add it to {key}.class_names or fix the line")
            label = fmt.class_names[raw_class]
        else:
            label = raw_class
        if label == NORMAL:
            raise BadInput(path, f"line {n}: a box of class '{NORMAL}' (boxes mark defects)",
                           f"rename the class, or map it in {key}.class_names")
        boxes.append(Box(x0, y0, x1, y1, label, n))
    return BoxFile(path, boxes, fmt.units)


# --------------------------------------------------------------------------- paired

@dataclass
class _Found:
    """One pair found by a layout: ids and paths, before masks and classes are attached."""

    key: str                          # pair id, path relative to the root without suffix
    name: str                         # the pair's file id ({id} in boxes.pattern)
    b_path: Path
    a_path: Optional[Path]            # None: side-by-side AB file (b_path)
    source_path: str
    a_source_path: str
    b_source_path: str


def _find_split(root: Path, col: Collected, other: list[Path]) -> list[_Found]:
    a_dir, b_dir = root / "A", root / "B"
    for d in (a_dir, b_dir):
        if not d.is_dir():
            raise DataError(f"prepare.paired.root: {root} has no {d.name}/ folder. The 'split' layout is "
                            "A/ (clean) and B/ (defective) with matching file names; for side-by-side "
                            "images set prepare.paired.layout: AB, for <id>_temp / <id>_test files in one "
                            "folder set it to suffix.")
    a_files, other_a = _images_in(a_dir, col)
    b_files, other_b = _images_in(b_dir, col)
    other += other_a + other_b
    _require_images(a_dir, a_files, "paired A")
    _require_images(b_dir, b_files, "paired B")
    b_by_stem: dict[str, Path] = {}
    for f in b_files:
        b_by_stem.setdefault(Path(_rel(f, b_dir)).with_suffix("").as_posix(), f)
    found, used = [], set()
    for a in a_files:
        rel_a = _rel(a, a_dir)
        key = Path(rel_a).with_suffix("").as_posix()
        b = b_dir / rel_a if (b_dir / rel_a).is_file() else b_by_stem.get(key)
        if b is None:
            col.problems.append(BadInput(a, f"has no matching B image (looked for B/{key}.*)",
                                         "add the B image or remove the A image"))
            continue
        used.add(b)
        rel_b = _rel(b, b_dir)
        found.append(_Found(key, a.stem, b, a, f"A/{rel_a}|B/{rel_b}", f"A/{rel_a}", f"B/{rel_b}"))
    for b in b_files:
        if b not in used:
            col.problems.append(BadInput(b, "has no matching A image", "add the A image or remove the B image"))
    return found


def _find_ab(root: Path, col: Collected) -> list[_Found]:
    files = [f for f in _images_in(root, col)[0] if _rel(f, root).split("/")[0] != "masks"]
    _require_images(root, files, "paired AB")
    found = []
    for f in files:
        rel = _rel(f, root)
        found.append(_Found(Path(rel).with_suffix("").as_posix(), f.stem, f, None, rel, rel + "#A", rel + "#B"))
    return found


def _find_suffix(root: Path, pp, col: Collected) -> list[_Found]:
    """`<id><template_suffix>.<ext>` + `<id><test_suffix>.<ext>` in the same folder (any depth)."""
    files = [f for f in _images_in(root, col)[0] if _rel(f, root).split("/")[0] != "masks"]
    _require_images(root, files, "paired (suffix layout)")
    roles = (("B", pp.test_suffix, "test"), ("A", pp.template_suffix, "template"))
    groups: dict[str, dict[str, list[Path]]] = {}
    unmatched = []
    for f in files:
        for role, suffix, _ in roles:
            if f.stem.endswith(suffix) and len(f.stem) > len(suffix):
                key = (Path(_rel(f.parent, root)) / f.stem[: -len(suffix)]).as_posix()
                groups.setdefault(key, {}).setdefault(role, []).append(f)
                break
        else:
            unmatched.append(f)
    if unmatched:
        shown = ", ".join(_rel(f, root) for f in unmatched[:5])
        col.notes.append(f"{len(unmatched)} image file(s) ignored: their names end in neither "
                         f"{pp.template_suffix!r} nor {pp.test_suffix!r} (prepare.paired.template_suffix / "
                         f"test_suffix): {shown}{' ...' if len(unmatched) > 5 else ''}")
    found = []
    for key in sorted(groups):
        g = groups[key]
        for role, suffix, what in roles:
            for extra in g.get(role, [])[1:]:
                col.problems.append(BadInput(extra, f"is a second {what} image of pair '{key}' (the first is "
                                                    f"{g[role][0]})", "keep one of them"))
        if "A" not in g or "B" not in g:
            have_role, have_what = ("B", "test") if "B" in g else ("A", "template")
            miss_suffix = pp.template_suffix if have_role == "B" else pp.test_suffix
            col.problems.append(BadInput(g[have_role][0], f"is a {have_what} image without its pair (looked for "
                                                          f"{key}{miss_suffix}.* in the same folder)",
                                         "add the missing image or remove this one"))
            continue
        a, b = g["A"][0], g["B"][0]
        rel_a, rel_b = _rel(a, root), _rel(b, root)
        found.append(_Found(key, Path(key).name, b, a, f"{rel_a}|{rel_b}", rel_a, rel_b))
    return found


def _box_path(found: _Found, pattern: str, root: Path) -> Path:
    text = pattern.format(id=found.name, stem=found.b_path.stem, folder=found.b_path.parent.name, root=str(root))
    cand = Path(text)
    return Path(_normpath(cand if cand.is_absolute() else found.b_path.parent / cand))


def collect_paired(p) -> Collected:
    pp = p.paired
    root = _root(pp.root, "prepare.paired.root",
                 "a folder with A/ (clean) and B/ (defective) images of the same names, AB images, or "
                 "<id>_temp / <id>_test images")
    col = Collected(classes=[], root=str(root))
    masks_dir = root / "masks"

    def mask_for(stem_rel: str) -> Optional[Path]:
        for ext in (".png", ".bmp", ".tif", ".tiff", ".jpg"):
            cand = masks_dir / f"{stem_rel}{ext}"
            if cand.is_file():
                return cand
        return None

    other: list[Path] = []
    if pp.layout == "split":
        found = _find_split(root, col, other)
    elif pp.layout == "AB":
        found = _find_ab(root, col)
    else:
        found = _find_suffix(root, pp, col)

    fmt = pp.boxes
    box_files: dict[str, BoxFile] = {}
    for f in found:
        if not fmt.pattern:
            continue
        path = _box_path(f, fmt.pattern, root)
        if not path.is_file():
            col.problems.append(BadInput(f.b_path, f"has no box annotation file (looked for {path})",
                                         "add it, or fix prepare.paired.boxes.pattern"))
            continue
        try:
            boxes = parse_box_file(path, fmt)
        except BadInput as err:
            col.problems.append(err)
            continue
        if not boxes.boxes:
            col.problems.append(BadInput(path, "lists no boxes: its pair shows no defect and is left out",
                                         "remove the pair, or add its boxes"))
            continue
        box_files[f.key] = boxes
    if fmt.pattern:
        seen = {b.label for bf in box_files.values() for b in bf.boxes}
        named = list(dict.fromkeys(fmt.class_names.values())) if fmt.class_names else sorted(seen)
        col.classes = [c for c in named if c in seen]
        found = [f for f in found if f.key in box_files]
        if not found:
            raise DataError(f"prepare.paired.boxes.pattern is {fmt.pattern!r} but no pair has a usable box file "
                            "(see the skipped files). Fix the pattern (placeholders {id}, {stem}, {folder}, "
                            "{root}; relative to the test image's folder) or the box files.")
        several = sum(1 for bf in box_files.values() if len({b.label for b in bf.boxes}) > 1)
        if several:
            col.notes.append(f"{several} pair(s) have boxes of several classes: each is labelled with the class "
                             "whose boxes cover the largest area (tie: the class listed first); its mask marks "
                             "all its boxes")
    else:
        col.classes = [DEFECT]
    used_text = {bf.path for bf in box_files.values()}
    _note_other(col.notes, [o for o in other if Path(_normpath(o)) not in used_text], root)

    for f in found:
        boxes = box_files.get(f.key)
        masks = PairMaskSource(mask_path=mask_for(f.key), boxes=boxes, diff_threshold=pp.diff_mask_threshold)
        label = boxes.image_class(col.classes) if boxes is not None else DEFECT
        common = dict(id=f.key, label=label, source_id=f.key, source_path=f.source_path, add_to_images=True,
                      a_source_path=f.a_source_path, b_source_path=f.b_source_path, masks=masks)
        if f.a_path is None:
            col.pairs.append(ABPair(path=f.b_path, **common))
        else:
            col.pairs.append(FilePair(a_path=f.a_path, b_path=f.b_path, **common))
    if pp.diff_mask_threshold == 0 and not masks_dir.is_dir() and not fmt.pattern:
        col.notes.append("paired source: no masks/ folder, no prepare.paired.boxes.pattern and "
                         "prepare.paired.diff_mask_threshold is 0: pairs have has_mask false")
    col.notes.append("paired source: A images are also written to images.parquet as 'normal' and B images "
                     "with the pair's class (same source_id, so A images are not in the unpaired normal pool)")
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


def _collect_segmentation(p) -> Collected:
    from pipeline.data.segmentation import collect_segmentation   # its own module, built on these items

    return collect_segmentation(p)


COLLECTORS = {
    "synthetic": collect_synthetic,
    "folder": collect_folder,
    "mvtec": collect_mvtec,
    "cyclegan": collect_cyclegan,
    "paired": collect_paired,
    "elpv": collect_elpv,
    "segmentation": _collect_segmentation,
}


def collect(p) -> Collected:
    try:
        fn = COLLECTORS[p.source]
    except KeyError:
        from pipeline.errors import ParamsError

        raise ParamsError(f"params key 'prepare.source' is {p.source!r}; allowed values: "
                          f"{', '.join(map(repr, COLLECTORS))}.") from None
    return fn(p)
