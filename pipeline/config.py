"""Typed params, one dataclass per params.yaml section; the one place params are validated.

`load_params(path)` reads params.yaml and returns a `Params`. Unknown or mistyped keys,
wrong types and out-of-range values raise `ParamsError` naming the dotted key
(`prepare.synthetic.per_class`) and what to do, with a "did you mean" for typos.

Family-specific training params (`train.cyclegan.*`) are dataclasses that live beside each
family in `pipeline/models/<family>.py` and are validated through the same `from_dict`
(pipeline/validation.py, which both this module and the families import).

Imports: nothing of the models or metrics packages at import time, so reading params imports no
torch; `train_params` imports the families when a train section is validated.
"""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, Optional

import yaml

from pipeline.errors import ParamsError
# from_dict / to_dict are re-exported: a params section is built with config.from_dict(Section, ...).
from pipeline.validation import from_dict, positive, require, to_dict

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- prepare

@dataclass
class SplitParams:
    train: float = 0.7
    val: float = 0.15
    test: float = 0.15

    def validate(self, where: str) -> None:
        for name in ("train", "val", "test"):
            require(0 <= getattr(self, name) <= 1, f"{where}.{name}", "must be between 0 and 1.")
        total = self.train + self.val + self.test
        require(abs(total - 1.0) < 1e-6, where, f"fractions must sum to 1, got {total:g}.")
        require(self.train > 0, f"{where}.train", "must be greater than 0.")


# Names the synthetic generator knows (pipeline/data/synthetic.py); aliases render the same way.
SYNTHETIC_DEFECTS = ("scratch", "spot", "stain", "crack", "pit", "dent")
SYNTHETIC_TEXTURES = ("brushed_metal", "woven_fabric", "speckled", "granular")
# ... and those of its production preset (PRODUCTION_DEFECTS / PRODUCTION_TEXTURES there).
PRODUCTION_DEFECTS = ("crack", "pit", "stain")
PRODUCTION_TEXTURES = ("brushed_steel", "cast_matte", "machined")


