"""Typed params, one dataclass per params.yaml section; the one place params are validated.

`load_params(path)` reads params.yaml and returns a `Params`. Unknown or mistyped keys,
wrong types and out-of-range values raise `ParamsError` naming the dotted key
(`prepare.synthetic.per_class`) and what to do, with a "did you mean" for typos.

Family-specific training params (`train.cyclegan.*`) are dataclasses that live beside each
family in `pipeline/models/<family>.py` and are validated through the same `from_dict`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, get_args, get_origin

import yaml

from pipeline.errors import ParamsError

REPO_ROOT = Path(__file__).resolve().parent.parent


# --------------------------------------------------------------------------- generic loader

def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp).replace("typing.", ""))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against annotation `tp` (converting ints to floats, lists to tuples)."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ParamsError as err:
                errors.append(str(err))
        raise ParamsError(errors[0] if errors else f"{key}: bad value {value!r}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = difflib.get_close_matches(str(value), [str(a) for a in allowed], n=1)
            extra = f" Did you mean {hint[0]!r}?" if hint else ""
            raise ParamsError(f"params key '{key}' is {value!r}; allowed values: "
                              f"{', '.join(map(repr, allowed))}.{extra}")
        return value
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ParamsError(f"params key '{key}' must be a list, got {value!r}.")
        (item_tp, *_) = get_args(tp) or (Any,)
        items = [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return list(items) if origin is list else tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            raise ParamsError(f"params key '{key}' must be a mapping, got {value!r}.")
        _, val_tp = get_args(tp) or (Any, Any)
        return {k: _coerce(v, val_tp, f"{key}.{k}") for k, v in value.items()}
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ParamsError(f"params key '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ParamsError(f"params key '{key}' must be an integer, got {value!r}.")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ParamsError(f"params key '{key}' must be true or false, got {value!r}.")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ParamsError(f"params key '{key}' must be a string, got {value!r}.")
        return value
    return value


def from_dict(cls: type, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and bad types.

    `where` is the dotted path of this section, used in every message.
    """
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ParamsError(f"params section '{where}' must be a mapping, got {data!r}.")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = [k for k in data if k not in fields]
    if unknown:
        key = unknown[0]
        close = difflib.get_close_matches(str(key), list(fields), n=1)
        hint = f" Did you mean '{where}.{close[0]}'?" if close else ""
        raise ParamsError(f"unknown params key '{where}.{key}'.{hint} "
                          f"Known keys in '{where}': {', '.join(sorted(fields))}.")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in data.items()}
    obj = cls(**kwargs)
    validate = getattr(obj, "validate", None)
    if validate is not None:
        validate(where)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain-data view of a params dataclass (for logging, checkpoints, manifests)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1} (MLflow params, DVC-style keys)."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def require(cond: bool, key: str, message: str) -> None:
    """Raise a ParamsError naming `key` unless `cond` holds."""
    if not cond:
        raise ParamsError(f"params key '{key}' {message}")


def positive(obj: Any, where: str, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value is not None and value > 0, f"{where}.{name}",
                f"must be greater than 0, got {value!r}.")


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


@dataclass
class SyntheticSourceParams:
    """The embedded procedural source: industrial surfaces with exactly-masked defects."""

    classes: list[str] = field(default_factory=lambda: ["scratch", "spot", "crack", "pit"])
    textures: list[str] = field(default_factory=lambda: ["brushed_metal", "woven_fabric", "speckled"])
    per_class: int = 40          # defect images per class (unpaired set)
    normal: int = 80             # normal images (unpaired pool, independent surfaces)
    paired: int = 40             # (clean, defective) pairs of the same surface

    def validate(self, where: str) -> None:
        positive(self, where, "per_class", "normal")
        require(self.paired >= 0, f"{where}.paired", "must be 0 or more.")
        require(len(self.classes) >= 1, f"{where}.classes", "must name at least one defect class.")
        require(len(self.textures) >= 1, f"{where}.textures", "must name at least one texture.")


@dataclass
class FolderSourceParams:
    root: str = ""
    normal_names: list[str] = field(default_factory=lambda: ["normal", "good"])
    mask_pattern: Optional[str] = "{stem}_mask.png"   # relative to the image's folder; may use ../masks/{class}/{stem}.png
    masks_required: bool = False
    class_map: dict[str, str] = field(default_factory=dict)   # folder name -> class name
    class_regex: Optional[str] = None                          # first group of the match is the class


@dataclass
class RootSourceParams:
    """Sources that only need a root folder (mvtec, cyclegan) or a layout choice (paired)."""

    root: str = ""
    layout: Literal["split", "AB"] = "split"   # paired only: A/ + B/ folders, or side-by-side AB images


