"""The generation stage on Ray Data (the only `ray.data` import of the generation package).

    plan (driver)  index, label, seed, normal index  --GenerateActor (actor pool; takes the
    normal PNG from the pool it holds)-->  image/mask/region PNGs  --driver, in index order-->
    quality filter -> SyntheticWriter

The plan for sample `index` is a pure function of (generate.seed, index): its class, its
normal image (the normal pool is cycled: index mod pool size) and its seed
(`sampler.sample_seed`). Each actor loads the trained EMA generator once (`__init__` ->
`load_trained`) and synthesises its batches through `Sampler` (fixed-size chunks, each
sample's noise from its own seed: sampler.py's "Reproducibility"), so the images do not depend
on the number of actors, batch size or block layout.

Rounds: round 1 asks for `per_class` samples per class; samples the quality filter drops are
replaced in further rounds with new indices (hence new seeds), up to `generate.max_rounds`.
The stream is consumed in index order (preserve_order), so which samples are kept is
deterministic too. Families that cannot choose a defect class (class_conditional False:
cyclegan, pix2pix, unconditional dcgan/progan) make `per_class` images of one class "defect"
(label_idx -1). Everything is written into a temporary folder that replaces `out_dir` only
when complete (`fsutil.atomic_dir`); an existing `out_dir` is replaced only when it is a
previous output of this stage (manifest.json of kind `synthetic-defect-dataset`).

Start-up (issue 14): the plan is a few integers per sample, made by the driver and handed to
Ray Data as Arrow blocks (`ray.data.from_blocks`), so the first batch waits only for the actors
(a process each that imports torch and loads the generator), not also for plan tasks, each a
process that would import this module, torch included, to slice the normal pool. Each actor
gets the normal pool once (an object reference).

Resources: `pipeline.cluster.connect`: `address`, RAY_ADDRESS, a running `pipeline cluster up`
cluster, else a local Ray on all cores. Actors take a fractional CPU
(`generate.cpus_per_actor`, 0.5 by default), and the actors may ask for all but HEADROOM_CPUS of
the cluster's CPUs. The limit dates from when plan tasks needed that CPU (a full CPU per actor on
a 2-CPU machine left none for them and the pipeline deadlocked silently); it is kept so that the
same params are accepted as before, and it leaves the driver, which decodes the stream, filters
and writes, a share of the machine. With `use_gpu` the actors share the cluster's GPUs (at most one
each).

Console: one progress display (pipeline.console.progress), images kept out of the number asked
for; Ray Data's own progress bars and logs stay off unless verbose.
"""

from __future__ import annotations

import contextlib
import math
import re
import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray
import ray.data
import torch

from pipeline import console
from pipeline.config import GenerateParams, to_dict
from pipeline.errors import DataError, ParamsError, PipelineError, TrainingError
from pipeline.fsutil import atomic_dir
from pipeline.generation.placement import Placement, placement_from_params
from pipeline.generation.sampler import (DEFECT_LABEL, DEFECT_LABEL_IDX, Sampler, applies_filter,
                                         keep, sample_seeds)
from pipeline.generation.writer import SyntheticWriter, is_generation_output, sample_id
from pipeline.models.base import DataSpec
from pipeline.tracking import file_sha256
from pipeline.training.loop import EXPORT_FILE, load_trained, read_spec

HEADROOM_CPUS = 0.25        # CPUs the actors must leave free (module docstring, Resources)
MIN_KEEP_RATE = 0.05        # later rounds ask for deficit / keep rate, at most 1 / this


@dataclass(frozen=True)
class OutClass:
    label: str        # output class name (folder name)
    label_idx: int    # output label index (-1 for "defect")
    synth: int        # class index passed to synthesize (>= 1)


# ---- checks before any work -------------------------------------------------------------------