def _known_names(values: list[str], known: tuple[str, ...], key: str) -> None:
    for value in values:
        if value not in known:
            hint = difflib.get_close_matches(str(value), known, n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ParamsError(f"params key '{key}' has unknown name {value!r}; known: "
                              f"{', '.join(known)}.{extra}")
    require(len(set(values)) == len(values), key, f"lists a name twice: {values!r}.")


def _regex(value: Optional[str], key: str, groups: int = 0) -> None:
    import re

    if value is None:
        return
    try:
        compiled = re.compile(value)
    except re.error as err:
        raise ParamsError(f"params key '{key}' is not a valid regular expression ({err}): {value!r}.") from None
    require(compiled.groups >= groups, key, f"needs a capture group, e.g. '^(\\w+)_', got {value!r}.")


@dataclass
class ProductionPresetParams:
    """`prepare.synthetic.preset: production`: grey inspection images, faint small defects,
    strong class imbalance (pipeline/data/synthetic.py). Meant for `prepare.channels: 1`
    (with 3 channels the grey value is repeated)."""

    # Defect images per class, in label order. Like a real line: tens per class, not hundreds.
    per_class: dict[str, int] = field(default_factory=lambda: {"crack": 40, "pit": 25, "stain": 15})
    normal: int = 400
    paired: int = 30
    textures: list[str] = field(default_factory=lambda: list(PRODUCTION_TEXTURES))

    def validate(self, where: str) -> None:
        key = f"{where}.per_class"
        require(len(self.per_class) >= 1, key, "must map at least one defect class to its image count, "
                                               "e.g. {crack: 40, pit: 25, stain: 15}.")
        _known_names([str(k) for k in self.per_class], PRODUCTION_DEFECTS, key)
        for name, n in self.per_class.items():
            require(n > 0, f"{key}.{name}", f"must be greater than 0, got {n!r}.")
        positive(self, where, "normal")
        require(self.paired >= 0, f"{where}.paired", "must be 0 or more.")
        require(len(self.textures) >= 1, f"{where}.textures", "must name at least one texture.")
        _known_names(self.textures, PRODUCTION_TEXTURES, f"{where}.textures")


@dataclass(frozen=True)
class SyntheticLayout:
    """What the selected synthetic preset renders."""

    class_counts: dict[str, int]   # defect class -> images, in label order
    textures: list[str]
    normal: int
    paired: int


@dataclass
class SyntheticSourceParams:
    """The embedded procedural source: industrial surfaces with exactly-masked defects.

    `preset: classic` renders the keys below; `preset: production` renders `production`."""

    preset: Literal["classic", "production"] = "classic"
    classes: list[str] = field(default_factory=lambda: ["scratch", "spot", "crack", "pit"])
    textures: list[str] = field(default_factory=lambda: ["brushed_metal", "woven_fabric", "speckled"])
    per_class: int = 40          # defect images per class (unpaired set)
    normal: int = 80             # normal images (unpaired pool, independent surfaces)
    paired: int = 40             # (clean, defective) pairs of the same surface
    production: ProductionPresetParams = field(default_factory=ProductionPresetParams)

    def validate(self, where: str) -> None:
        positive(self, where, "per_class", "normal")
        require(self.paired >= 0, f"{where}.paired", "must be 0 or more.")
        require(len(self.classes) >= 1, f"{where}.classes", "must name at least one defect class.")
        require(len(self.textures) >= 1, f"{where}.textures", "must name at least one texture.")
        _known_names(self.classes, SYNTHETIC_DEFECTS, f"{where}.classes")
        _known_names(self.textures, SYNTHETIC_TEXTURES, f"{where}.textures")

    def layout(self) -> SyntheticLayout:
        if self.preset == "production":
            p = self.production
            return SyntheticLayout(dict(p.per_class), list(p.textures), p.normal, p.paired)
        return SyntheticLayout({c: self.per_class for c in self.classes}, list(self.textures),
                               self.normal, self.paired)


@dataclass
class FolderSourceParams:
    root: str = ""
    normal_names: list[str] = field(default_factory=lambda: ["normal", "good"])
    mask_pattern: Optional[str] = "{stem}_mask.png"   # relative to the image's folder; may use ../masks/{class}/{stem}.png
    masks_required: bool = False
    class_map: dict[str, str] = field(default_factory=dict)   # folder name -> class name
    class_regex: Optional[str] = None                          # first group of the match is the class
    # Top-level folders under root that are not classes (e.g. a parallel masks/ tree).
    exclude_dirs: list[str] = field(default_factory=lambda: ["masks", "ground_truth"])
    # Source id (split grouping key) = first group of this regex searched in the file stem;
    # None: every file is its own source. E.g. '^(part\d+)' keeps all views of a part together.
    source_regex: Optional[str] = None

    def validate(self, where: str) -> None:
        _regex(self.class_regex, f"{where}.class_regex", groups=1)
        _regex(self.source_regex, f"{where}.source_regex", groups=1)
        if self.mask_pattern is not None:
            import string

            allowed = {"stem", "name", "ext", "folder", "class", "rel", "root"}
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(self.mask_pattern) if f is not None}
            except ValueError as err:
                raise ParamsError(f"params key '{where}.mask_pattern' is malformed ({err}).") from None
            bad = sorted(names - allowed)
            require(not bad, f"{where}.mask_pattern",
                    f"uses unknown placeholder(s) {bad}; allowed: {', '.join(sorted(allowed))}.")
            require("{stem}" in self.mask_pattern or "{name}" in self.mask_pattern, f"{where}.mask_pattern",
                    "must contain {stem} or {name} so each image finds its own mask.")


@dataclass
class RootSourceParams:
    """Sources that only need a root folder (mvtec, cyclegan)."""

    root: str = ""


# Box geometries a box annotation line can give (prepare.paired.boxes.columns): corners,
# top-left + size, centre + size (YOLO). "class" names the class column, "_" a column to ignore.
BOX_GEOMETRIES = ({"x1", "y1", "x2", "y2"}, {"x", "y", "w", "h"}, {"cx", "cy", "w", "h"})
BOX_COLUMN_NAMES = ("x1", "y1", "x2", "y2", "x", "y", "w", "h", "cx", "cy", "class", "_")