@dataclass
class ElpvSourceParams:
    # Defect probability threshold: >= threshold is the "defect" domain, 0 is "normal".
    defect_threshold: float = 0.67
    per_class: int = 0          # 0 = all images
    cell_type: Literal["any", "mono", "poly"] = "any"


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
class PrepareParams:
    source: Literal["synthetic", "folder", "mvtec", "cyclegan", "paired", "elpv"] = "synthetic"
    seed: int = 0
    resolution: int = 64
    channels: Literal[1, 3] = 3
    strict: bool = False          # true: a bad input file stops the run; false: skip and report
    mask_threshold: int = 127     # mask pixels > threshold are defect
    split: SplitParams = field(default_factory=SplitParams)
    synthetic: SyntheticSourceParams = field(default_factory=SyntheticSourceParams)
    folder: FolderSourceParams = field(default_factory=FolderSourceParams)
    mvtec: RootSourceParams = field(default_factory=RootSourceParams)
    cyclegan: RootSourceParams = field(default_factory=RootSourceParams)
    paired: RootSourceParams = field(default_factory=RootSourceParams)
    elpv: ElpvSourceParams = field(default_factory=ElpvSourceParams)
    augment: AugmentParams = field(default_factory=AugmentParams)

    def validate(self, where: str) -> None:
        positive(self, where, "resolution")
        require(self.resolution >= 8, f"{where}.resolution", f"must be at least 8, got {self.resolution}.")
        require(0 <= self.mask_threshold <= 255, f"{where}.mask_threshold", "must be in 0..255.")
        if self.source in ("folder", "mvtec", "cyclegan", "paired"):
            root = getattr(self, self.source).root
            require(bool(root), f"{where}.{self.source}.root",
                    f"must point to your dataset folder when {where}.source is '{self.source}'.")


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
    max_failures: int = 1
    register_model: Optional[str] = None

    def validate(self, where: str) -> None:
        positive(self, where, "kimg", "batch_size", "tick_kimg", "snapshot_ticks")
        require(0 <= self.ema_decay < 1, f"{where}.ema_decay", "must be in [0, 1).")
        require(0 <= self.lr_decay_start <= 1, f"{where}.lr_decay_start", "must be in [0, 1].")
        require(self.grad_clip >= 0, f"{where}.grad_clip", "must be 0 (off) or positive.")


@dataclass
class RayParams:
    """Cluster resources. Not DVC params on purpose: changing them must not retrain models."""

    address: Optional[str] = None
    num_workers: int = 1
    cpus_per_worker: float = 1.0
    use_gpu: bool = False
    storage_path: str = "ray_results"   # local folder, shared filesystem or s3:// URI

    def validate(self, where: str) -> None:
        positive(self, where, "num_workers", "cpus_per_worker")


# --------------------------------------------------------------------------- generate / evaluate / downstream

@dataclass
class GenerateParams:
    model: Literal["defectgan", "cyclegan", "stargan", "progan", "pix2pix"] = "defectgan"
    models: list[str] = field(default_factory=lambda: ["defectgan", "cyclegan", "stargan", "progan", "pix2pix"])
    per_class: int = 40
    seed: int = 0
    placement: Literal["random", "masks"] = "random"
    box_min: float = 0.2            # random control-map box side, fraction of the image
    box_max: float = 0.5
    masks_dir: Optional[str] = None  # user masks when placement == masks
    min_mask_fraction: float = 0.002  # quality filter: drop near-empty masks
    max_mask_fraction: float = 0.9    # ... and masks covering almost everything
    batch_size: int = 16

    def validate(self, where: str) -> None:
        positive(self, where, "per_class", "batch_size")
        require(0 < self.box_min <= self.box_max <= 1, f"{where}.box_min",
                "and box_max must satisfy 0 < box_min <= box_max <= 1.")
        require(0 <= self.min_mask_fraction < self.max_mask_fraction <= 1, f"{where}.min_mask_fraction",
                "and max_mask_fraction must satisfy 0 <= min < max <= 1.")


@dataclass
class EvaluateParams:
    metrics: list[str] = field(default_factory=lambda: ["swd", "kid_domain", "fid_domain", "mmd_domain",
                                                        "duplicate_rate", "mask_in_region"])
    seed: int = 0
    feature_epochs: int = 3
    inception_weights: Optional[str] = None   # local path; Inception metrics only when given


@dataclass
class DownstreamParams:
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    shots: list[int] = field(default_factory=lambda: [5, 20])   # real defect images per class
    epochs: int = 6
    batch_size: int = 32
    lr: float = 2e-3
    synthetic_per_class: int = 40

    def validate(self, where: str) -> None:
        positive(self, where, "epochs", "batch_size", "lr", "synthetic_per_class")
        require(all(s > 0 for s in self.shots), f"{where}.shots", "must all be greater than 0.")


# --------------------------------------------------------------------------- top level

@dataclass
class Params:
    prepare: PrepareParams = field(default_factory=PrepareParams)
    train: dict[str, Any] = field(default_factory=dict)   # raw; see train_params()
    ray: RayParams = field(default_factory=RayParams)
    generate: GenerateParams = field(default_factory=GenerateParams)
    evaluate: EvaluateParams = field(default_factory=EvaluateParams)
    downstream: DownstreamParams = field(default_factory=DownstreamParams)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate a params file. Train sections are validated by `train_params`."""
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"params file {path} not found. Pass --params <file> or run from the repository root.")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ParamsError(f"params file {path} is not valid YAML: {err}") from None
    params = from_dict(Params, data, "params")
    # Validate every train section eagerly so a typo fails before any work starts.
    for family in params.train:
        if family != "common":
            train_params(params, family)
    return params


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