def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a folder that is not a previous output of this stage."""
    out_dir = Path(out_dir)
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise PipelineError(f"output path {out_dir} exists and is a file. Choose another --out.")
    if any(not p.name.startswith(".") for p in out_dir.iterdir()) and not is_generation_output(out_dir):
        raise PipelineError(f"output folder {out_dir} exists and is not a previous generation output "
                            "(no manifest.json from `pipeline generate`). Refusing to replace it: "
                            "choose another --out or move the folder away.")


def check_compatible(model_name: str, model_dir: Path, trained: DataSpec, family_name: str,
                     data: DataSpec, prepared_dir: Path) -> None:
    if family_name != model_name:
        raise TrainingError(f"model folder {model_dir} holds a '{family_name}' generator, not '{model_name}'. "
                            f"Point --models-dir to the folder holding {model_name}/{EXPORT_FILE}.")
    trained.require_same(data, f"model {model_dir / EXPORT_FILE}",
                         f"the prepared data {Path(prepared_dir) / 'classes.json'}",
                         "Retrain the model on this data, or pass the prepared data it was trained on.", DataError)


def read_normals(prepared_dir: Path, split: str) -> tuple[list[str], pa.BinaryArray]:
    """(ids, PNG bytes) of the normal images (label_idx 0) of `split`, in file order."""
    from pipeline.data.manifest import read_table

    table = read_table(prepared_dir, split=split, columns=["id", "label_idx", "image_png"])
    table = table.filter(pc.equal(table.column("label_idx"), 0))
    if table.num_rows == 0:
        raise DataError(f"prepared data {prepared_dir} has no normal image (label_idx 0) in split '{split}' "
                        "(generate.normal_split): defects are put on normal images.")
    return table.column("id").to_pylist(), table.column("image_png").combine_chunks()


def output_classes(class_conditional: bool, data_classes: tuple[str, ...]) -> list[OutClass]:
    if not class_conditional:   # one defect domain: label "defect", any class index for synthesize
        return [OutClass(DEFECT_LABEL, DEFECT_LABEL_IDX, 1)]
    return [OutClass(name, k, k) for k, name in enumerate(data_classes) if k >= 1]


# ---- Ray Data stages -------------------------------------------------------------------------

def plan_rows(n: int, *, start: int, bounds: np.ndarray, synth: np.ndarray, out_idx: np.ndarray,
              seed: int, pool_size: int) -> dict[str, np.ndarray]:
    """Positions 0..n-1 of the round -> what to generate. `bounds` are cumulative counts per class."""
    pos = np.arange(n, dtype=np.int64)
    k = np.searchsorted(bounds, pos, side="right")          # class slot of each position
    index = start + pos
    return {"index": index, "label_idx": out_idx[k], "synth_label": synth[k],
            "seed": sample_seeds(seed, index), "normal_index": index % pool_size}


class GenerateActor:
    """Loads the trained EMA generator once per actor; maps plan batches to generated PNGs, each
    on the normal image `normal_index` of the pool (PNG bytes, fetched once per actor)."""

    def __init__(self, model_dir: str, placement: Placement, pool, device: str = "cpu", threads: int = 1):
        torch.set_num_threads(threads)
        self.pool = ray.get(pool) if isinstance(pool, ray.ObjectRef) else pool
        self.sampler = Sampler(load_trained(Path(model_dir), device), placement, device)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        normal_png = self.pool.take(pa.array(batch["normal_index"])).to_pylist()
        out = self.sampler.generate_png(normal_png, batch["synth_label"], batch["seed"], batch["index"])
        return {"index": batch["index"], "label_idx": batch["label_idx"], "seed": batch["seed"],
                "normal_index": batch["normal_index"], **out}


def _num_blocks(n: int, batch_size: int, num_actors: int) -> int:
    """About 4 blocks per actor so every actor gets work, each at least a batch (when there are
    enough samples) and at most max(batch_size, 128) rows: the stream is consumed in order, so a
    big first block delays the first write and a big last block leaves actors idle."""
    rows = math.ceil(n / (4 * num_actors))
    rows = max(rows, min(batch_size, math.ceil(n / num_actors)))
    rows = min(rows, max(batch_size, 128))
    return max(1, math.ceil(n / rows))


def _actor_resources(params: GenerateParams, use_gpu: bool) -> tuple[dict, str]:
    resources = ray.cluster_resources()
    cpus = float(resources.get("CPU", 0))
    need = params.num_actors * params.cpus_per_actor
    if need + HEADROOM_CPUS > cpus:
        raise ParamsError(f"params keys 'generate.num_actors' x 'generate.cpus_per_actor' ask for "
                          f"{need:g} CPUs, but the Ray cluster has {cpus:g}; at least {HEADROOM_CPUS} must stay "
                          "free for the driver. Use fewer actors or a fractional cpus_per_actor.")
    args = {"num_cpus": params.cpus_per_actor}
    if not use_gpu:
        return args, "cpu"
    gpus = float(resources.get("GPU", 0))
    if gpus < 1:
        raise PipelineError("--use-gpu was given but the Ray cluster has no GPU. Drop --use-gpu, "
                            "or connect to a cluster with GPUs (--address).")
    args["num_gpus"] = min(1.0, gpus / params.num_actors)
    return args, "cuda"


def generate_stream(params: GenerateParams, model_dir: Path, placement: Placement, pool_ref, pool_size: int,
                    requests: list[tuple[OutClass, int]], start: int,
                    use_gpu: bool):
    """Yield numpy batches (in index order) of one round: `requests` samples per class from `start`."""
    n = sum(c for _, c in requests)
    bounds = np.cumsum([c for _, c in requests])
    synth = np.array([oc.synth for oc, _ in requests], np.int64)
    out_idx = np.array([oc.label_idx for oc, _ in requests], np.int64)
    actor_args, device = _actor_resources(params, use_gpu)
    plan = pa.table(plan_rows(n, start=start, bounds=bounds, synth=synth, out_idx=out_idx, seed=params.seed,
                              pool_size=pool_size))
    splits = np.array_split(np.arange(n), _num_blocks(n, params.ray_batch_size, params.num_actors))
    # from_blocks, not from_arrow: from_arrow runs a Ray task per block for its metadata, and a
    # worker process that ran a task is not given to an actor, so one of the node's prestarted
    # workers would be lost to the actor pool. from_blocks reads the metadata here.
    ds = ray.data.from_blocks([plan.slice(int(rows[0]), len(rows)) for rows in splits if len(rows)])
    # Ray Data passes an actor's context and UDF by object reference, so Ray core warns (at error
    # level, one line per actor) that a restart could not rebuild it. max_restarts=0: a dead actor
    # fails the stage instead (every sample has its own seed: a rerun gives the same images). Ray
    # 2.60 takes max_restarts only as a deprecated extra keyword (no named parameter before 2.64).
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(GenerateActor, batch_format="numpy", batch_size=params.ray_batch_size,
                            compute=ray.data.ActorPoolStrategy(size=params.num_actors),
                            fn_constructor_kwargs=dict(model_dir=str(Path(model_dir).absolute()),
                                                       placement=placement, pool=pool_ref, device=device,
                                                       threads=max(1, int(params.cpus_per_actor))),
                            max_restarts=0, **actor_args)
    ds.context.execution_options.preserve_order = True   # deterministic keep/drop and row order
    ds.context.enable_progress_bars = False
    yield from ds.iter_batches(batch_size=None, batch_format="numpy")


def _round_requests(classes: list[OutClass], per_class: int, kept: Counter, seen: Counter,
                    passed: Counter, first: bool) -> list[tuple[OutClass, int]]:
    out = []
    for oc in classes:
        deficit = per_class - kept[oc.label]
        if deficit <= 0:
            continue
        if first:
            out.append((oc, deficit))
        else:   # ask for enough that, at the keep rate seen so far, the deficit is filled
            rate = max(MIN_KEEP_RATE, passed[oc.label] / max(1, seen[oc.label]))
            out.append((oc, math.ceil(deficit / rate)))
    return out


class _Selector:
    """Applies the quality filter to the ordered stream and keeps the first `per_class` per class."""

    COLUMNS = ("id", "label", "label_idx", "image_png", "mask_png", "region_png", "model", "seed",
               "normal_id", "mask_fraction")

    def __init__(self, classes: list[OutClass], params: GenerateParams, filtered: bool, model_name: str,
                 normal_ids: list[str]):
        self.classes, self.params, self.filtered = classes, params, filtered
        self.model_name, self.normal_ids = model_name, normal_ids
        self.by_idx = {oc.label_idx: oc for oc in classes}
        self.kept, self.seen, self.passed = Counter(), Counter(), Counter()
        self.dropped = self.surplus = 0

    def requests(self, first: bool) -> list[tuple[OutClass, int]]:
        return _round_requests(self.classes, self.params.per_class, self.kept, self.seen, self.passed, first)

    def take(self, batch: dict[str, np.ndarray]) -> tuple[dict[str, list], list[int]]:
        """(writer rows of the kept samples, their normal-pool indices)."""
        p = self.params
        ok = keep(batch["mask_fraction"], p.min_mask_fraction, p.max_mask_fraction, self.filtered)
        rows: dict[str, list] = {name: [] for name in self.COLUMNS}
        normal_index = []
        for i in range(len(ok)):
            oc = self.by_idx[int(batch["label_idx"][i])]
            self.seen[oc.label] += 1
            if not ok[i]:
                self.dropped += 1
                continue
            self.passed[oc.label] += 1
            if self.kept[oc.label] >= p.per_class:
                self.surplus += 1     # a later round over-asked; first ones (by index) win
                continue
            self.kept[oc.label] += 1
            j = int(batch["normal_index"][i])
            values = (sample_id(oc.label, int(batch["index"][i])), oc.label, oc.label_idx,
                      batch["image_png"][i], batch["mask_png"][i], batch["region_png"][i] or None,
                      self.model_name, int(batch["seed"][i]), self.normal_ids[j],
                      float(batch["mask_fraction"][i]))
            for name, value in zip(self.COLUMNS, values):
                rows[name].append(value)
            normal_index.append(j)
        return rows, normal_index


_REMOTE_ERROR = re.compile(r"pipeline\.[\w.]*?(\w+Error): (.+)")


@contextlib.contextmanager
def _pipeline_errors():
    """Show a PipelineError raised inside a Ray worker (e.g. load_trained in an actor's __init__)
    as that error, not as a Ray traceback. Actor start-up failures reach the driver as
    ActorDiedError carrying only the remote traceback text, so the last error line is parsed."""
    from pipeline import errors

    try:
        yield
    except PipelineError:
        raise
    except Exception as err:
        cause: BaseException | None = err
        seen = set()
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, PipelineError):
                raise cause from None
            cause = getattr(cause, "cause", None) or cause.__cause__
        text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
        found = _REMOTE_ERROR.findall(text)
        if found:
            name, message = found[-1]
            cls = getattr(errors, name, None)
            cls = cls if isinstance(cls, type) and issubclass(cls, PipelineError) else PipelineError
            raise cls(message.strip()) from err
        raise


# ---- entry point -------------------------------------------------------------------------------

def run_generate(params: GenerateParams, model_name: str, model_dir: Path, prepared_dir: Path,
                 out_dir: Path, address: str | None = None, use_gpu: bool = False,
                 track: bool = True, warn_shortfall: bool = True) -> dict:
    """Generate `params.per_class` labelled, masked images per defect class into `out_dir`.

    `warn_shortfall`: print a warning line when the quality filter left classes short (the CLI
    says it in its end line instead, `shortfall_advice`; the manifest records it either way).

    `track`: log params, counts and the manifest/preview to MLflow (pipeline.tracking) at the end.
    Returns the manifest plus run statistics: `seconds` (generation and writing), `img_per_s`
    (synthesised images / seconds) and `startup_s` (until the first batch arrived).
    """
    model_dir, prepared_dir, out_dir = Path(model_dir), Path(prepared_dir), Path(out_dir)
    params.validate("generate")       # also objects built without from_dict (tests, the bench)
    check_out_dir(out_dir)
    data_spec = read_spec(prepared_dir)
    family = load_trained(model_dir)          # TrainingError for a missing/corrupt checkpoint
    check_compatible(model_name, model_dir, family.spec, family.name, data_spec, prepared_dir)
    placement = placement_from_params(params, data_spec.resolution, prepared_dir)   # DataError for bad user masks
    normal_ids, pool = read_normals(prepared_dir, params.normal_split)
    classes = output_classes(family.class_conditional, data_spec.classes)
    filtered = applies_filter(family)
    checkpoint = model_dir / EXPORT_FILE
    sha = file_sha256(checkpoint)
    del family   # the actors load their own copy

    from pipeline.cluster import connect

    t_connect = time.perf_counter()
    started, where = connect(address, use_gpu=use_gpu)
    connect_s = time.perf_counter() - t_connect
    target = params.per_class * len(classes)
    try:
        pool_ref = ray.put(pool)
        t0 = time.perf_counter()
        select = _Selector(classes, params, filtered, model_name, normal_ids)
        next_index, rounds, first_batch_s = 0, 0, None
        with atomic_dir(out_dir) as tmp, \
                console.progress(f"generate {model_name}", total=target, unit="kept") as bar:
            writer = SyntheticWriter(tmp, [oc.label for oc in classes], data_spec.channels)
            bar.update(note="starting generator actors")
            for rnd in range(params.max_rounds):
                requests = select.requests(first=rnd == 0)
                if not requests:
                    break
                rounds += 1
                n = sum(c for _, c in requests)
                done_before = sum(select.seen.values())
                with _pipeline_errors():
                    for batch in generate_stream(params, model_dir, placement, pool_ref, len(pool), requests,
                                                 next_index, use_gpu):
                        if first_batch_s is None:
                            first_batch_s = time.perf_counter() - t0
                        rows, normal_index = select.take(batch)
                        writer.add(rows, lambda i, idx=normal_index: pool[idx[i]].as_py())
                        bar.update(completed=sum(select.kept.values()),
                                   note=f"round {rnd + 1}: {sum(select.seen.values()) - done_before}/{n} asked, "
                                        f"{select.dropped} dropped by the quality filter")
                next_index += n
            seconds = time.perf_counter() - t0
            shortfall = {oc.label: params.per_class - select.kept[oc.label] for oc in classes
                         if select.kept[oc.label] < params.per_class}
            manifest = {
                "model": model_name, "checkpoint": str(checkpoint), "checkpoint_sha256": sha,
                "seed": params.seed, "params": to_dict(params),
                "classes": [oc.label for oc in classes],
                "label_idx": {oc.label: oc.label_idx for oc in classes},
                "data_classes": list(data_spec.classes),
                "resolution": data_spec.resolution, "channels": data_spec.channels,
                "counts": {oc.label: select.kept[oc.label] for oc in classes},
                "generated": next_index, "dropped": select.dropped, "surplus": select.surplus,
                "rounds": rounds, "complete": not shortfall, "shortfall": shortfall,
                "quality_filter": filtered, "placement": params.placement,
                "normal_split": params.normal_split, "normal_images": len(normal_ids),
            }
            writer.close(manifest)
    finally:
        if started:
            ray.shutdown()
    if shortfall and warn_shortfall:
        console.print_line(f"warning: after {rounds} rounds the quality filter left {shortfall} short of "
                           f"generate.per_class={params.per_class}; {shortfall_advice()}")
    # startup_s: until the first ordered batch reached the driver (actor start-up, model load);
    # ray_connect_s: starting or joining Ray.
    stats = {"img_per_s": next_index / max(seconds, 1e-9), "seconds": seconds, "startup_s": first_batch_s,
             "ray_connect_s": connect_s}
    if track:
        _track(params, model_name, manifest, stats, out_dir, model_dir)
    return {**manifest, **stats, "ray": where}


def shortfall_advice() -> str:
    return "raise generate.max_rounds or widen min/max_mask_fraction."


def _track(params: GenerateParams, model_name: str, manifest: dict, stats: dict, out_dir: Path,
           model_dir: Path) -> None:
    from pipeline import tracking

    metrics = {"generated": manifest["generated"], "dropped": manifest["dropped"], **stats,
               **{f"count/{k}": v for k, v in manifest["counts"].items()}}
    # Lineage: the generator file (-> its training run and model version), and this set's manifest
    # (-> evaluate and downstream find this run by it).
    tags = {**tracking.lineage_for_model(model_dir),
            tracking.MANIFEST_SHA_TAG: tracking.file_sha256(out_dir / "manifest.json")}
    tracking.log_generation({"model": model_name, **to_dict(params)}, metrics,
                            [out_dir / "manifest.json", out_dir / "preview.png"], tags=tags)