@dataclass
class BoxFormatParams:
    """Box annotations: one text file per pair, one box per line (format in pipeline/data/SCHEMA.md)."""

    # Where a pair's box file is, relative to its test (B) image's folder; None: no boxes.
    # Placeholders: {id} (pair id: the file name without the suffix), {stem}, {folder}, {root}.
    pattern: Optional[str] = None
    delimiter: Optional[str] = ","      # None: any run of whitespace
    columns: list[str] = field(default_factory=lambda: ["x1", "y1", "x2", "y2", "class"])
    units: Literal["pixel", "fraction"] = "pixel"   # fraction: of the image's width / height (YOLO)
    class_names: dict[str, str] = field(default_factory=dict)   # value in the file -> class name
    skip_lines: int = 0                 # header lines at the top of every file

    def validate(self, where: str) -> None:
        import string

        if self.pattern is not None:
            try:
                names = {f for _, f, _, _ in string.Formatter().parse(self.pattern) if f is not None}
            except ValueError as err:
                raise ParamsError(f"params key '{where}.pattern' is malformed ({err}).") from None
            bad = sorted(names - {"id", "stem", "folder", "root"})
            require(not bad, f"{where}.pattern", f"uses unknown placeholder(s) {bad}; allowed: folder, id, root, stem.")
            require(bool(names & {"id", "stem"}), f"{where}.pattern",
                    "must contain {id} or {stem} so each pair finds its own file, e.g. '{id}.txt'.")
        require(self.delimiter is None or self.delimiter != "", f"{where}.delimiter",
                "must be a character such as ',' or null (any whitespace).")
        unknown = [c for c in self.columns if c not in BOX_COLUMN_NAMES]
        require(not unknown, f"{where}.columns", f"has unknown column name(s) {unknown}; known: "
                f"{', '.join(BOX_COLUMN_NAMES)} ('_' ignores a column).")
        named = [c for c in self.columns if c != "_"]
        require(len(set(named)) == len(named), f"{where}.columns", f"names a column twice: {self.columns}.")
        geometry = set(named) - {"class"}
        require(geometry in BOX_GEOMETRIES, f"{where}.columns",
                f"must give one box geometry: x1, y1, x2, y2 (corners), x, y, w, h (top-left and size) or "
                f"cx, cy, w, h (centre and size), plus an optional class; got {self.columns}.")
        require(self.skip_lines >= 0, f"{where}.skip_lines", "must be 0 or more.")
        self.class_names = {str(k): v for k, v in self.class_names.items()}   # YAML reads `1: open` as int 1
        for raw, name in self.class_names.items():
            require(bool(name) and name != "normal", f"{where}.class_names.{raw}",
                    f"must be a defect class name (not empty, not 'normal'), got {name!r}.")


@dataclass
class PairedSourceParams(RootSourceParams):
    """(clean, defective) pairs: A/ + B/ folders, side-by-side AB images, or suffix pairs."""

    # split: A/ + B/ with matching names | AB: side-by-side images (A left) | suffix: both
    # images in one folder as <id><template_suffix>.<ext> + <id><test_suffix>.<ext>
    layout: Literal["split", "AB", "suffix"] = "split"
    template_suffix: str = "_temp"      # suffix layout: the clean (template) image
    test_suffix: str = "_test"          # suffix layout: the defective (test) image
    # When a pair has neither masks/<id>.png nor boxes: mask = max |B - A| > this (0..255); 0 = no mask.
    diff_mask_threshold: int = 0
    boxes: BoxFormatParams = field(default_factory=BoxFormatParams)

    def validate(self, where: str) -> None:
        require(0 <= self.diff_mask_threshold <= 255, f"{where}.diff_mask_threshold", "must be in 0..255.")
        for name in ("template_suffix", "test_suffix"):
            value = getattr(self, name)
            require(bool(value) and "/" not in value and "." not in value, f"{where}.{name}",
                    f"must be a non-empty file name ending without '/' or '.', e.g. '_temp', got {value!r}.")
        a, b = self.template_suffix, self.test_suffix
        require(not a.endswith(b) and not b.endswith(a), f"{where}.test_suffix",
                f"and {where}.template_suffix must not end with one another ({a!r}, {b!r}): a file name "
                "would match both.")


@dataclass
class ElpvSourceParams:
    # Defect probability threshold: >= threshold is the "defect" domain, 0 is "normal".
    defect_threshold: float = 0.67
    per_class: int = 0          # 0 = all images
    cell_type: Literal["any", "mono", "poly"] = "any"

    def validate(self, where: str) -> None:
        require(0 < self.defect_threshold <= 1, f"{where}.defect_threshold",
                f"must be in (0, 1], got {self.defect_threshold!r}.")
        require(self.per_class >= 0, f"{where}.per_class", f"must be 0 (all) or more, got {self.per_class!r}.")


@dataclass
class SegmentationSourceParams:
    """`<root>/<images_dir>/<split>/<id>.<ext>` + `<root>/<masks_dir>/<split>/<id><mask_ext>` holding
    one class index per pixel (pipeline/data/segmentation.py)."""

    root: str = ""
    images_dir: str = "img_dir"
    masks_dir: str = "ann_dir"
    # Sub-folders of images_dir / masks_dir read (pooled, then re-split by prepare.split);
    # []: the images lie directly in images_dir (any depth).
    splits: list[str] = field(default_factory=lambda: ["train", "val", "test"])
    mask_ext: str = ".png"
    class_names: dict[int, str] = field(default_factory=dict)   # mask index -> class name; 0 is background

    def validate(self, where: str) -> None:
        for name in ("images_dir", "masks_dir"):
            require(bool(getattr(self, name)), f"{where}.{name}", "must name a folder under root.")
        require(self.mask_ext.startswith(".") and len(self.mask_ext) > 1, f"{where}.mask_ext",
                f"must be a file extension such as '.png', got {self.mask_ext!r}.")
        names: dict[int, str] = {}
        for raw, name in self.class_names.items():
            key = f"{where}.class_names.{raw}"
            try:
                index = int(raw)                   # YAML reads `1: inclusion` as int 1, '"1": x' as str
            except (TypeError, ValueError):
                raise ParamsError(f"params key '{key}' must be a mask index 1..255, got {raw!r}.") from None
            require(1 <= index <= 255, key, f"must be a mask index 1..255 (0 is background), got {raw!r}.")
            require(isinstance(name, str) and bool(name) and name != "normal", key,
                    f"must be a defect class name (not empty, not 'normal'), got {name!r}.")
            require(index not in names, key, "gives an index twice.")
            names[index] = name
        require(len(set(names.values())) == len(names), f"{where}.class_names",
                f"names a class twice: {sorted(names.values())}.")
        self.class_names = dict(sorted(names.items()))


@dataclass
class PatchParams:
    """`prepare.resize: patches`: training patches of prepare.resolution px cut at native scale
    (pipeline/data/patches.py): around every connected defect component of a mask, and from
    defect-free regions of every image (normal images and defect images alike)."""

    scale: float = 1.0                 # images and masks resized by this factor before cutting; 1 = native pixels
    defect_per_component: int = 1      # patches per connected defect component (8-connectivity)
    jitter: float = 0.5                # share of the free room used: 0 = component centred, 1 = anywhere inside
    min_component_px: int = 1          # smaller components (mask pixels, after scale) get no patch of their own
    normal_per_image: int = 1          # defect-free patches per image (normal and defect images)
    normal_margin: int = 4             # px between a normal patch and the nearest mask pixel
    max_defect_per_class: int = 0      # cap, all splits together (each split its prepare.split share); 0 = none
    max_normal: int = 0                # cap on normal patches, all splits together (shared the same way); 0 = none

    def validate(self, where: str) -> None:
        require(0.01 <= self.scale <= 16, f"{where}.scale", f"is a resize factor in [0.01, 16], got {self.scale!r}.")
        positive(self, where, "defect_per_component", "min_component_px")
        require(0 <= self.jitter <= 1, f"{where}.jitter", f"must be in [0, 1], got {self.jitter!r}.")
        for name in ("normal_per_image", "normal_margin", "max_defect_per_class", "max_normal"):
            require(getattr(self, name) >= 0, f"{where}.{name}", f"must be 0 or more, got {getattr(self, name)!r}.")


# Sources whose images are files with pixel masks, readable at their own size (patch mode).
PATCH_SOURCES = ("folder", "mvtec", "segmentation")


@dataclass
class AugmentParams:
    """Train-time augmentation (albumentations), applied identically to image and mask."""

    hflip: float = 0.5
    vflip: float = 0.0
    rotate90: float = 0.0
    brightness_contrast: float = 0.0

    def validate(self, where: str) -> None:
        for name in ("hflip", "vflip", "rotate90", "brightness_contrast"):
            value = getattr(self, name)
            require(0 <= value <= 1, f"{where}.{name}", f"is a probability in [0, 1], got {value!r}.")


@dataclass
class PseudoMaskParams:
    """Masks for defect images whose source has none (beyond the paper; pipeline/data/pseudo_masks.py).
    "none" (the paper: no masks) leaves them unknown; "normal_reference" marks where an image
    departs from its nearest training normals by more than the `quantile` of normal pixels do."""

    method: Literal["none", "normal_reference"] = "none"
    neighbours: int = 5
    quantile: float = 0.995
    min_area: float = 0.002       # smaller masks are speckle: the image stays unknown (8 px at 64 px)

    def validate(self, where: str) -> None:
        require(isinstance(self.neighbours, int) and self.neighbours >= 1, f"{where}.neighbours",
                f"must be a whole number >= 1, got {self.neighbours!r}.")
        require(0.5 <= self.quantile < 1, f"{where}.quantile",
                f"is the share of normal pixels below the threshold, in [0.5, 1), got {self.quantile!r}.")
        require(0 <= self.min_area < 1, f"{where}.min_area",
                f"is a share of the image in [0, 1), got {self.min_area!r}.")


@dataclass
class PrepareParams:
    source: Literal["synthetic", "folder", "mvtec", "cyclegan", "paired", "elpv", "segmentation"] = "synthetic"
    seed: int = 0
    resolution: int = 64
    channels: Literal[1, 3] = 3
    strict: bool = False          # true: a bad input file stops the run; false: skip and report
    mask_threshold: int = 127     # mask pixels > threshold are defect
    # crop: centre square then resize; stretch: resize whole; patches: cut resolution-px patches at
    # native scale around each defect and from defect-free regions (the `patches` section)
    resize: Literal["crop", "stretch", "patches"] = "crop"
    split: SplitParams = field(default_factory=SplitParams)
    synthetic: SyntheticSourceParams = field(default_factory=SyntheticSourceParams)
    folder: FolderSourceParams = field(default_factory=FolderSourceParams)
    mvtec: RootSourceParams = field(default_factory=RootSourceParams)
    cyclegan: RootSourceParams = field(default_factory=RootSourceParams)
    paired: PairedSourceParams = field(default_factory=PairedSourceParams)
    elpv: ElpvSourceParams = field(default_factory=ElpvSourceParams)
    segmentation: SegmentationSourceParams = field(default_factory=SegmentationSourceParams)
    patches: PatchParams = field(default_factory=PatchParams)
    augment: AugmentParams = field(default_factory=AugmentParams)
    pseudo_masks: PseudoMaskParams = field(default_factory=PseudoMaskParams)

    def validate(self, where: str) -> None:
        positive(self, where, "resolution")
        require(self.resolution >= 8, f"{where}.resolution", f"must be at least 8, got {self.resolution}.")
        require(0 <= self.mask_threshold <= 255, f"{where}.mask_threshold", "must be in 0..255.")
        if self.source in ("folder", "mvtec", "cyclegan", "paired", "segmentation"):
            root = getattr(self, self.source).root
            require(bool(root), f"{where}.{self.source}.root",
                    f"must point to your dataset folder when {where}.source is '{self.source}'.")
        if self.source == "segmentation":
            require(bool(self.segmentation.class_names), f"{where}.segmentation.class_names",
                    "must map each mask index to its class name, e.g. {1: inclusion, 2: patches, 3: scratches}.")
        if self.resize == "patches":
            require(self.source in PATCH_SOURCES, f"{where}.resize",
                    f"is 'patches', which cuts patches around mask components at the images' own scale; "
                    f"it needs a source of image files with pixel masks ({', '.join(PATCH_SOURCES)}), not "
                    f"'{self.source}'. Set {where}.resize: crop, or another {where}.source.")


# --------------------------------------------------------------------------- train (shared part)

@dataclass
class TrainCommonParams:
    """What every family's training run shares; families add their own section."""

    seed: int = 0
    kimg: float = 2.0               # thousands of real images shown to D in total
    batch_size: int = 8             # per worker
    tick_kimg: float = 0.5          # log metrics every tick
    snapshot_ticks: int = 1         # sample grid + checkpoint every N ticks
    precision: Literal["fp32", "bf16"] = "fp32"
    channels_last: bool = False
    grad_clip: float = 0.0          # 0 = off; max global grad norm otherwise
    ema_decay: float = 0.999
    lr_decay_start: float = 0.5     # fraction of kimg after which lr decays linearly to 0
    max_failures: int = 1              # Ray Train restarts from the last checkpoint after a worker dies
    register_model: Optional[str] = None   # also register the EMA generator under this MLflow model name

    def validate(self, where: str) -> None:
        positive(self, where, "kimg", "batch_size", "tick_kimg", "snapshot_ticks")
        require(0 <= self.ema_decay < 1, f"{where}.ema_decay", "must be in [0, 1).")
        require(0 <= self.lr_decay_start <= 1, f"{where}.lr_decay_start", "must be in [0, 1].")
        require(self.grad_clip >= 0, f"{where}.grad_clip", "must be 0 (off) or positive.")
        require(self.max_failures >= -1, f"{where}.max_failures",
                f"is the number of Ray Train restarts: 0 or more (-1 = unlimited), got {self.max_failures}.")
        require(self.register_model is None or bool(self.register_model.strip()), f"{where}.register_model",
                "must be a model registry name, or omitted.")


@dataclass
class RayParams:
    """Cluster resources. Not DVC params on purpose: changing them must not retrain models.

    The per-worker batch size is `train.common.batch_size` (a DVC param: it changes results).
    """

    address: Optional[str] = None       # join this cluster (also RAY_ADDRESS); local Ray when None
    num_workers: int = 1
    cpus_per_worker: float = 1.0        # fractions allowed (0.5: two workers share a core)
    use_gpu: bool = False
    gpus_per_worker: float = 1.0        # only with use_gpu
    storage_path: str = "ray_results"   # run folders + checkpoints; relative = to the current dir; or s3://...
    checkpoints_to_keep: int = 2        # newest Ray checkpoints kept per run
    num_cpus: Optional[int] = None      # CPUs of a local Ray instance (default: all cores)
    object_store_mb: int = 256          # object store of a local Ray instance (checkpoints go to storage)
    include_dashboard: bool = False     # local Ray dashboard on 127.0.0.1 (costs ~1 s and memory)

    def validate(self, where: str) -> None:
        positive(self, where, "num_workers", "cpus_per_worker", "checkpoints_to_keep", "object_store_mb")
        if self.use_gpu:
            positive(self, where, "gpus_per_worker")
        require(self.num_cpus is None or self.num_cpus > 0, f"{where}.num_cpus",
                f"must be greater than 0 (or omitted for all cores), got {self.num_cpus!r}.")
        require(self.object_store_mb >= 80, f"{where}.object_store_mb",
                f"must be at least 80 (Ray's minimum), got {self.object_store_mb!r}.")

    def with_overrides(self, overrides: dict) -> "RayParams":
        """These params with command-line overrides applied, validated (errors name `ray.<key>`)."""
        return from_dict(RayParams, {**to_dict(self), **(overrides or {})}, "ray")


# --------------------------------------------------------------------------- generate / evaluate / downstream

@dataclass
class GenerateParams:
    RENAMED: ClassVar[dict[str, str]] = {"model": "default_model", "batch_size": "ray_batch_size"}

    # The families the DAG trains, generates from, evaluates and compares, in this order (dvc.yaml's
    # foreach reads the list; None: every family of pipeline.models.REGISTRY), and the one
    # `pipeline generate` uses without --model (None: the first of `models`). Names are checked
    # against the registry by load_params.
    models: Optional[list[str]] = None
    default_model: Optional[str] = None
    per_class: int = 40
    seed: int = 0
    placement: Literal["random", "masks", "real_masks"] = "random"
    box_min: float = 0.2            # random control-map box side, fraction of the image
    box_max: float = 0.5
    masks_dir: Optional[str] = None  # user masks when placement == masks
    min_mask_fraction: float = 0.002  # quality filter: drop near-empty masks
    max_mask_fraction: float = 0.9    # ... and masks covering almost everything
    max_rounds: int = 5             # extra rounds (new seeds) to replace filtered samples
    normal_split: Literal["train", "val", "test"] = "train"   # normal images the defects are put on
    # Ray resources (do not change the output: every sample has its own seed).
    ray_batch_size: int = 16        # rows per Ray Data batch sent to an actor (not a model batch: sampler.py)
    num_actors: int = 2             # generator actors (each loads the EMA generator once)
    cpus_per_actor: float = 0.5     # fractional: a full CPU per actor starves the reader on small machines

    def validate(self, where: str) -> None:
        require(self.per_class > 0, f"{where}.per_class", f"is {self.per_class}: zero images requested. "
                "Set it to the number of images to generate per defect class (> 0).")
        positive(self, where, "ray_batch_size", "num_actors", "cpus_per_actor", "max_rounds")
        require(0 < self.box_min <= self.box_max <= 1, f"{where}.box_min",
                f"and box_max must satisfy 0 < box_min <= box_max <= 1, got {self.box_min}, {self.box_max}.")
        require(0 <= self.min_mask_fraction < self.max_mask_fraction <= 1, f"{where}.min_mask_fraction",
                "and max_mask_fraction must satisfy 0 <= min < max <= 1.")


# The metrics pipeline/metrics registers, so evaluate.metrics is checked without importing them
# (they import torch). Its `register_metric` refuses a name missing here; tests/test_metrics.py
# checks that every name here is registered.
METRIC_NAMES = ("swd", "kid_domain", "fid_domain", "mmd_domain", "duplicate_rate", "mean_pairwise_distance",
                "mask_in_region", "mask_area_in_range", "class_accuracy_domain", "inception_fid", "inception_kid",
                "c2st")


def check_metric_names(names: list[str], key: str) -> None:
    """A ParamsError naming `key` unless `names` lists one or more known metrics."""
    known = ", ".join(sorted(METRIC_NAMES))
    for name in names:
        if name not in METRIC_NAMES:
            close = difflib.get_close_matches(name, METRIC_NAMES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ParamsError(f"params key '{key}' names unknown metric {name!r}.{hint} Known metrics: {known}.")
    if not names:
        raise ParamsError(f"params key '{key}' must name at least one metric. Known metrics: {known}.")


@dataclass
class EvaluateParams:
    RENAMED: ClassVar[dict[str, str]] = {"per_class": "per_class_tables"}

    metrics: list[str] = field(default_factory=lambda: ["swd", "kid_domain", "fid_domain", "mmd_domain",
                                                        "duplicate_rate", "mask_in_region",
                                                        "mask_area_in_range", "class_accuracy_domain", "c2st"])
    seed: int = 0
    feature_epochs: int = 3
    inception_weights: Optional[str] = None   # local path; Inception metrics only when given
    # Real images the synthetic sets are compared with (held out from GAN training by default).
    real_splits: list[Literal["train", "val", "test"]] = field(default_factory=lambda: ["test", "val"])
    per_class_tables: bool = True       # also score each class (fake class k vs real class k)
    # A "do_nothing" row: the unmodified normal inputs of an image-to-image model's samples
    # (pipeline/metrics/evaluate.py), the score to beat. Beyond the papers, which rank models only.
    do_nothing_baseline: bool = True
    feature_batch_size: int = 64        # domain feature network: training and inference batch
    feature_min_steps: int = 400        # ... and at least this many optimizer steps (measured: features.py)
    swd_projections: int = 512          # random directions (ProGAN: 4 repeats x 128)
    swd_patches_per_image: int = 128    # 7x7 neighbourhoods sampled per image per pyramid level
    kid_subsets: int = 100
    kid_subset_size: int = 1000         # clipped to the smaller set
    duplicate_space: Literal["pixels", "features"] = "pixels"
    duplicate_percentile: float = 1.0   # threshold = this percentile of real-real NN distances
    inception_size: int = 299           # images are resized to this side before the Inception module
    # Reference rows (pipeline/metrics/evaluate.py): `noise` (uniform random images, a realism
    # metric must call them fake) and `real_vs_real` (half the real defects vs the other half:
    # the floor at that sample size).
    reference_rows: bool = True
    # c2st, the classifier two-sample test (pipeline/metrics/two_sample.py): seeded splits, and the
    # downstream classifier's training per split (early stopping on val, at most c2st_max_steps).
    c2st_splits: int = 3
    c2st_batch_size: int = 32
    c2st_lr: float = 3e-3
    c2st_max_steps: int = 200

    def validate(self, where: str) -> None:
        check_metric_names(self.metrics, key=f"{where}.metrics")
        positive(self, where, "c2st_splits", "c2st_batch_size", "c2st_lr", "c2st_max_steps")
        positive(self, where, "feature_epochs", "feature_batch_size", "swd_projections",
                 "swd_patches_per_image", "kid_subsets", "kid_subset_size", "inception_size")
        require(0 < self.duplicate_percentile < 100, f"{where}.duplicate_percentile",
                f"is a percentile in (0, 100), got {self.duplicate_percentile!r}.")
        require(len(self.real_splits) >= 1, f"{where}.real_splits", "must name at least one split.")
        require(self.feature_min_steps >= 0, f"{where}.feature_min_steps", "must be 0 or more.")


@dataclass
class DownstreamParams:
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])   # >= 5 for a paired t interval
    shots: list[int] = field(default_factory=lambda: [5, 20])   # real defect images per class
    batch_size: int = 32
    lr: float = 3e-3
    width: int = 8                      # channels of the classifier's first stage (x2, x4, x8 after)
    # Early stopping, the same rule for every condition: score the val split every eval_every
    # steps; after min_steps stop once `patience` evaluations in a row did not improve; keep
    # the best validated weights. Patience 3 instead of 4 trains 21 % fewer steps and selects
    # the same weights in 72 of 90 classifiers (replayed from the validation histories of a
    # default-data run).
    eval_every: int = 25
    patience: int = 3
    min_steps: int = 100
    max_steps: int = 1000
    synthetic_per_class: int = 40       # added images per defect class: synthetic and copy-paste alike
    # Synthetic + classical augmentation for the synthetic set whose real + synthetic classifiers
    # scored best on val ("best": one condition, chosen on val) or for every synthetic set ("all").
    synthetic_classical: Literal["best", "all"] = "best"
    copy_paste_blend_sigma: float = 1.0   # feathered rim (pixels) of a pasted defect; 0 = hard cut
    # Few-shot caps apply to defect classes only; normal images are plentiful on a real line,
    # so by default every normal training image is kept. True caps normals at the same number.
    cap_normals: bool = False
    ci_level: float = 0.95              # paired t interval of the per-seed differences vs real_only
    precision: Literal["fp32", "bf16"] = "fp32"   # bf16: CPU autocast for the forward pass
    # The downstream segmenter (segmenter.py): a small U-Net per (shots, seed, condition), the same
    # protocol, stopping rule and statistics as the classifier; false runs the classifier only.
    segmenter: bool = True
    segmenter_width: int = 8            # channels of the U-Net's first level (x2 per level down)
    segmenter_batch_size: int = 16      # a U-Net step costs ~4x a classifier step at 32 px: half the batch
    # The segmenter's step cap (the rest of its stopping rule is the classifier's): on the default
    # data 74 of 80 segmenters found their best weights by step 400 and the cap at 300 cost 0.015
    # pixel AP on average, for 17 % fewer U-Net steps (the DAG's 15-minute budget on 2 cores).
    segmenter_max_steps: int = 300
    segmenter_lr: float = 3e-3
    # DRAEM-style baseline (draem.py): Perlin-noise masks filled with texture from another normal
    # training image ("normals") or a built-in procedural texture ("procedural"); nothing downloaded.
    draem_texture: Literal["normals", "procedural"] = "normals"
    draem_area: list[float] = field(default_factory=lambda: [0.005, 0.1])   # mask area, fraction of the image
    # Processes training classifiers in parallel, one torch thread each (0 = one per core).
    # Does not change any result (every classifier is seeded on its own), so not a DVC param.
    workers: int = 0

    def validate(self, where: str) -> None:
        positive(self, where, "batch_size", "lr", "synthetic_per_class", "width", "eval_every", "patience",
                 "max_steps")
        require(len(self.seeds) >= 1, f"{where}.seeds", "must list at least one seed.")
        require(len(set(self.seeds)) == len(self.seeds), f"{where}.seeds", f"has duplicates: {self.seeds}.")
        require(0 <= self.min_steps <= self.max_steps, f"{where}.min_steps",
                f"must be in 0..max_steps ({self.max_steps}), got {self.min_steps}.")
        require(len(self.shots) >= 1, f"{where}.shots", "must list at least one cap.")
        require(all(s > 0 for s in self.shots), f"{where}.shots", "must all be greater than 0.")
        require(self.copy_paste_blend_sigma >= 0, f"{where}.copy_paste_blend_sigma",
                f"must be 0 (hard cut) or more pixels, got {self.copy_paste_blend_sigma}.")
        require(0 < self.ci_level < 1, f"{where}.ci_level", f"must be in (0, 1), got {self.ci_level}.")
        require(self.workers >= 0, f"{where}.workers", f"must be 0 (one per core) or more, got {self.workers}.")
        positive(self, where, "segmenter_width", "segmenter_lr", "segmenter_batch_size")
        require(self.min_steps <= self.segmenter_max_steps, f"{where}.segmenter_max_steps",
                f"must be at least min_steps ({self.min_steps}), got {self.segmenter_max_steps}.")
        require(len(self.draem_area) == 2 and 0 < self.draem_area[0] <= self.draem_area[1] < 1,
                f"{where}.draem_area", f"must be [min, max] with 0 < min <= max < 1 (fractions of the image), "
                f"got {self.draem_area}.")


# --------------------------------------------------------------------------- top level

@dataclass
class Params:
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: dict[str, Any] = field(default_factory=dict)   # raw; see train_params()
    ray: RayParams = field(default_factory=RayParams)
    generate: GenerateParams = field(default_factory=GenerateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    downstream: DownstreamParams = field(default_factory=DownstreamParams)


def load_params(path: str | Path = "params.yaml", families: bool = True) -> Params:
    """Read and validate a params file.

    families: also validate what names GAN families, so a typo fails before any work starts:
    every `train.<family>` section (`train_params`) and generate.models / default_model (their
    defaults filled in). That imports the families and torch; `pipeline prepare`, which reads
    none of it, passes False."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found. Pass --params <file> or run from the repository root.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"params file {path} is not valid YAML: {err}") from None
    params = from_dict(Params, data, "")
    if families:
        for family in params.train:
            if family != "common":
                train_params(params, family)
        _resolve_generate_models(params.generate)
    return params


def _resolve_generate_models(generate: GenerateParams) -> None:
    from pipeline.models import REGISTRY  # local import: models import torch

    if generate.models is None:
        generate.models = list(REGISTRY)
    require(len(generate.models) >= 1, "generate.models", "must name at least one GAN family.")
    _known_names(generate.models, tuple(REGISTRY), "generate.models")
    if generate.default_model is None:
        generate.default_model = generate.models[0]
    _known_names([generate.default_model], tuple(REGISTRY), "generate.default_model")


def train_params(params: Params, family: str) -> tuple[TrainCommonParams, Any]:
    """(common, family-specific) training params for `family`, validated."""
    from pipeline.models import family_config_class  # local import: models import torch

    raw = params.train or {}
    common = from_dict(TrainCommonParams, raw.get("common", {}), "train.common")
    cfg_cls = family_config_class(family)
    section = dict(raw.get(family, {}) or {})
    overrides = {k: section.pop(k) for k in list(section) if k in {f.name for f in dataclasses.fields(TrainCommonParams)}}
    if overrides:
        common = from_dict(TrainCommonParams, {**to_dict(common), **overrides}, f"train.{family}")
    return common, from_dict(cfg_cls, section, f"train.{family}")
