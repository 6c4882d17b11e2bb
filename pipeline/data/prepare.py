"""`pipeline prepare`: source -> validated, converted, split Parquet dataset (+ stats, preview).

    run_prepare(params.prepare, Path("data/prepared")) -> stats dict

Everything is written into a temporary sibling folder and renamed into place at the end
(`pipeline.fsutil.atomic_dir`): a failure leaves no partial output and keeps the previous one.
The output is a pure function of the params and the input files: the same seed gives
byte-identical files.
"""

from __future__ import annotations

import sys
import time
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator, TypeVar

from pipeline.data import manifest as mf
from pipeline.data.images import BadInput, encode_mask_png, encode_png
from pipeline.data.importers import NORMAL, Collected, Ctx, collect
from pipeline.data.split import SPLITS, UnionFind, assign_splits
from pipeline.errors import DataError
from pipeline.fsutil import atomic_dir

T = TypeVar("T")


# --------------------------------------------------------------------------- small helpers

def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _progress(items: list[T], description: str) -> Iterator[T]:
    """Iterate with a rich progress bar on a terminal (plain iteration otherwise)."""
    if not sys.stderr.isatty() or len(items) < 2:
        yield from items
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  console=_console(), transient=True) as progress:
        task = progress.add_task(description, total=len(items))
        for item in items:
            yield item
            progress.advance(task)


def _check_out_dir(out_dir: Path) -> None:
    out_dir = Path(out_dir)
    for parent in [out_dir, *out_dir.absolute().parents]:
        if parent.exists() and not parent.is_dir():
            what = "is a file" if parent == out_dir else f"cannot be created: {parent} is a file, not a folder"
            raise DataError(f"output folder {out_dir} {what}. Choose another --out folder.")
        if parent.exists():
            break
    # Hidden files (a DVC/git .gitignore) do not make a folder "user data"; atomic_dir keeps them.
    visible = [p for p in out_dir.iterdir() if not p.name.startswith(".")] if out_dir.is_dir() else []
    if visible and not (out_dir / mf.CLASSES_FILE).is_file():
        raise DataError(f"output folder {out_dir} is not empty and is not a prepared dataset (no "
                        f"{mf.CLASSES_FILE}); refusing to replace it. Choose another --out folder or empty it.")


def _counts(rows: list[dict], classes: list[str]) -> dict:
    by_class = {c: {**{s: 0 for s in SPLITS}, "total": 0} for c in classes}
    by_split = {s: 0 for s in SPLITS}
    for r in rows:
        by_class[r["label"]][r["split"]] += 1
        by_class[r["label"]]["total"] += 1
        by_split[r["split"]] += 1
    return {"total": len(rows), "by_split": by_split, "by_class": by_class,
            "with_mask": sum(1 for r in rows if r["has_mask"])}


def _unique_ids(rows: Iterable[dict]) -> None:
    seen: Counter = Counter()
    for r in rows:
        seen[r["id"]] += 1
        if seen[r["id"]] > 1:
            r["id"] = f"{r['id']}#{seen[r['id']]}"


# Row keys used while preparing only (write_table writes the schema's columns alone).
_FILE = "_file"                  # the input file, for messages
_MARKS_DEFECT = "_marks_defect"  # the row's mask marks at least one pixel
_CONFLICT = "_conflict"          # left out: same pixels as a row with another label


def _file(row: dict) -> str:
    return row.get(_FILE) or row["source_path"]


def _label_conflicts(rows: list[dict]) -> list[tuple[BadInput, str]]:
    """Rows with the same pixels under different labels: mark them (`_CONFLICT`) and say why.

    The same image cannot be both normal and scratch (a file copied into the wrong folder). A
    copy whose mask marks defect pixels is evidence of its label: when the copies with such a
    mask all have one label, those copies are kept. Otherwise nothing tells which label is right
    and every copy is left out (strict: the run stops), each naming the others.
    """
    by_hash: dict[str, list[dict]] = {}
    for r in rows:
        by_hash.setdefault(r["content_hash"], []).append(r)
    out = []
    for copies in by_hash.values():
        labels = sorted({r["label"] for r in copies})
        if len(labels) < 2:
            continue
        masked = {r["label"] for r in copies if r["has_mask"] and r[_MARKS_DEFECT]}
        keep = next(iter(masked)) if len(masked) == 1 else None
        for r in copies:
            if r["label"] == keep:
                continue
            r[_CONFLICT] = True
            others = ", ".join(f"{_file(o)} ('{o['label']}')" for o in copies if o is not r)
            verdict = (f"kept as '{keep}', whose mask marks the defect" if keep else
                       "every copy is left out, nothing tells which label is right")
            out.append((BadInput(_file(r), f"has the same pixels as {others} but is labelled '{r['label']}'; "
                                           f"{verdict}", "delete the copy in the wrong class folder"), r["label"]))
    return out


# --------------------------------------------------------------------------- main

def run_prepare(params, out_dir: Path, *, quiet: bool = False) -> dict:
    """Build the prepared dataset in `out_dir` and return its stats (also written to stats.json).

    The returned dict is stats.json plus "elapsed_s" and "out_dir". `quiet` skips the summary line.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    with atomic_dir(out_dir) as tmp:
        stats = _prepare_into(params, Path(tmp))
    elapsed = time.perf_counter() - started
    if quiet:
        return {**stats, "elapsed_s": elapsed, "out_dir": str(out_dir)}
    con = _console()
    im, pr = stats["images"], stats["paired"]
    what = "patches" if "patches" in stats else "images"
    con.print(f"prepared {im['total']} {what} ({', '.join(f'{s} {n}' for s, n in im['by_split'].items())}) and "
              f"{pr['total']} pairs, {len(stats['classes'])} classes ({', '.join(stats['classes'])}), "
              f"{stats['resolution']} px x {stats['channels']} ch -> {out_dir} in {elapsed:.1f} s")
    if stats["skipped_count"]:
        con.print(f"[yellow]{stats['skipped_count']} file(s) skipped; reasons in {out_dir / mf.STATS_FILE}[/yellow]")
    return {**stats, "elapsed_s": elapsed, "out_dir": str(out_dir)}


def _add_pseudo_masks(image_rows: list[dict], params) -> dict | None:
    """Give defect rows without a mask a pseudo-mask (`prepare.pseudo_masks`), in place.

    The references are the training split's normal images. Returns what stats.json records, or
    None when the method is "none" or no row lacks a mask."""
    targets = [r for r in image_rows if r["label"] != NORMAL and not r["has_mask"]]
    if params.method == "none" or not targets:
        return None
    import numpy as np

    from pipeline.data.images import decode_png
    from pipeline.data.pseudo_masks import normal_reference_masks

    normals = [r for r in image_rows if r["label"] == NORMAL and r["split"] == "train"]
    if len(normals) <= params.neighbours:
        raise DataError(f"prepare.pseudo_masks.method is '{params.method}' but the training split has "
                        f"{len(normals)} normal image(s), and it needs more than prepare.pseudo_masks.neighbours "
                        f"({params.neighbours}). Add normal images or set prepare.pseudo_masks.method: none.")
    found = normal_reference_masks(np.stack([decode_png(r["image_png"]) for r in targets]),
                                   np.stack([decode_png(r["image_png"]) for r in normals]),
                                   params.neighbours, params.quantile, params.min_area)
    masked = 0
    for row, mask in zip(targets, found.masks):
        if mask.any():
            row["mask_png"], row["has_mask"] = encode_mask_png(mask), True
            masked += 1
    areas = [float(m.mean()) for m in found.masks if m.any()]
    return {"method": params.method, "neighbours": params.neighbours, "quantile": params.quantile,
            "min_area": params.min_area,
            "threshold": round(found.threshold, 6), "masked": masked, "empty": len(targets) - masked,
            "mean_area": round(float(np.mean(areas)), 6) if areas else 0.0}


def _prepare_into(p, tmp: Path) -> dict:
    col: Collected = collect(p)
    ctx = Ctx(resolution=p.resolution, channels=p.channels, resize=p.resize, mask_threshold=p.mask_threshold)
    classes = [NORMAL] + list(col.classes)
    label_idx = {c: i for i, c in enumerate(classes)}
    skipped: list[dict] = []

    def bad(err: BadInput, label: str | None = None) -> None:
        if p.strict:
            raise err
        skipped.append({"path": err.path, "reason": err.reason, **({"label": label} if label else {})})

    for err in col.problems:
        bad(err)
    if p.resize == "patches":
        return _prepare_patches(p, tmp, col, ctx, classes, label_idx, skipped, bad)

    res, ch = p.resolution, p.channels
    image_rows: list[dict] = []
    pair_rows: list[dict] = []

    def image_row(id_, label, img, mask, has_mask, source_path, source_id) -> dict:
        png = encode_png(img)
        return {"schema_version": mf.SCHEMA_VERSION, "id": id_, "split": None, "label": label,
                "label_idx": label_idx[label], "image_png": png, "mask_png": encode_mask_png(mask),
                "has_mask": bool(has_mask), "unpaired_pool": False, "width": res, "height": res, "channels": ch,
                "source_path": source_path, "source_id": source_id, "content_hash": mf.sha256(png),
                _MARKS_DEFECT: bool(mask.any())}

    for item in _progress(col.images, f"{p.source}: images"):
        try:
            loaded = item.load(ctx)
        except BadInput as err:
            bad(err, item.label)
            continue
        row = image_row(item.id, loaded.label or item.label, loaded.image, loaded.mask, loaded.has_mask,
                        item.source_path, item.source_id)
        row[_FILE] = str(getattr(item, "path", "") or item.source_path)
        image_rows.append(row)
    for item in _progress(col.pairs, f"{p.source}: pairs"):
        try:
            pair = item.load(ctx)
        except BadInput as err:
            bad(err, item.label)
            continue
        a_png, b_png = encode_png(pair.a), encode_png(pair.b)
        pair_rows.append({"schema_version": mf.SCHEMA_VERSION, "id": item.id, "split": None, "label": item.label,
                          "label_idx": label_idx[item.label], "a_png": a_png, "b_png": b_png,
                          "mask_png": encode_mask_png(pair.mask), "has_mask": bool(pair.has_mask),
                          "width": res, "height": res, "channels": ch, "source_path": item.source_path,
                          "source_id": item.source_id, "content_hash": mf.sha256(a_png, b_png)})
        if item.add_to_images:
            import numpy as np

            image_rows.append(image_row(f"{item.id}/A", NORMAL, pair.a, np.zeros_like(pair.mask), True,
                                        item.a_source_path or item.source_path, item.source_id))
            image_rows.append(image_row(f"{item.id}/B", item.label, pair.b, pair.mask, pair.has_mask,
                                        item.b_source_path or item.source_path, item.source_id))
    for err, label in _label_conflicts(image_rows):
        bad(err, label)
    image_rows = [r for r in image_rows if not r.get(_CONFLICT)]
    _unique_ids(image_rows)
    _unique_ids(pair_rows)

    # Every class must have usable images, or training would silently lose it.
    have = Counter(r["label"] for r in image_rows) + Counter(r["label"] for r in pair_rows)
    for cls in col.classes:
        if not have[cls]:
            reasons = "; ".join(f"{s['path']}: {s['reason']}" for s in skipped[:3])
            if p.source == "segmentation" and not reasons:
                raise DataError(f"class '{cls}' of prepare.segmentation.class_names is never the class with the "
                                "most pixels in an image, so no whole-image row has it (an image takes its "
                                "majority class). Set prepare.resize: patches (each defect component takes its "
                                "own class), or remove the class from prepare.segmentation.class_names.")
            raise DataError(f"class '{cls}' has no usable images" + (f" (skipped: {reasons})" if reasons else "")
                            + ". Fix or replace its files.")
    if not image_rows and not pair_rows:
        raise DataError(f"source '{p.source}' produced no usable images. See the files listed above.")

    groups = _split(p, image_rows, pair_rows, label_idx, skipped)
    for r in image_rows + pair_rows:
        r["split"] = groups.split_of(r)
    # Unpaired pools: defect images, and normal images whose source has no defect image.
    for r in image_rows:
        r["unpaired_pool"] = r["label"] != NORMAL or groups.stratum_of(r) == NORMAL
    pseudo = _add_pseudo_masks(image_rows, p.pseudo_masks)
    order = {s: i for i, s in enumerate(SPLITS)}
    image_rows.sort(key=lambda r: (order[r["split"]], r["label_idx"], r["id"]))
    pair_rows.sort(key=lambda r: (order[r["split"]], r["label_idx"], r["id"]))

    notes = _notes(col, ctx, groups.duplicates)
    excluded = sum(1 for r in image_rows if r["label"] == NORMAL and not r["unpaired_pool"])
    if excluded:
        notes.append(f"{excluded} normal image(s) share a source with a defect image and are left out of the "
                     "unpaired normal pool (unpaired_pool false)")
    if pseudo:
        notes.append(f"{pseudo['masked']} defect image(s) without a mask got a pseudo-mask "
                     f"(prepare.pseudo_masks.method {pseudo['method']}); {pseudo['empty']} came out empty "
                     "and stay unknown (has_mask false)")
    from pipeline.data.preview import make_preview

    return _write(p, tmp, col, classes, image_rows, pair_rows, skipped, notes, pseudo, mf.SCHEMA_VERSION,
                  (mf.IMAGES_SCHEMA, mf.PAIRED_SCHEMA), {},
                  lambda path: make_preview(image_rows, pair_rows, classes, path))


# --------------------------------------------------------------------------- shared steps

class _Groups:
    """The split of every group of rows (rows sharing a source id or byte-identical content)."""

    def __init__(self, uf: UnionFind, strata: dict[str, str], split_of: dict[str, str], duplicates: int):
        self.uf, self.strata, self._split_of, self.duplicates = uf, strata, split_of, duplicates

    def split_of(self, row: dict) -> str:
        return self._split_of[self.uf.find(row["source_id"])]

    def stratum_of(self, row: dict) -> str:
        return self.strata[self.uf.find(row["source_id"])]


def _split(p, image_rows: list[dict], pair_rows: list[dict], label_idx: dict[str, int],
           skipped: list[dict]) -> _Groups:
    """Group rows (same source id, or byte-identical content: `content_hash`), stratify each group
    by its most common defect class, and split the groups (pipeline/data/split.py)."""
    uf = UnionFind()
    for r in image_rows + pair_rows:
        uf.find(r["source_id"])
    first_by_hash: dict[str, str] = {}
    duplicates = 0
    for r in image_rows:
        prev = first_by_hash.setdefault(r["content_hash"], r["source_id"])
        if prev != r["source_id"]:
            duplicates += 1
            uf.union(prev, r["source_id"])
    group_labels: dict[str, Counter] = {}
    for r in image_rows:
        group_labels.setdefault(uf.find(r["source_id"]), Counter())[r["label"]] += 1
    strata: dict[str, str] = {}
    for g, labels in group_labels.items():
        defects = [(-n, label_idx[c], c) for c, n in labels.items() if c != NORMAL]
        strata[g] = min(defects)[2] if defects else NORMAL
    # Pairs whose source has no image rows (synthetic pairs) are stratified by class when every
    # class has enough pairs for the split, else as one set; a tiny paired set never fails.
    pair_only: dict[str, str] = {}
    for r in pair_rows:
        g = uf.find(r["source_id"])
        if g not in strata:
            pair_only.setdefault(g, r["label"])
    need = sum(1 for f in (p.split.train, p.split.val, p.split.test) if f > 0)
    per_label = Counter(pair_only.values())
    by_class = all(n >= need for n in per_label.values())
    for g, label in pair_only.items():
        strata[g] = f"paired:{label}" if by_class else "paired:*"
    per_stratum: Counter = Counter()
    for r in image_rows:
        per_stratum[strata[uf.find(r["source_id"])]] += 1
    for r in pair_rows:
        g = uf.find(r["source_id"])
        if strata[g].startswith("paired:"):
            per_stratum[strata[g]] += 1
    what = {s: (f"paired set class '{s[7:]}'" if s.startswith("paired:") else f"class '{s}'") for s in strata.values()}
    for s_name in what:
        lost = [x for x in skipped if x.get("label") == s_name]
        if lost:
            what[s_name] += (f" ({len(lost)} more skipped as bad files, e.g. {lost[0]['path']}: "
                             f"{lost[0]['reason']})")
    fractions = {"train": p.split.train, "val": p.split.val, "test": p.split.test}
    lenient = frozenset(s for s in strata.values() if s.startswith("paired:"))
    split_of = assign_splits(strata, per_stratum, fractions, p.seed, what, lenient=lenient)
    return _Groups(uf, strata, split_of, duplicates)


def _notes(col: Collected, ctx: Ctx, duplicates: int) -> list[str]:
    notes = list(col.notes)
    for what_, n in sorted(ctx.notes.items()):
        shown = getattr(ctx.notes, "examples", {}).get(what_)
        notes.append(f"{n} image(s): {what_}" + (f": {', '.join(shown)}{' ...' if n > len(shown) else ''}"
                                                  if shown else ""))
    if duplicates:
        notes.append(f"{duplicates} image(s) byte-identical to another image after conversion: kept in the "
                     "same split as their duplicate")
    return notes


def _write(p, tmp: Path, col: Collected, classes: list[str], image_rows: list[dict], pair_rows: list[dict],
           skipped: list[dict], notes: list[str], pseudo: dict | None, version: int, schemas: tuple,
           extra: dict, preview) -> dict:
    """Write the tables, classes.json, stats.json (+ `extra` keys) and the preview; return the stats."""
    mf.write_table(image_rows, schemas[0], tmp / mf.IMAGES_FILE)
    mf.write_table(pair_rows, schemas[1], tmp / mf.PAIRED_FILE)
    mf.write_json(tmp / mf.CLASSES_FILE, {"classes": classes, "resolution": p.resolution, "channels": p.channels,
                                          "schema_version": version})
    if skipped:
        notes.append(f"{len(skipped)} file(s) skipped (prepare.strict is false); see 'skipped'")
    images_stats = _counts(image_rows, classes)
    images_stats["unpaired_normal_pool"] = sum(1 for r in image_rows if r["label"] == NORMAL and r["unpaired_pool"])
    images_stats["unpaired_defect_pool"] = sum(1 for r in image_rows if r["label"] != NORMAL)
    stats = {
        "schema_version": version,
        "source": p.source,
        "source_root": col.root,
        "resolution": p.resolution,
        "channels": p.channels,
        "seed": p.seed,
        "classes": classes,
        "images": images_stats,
        "paired": _counts(pair_rows, classes),
        **extra,
        "pseudo_masks": pseudo,
        "skipped_count": len(skipped),
        "skipped": skipped,
        "notes": notes,
    }
    mf.write_json(tmp / mf.STATS_FILE, stats)
    preview(tmp / mf.PREVIEW_FILE)
    return stats


# --------------------------------------------------------------------------- patch mode

_SOURCE_LABEL = "_source_label"   # patch rows: the class of the image the patch was cut from


def _prepare_patches(p, tmp: Path, col: Collected, ctx: Ctx, classes: list[str], label_idx: dict[str, int],
                     skipped: list[dict], bad) -> dict:
    """`prepare.resize: patches`: rows are patches cut at native scale (pipeline/data/patches.py).

    Pass 1 reads every image and mask and plans its candidate patches; the images are then
    split (grouped by source, stratified by the image's class, as whole images are), the caps
    pick among the candidates of each split, and pass 2 reads again only the images that keep a
    patch and cuts them (memory holds one image at a time, whatever the dataset's size)."""
    import numpy as np

    from pipeline.data import patches as pt
    from pipeline.data.preview import make_patch_preview, patch_tile, source_tile

    pp, size = p.patches, p.resolution
    read_ctx = ctx
    if col.pairs:
        raise DataError(f"prepare.resize is 'patches' but source '{p.source}' gives image pairs; patch mode "
                        "cuts single images. Set prepare.resize: crop.")
    records: list[dict] = []
    for item in _progress(col.images, f"{p.source}: reading images"):
        try:
            native = item.load_native(ctx)
        except BadInput as err:
            bad(err, item.label or None)
            continue
        plan = pt.plan_image(native, pp, size, pt.image_rng(p.seed, item.id))
        records.append({"item": item, "plan": plan, "label": native.label, "source_id": item.source_id,
                        "content_hash": plan.content_hash, "has_mask": native.has_mask,
                        _MARKS_DEFECT: bool(native.mask.any()), _FILE: str(getattr(item, "path", item.source_path))})
    for err, label in _label_conflicts(records):
        bad(err, label)
    records = [r for r in records if not r.get(_CONFLICT)]
    if not records:
        raise DataError(f"source '{p.source}' produced no usable images. See the files listed above.")
    without = [{"path": r[_FILE], "reason": r["plan"].why_no_defect_patch} for r in records
               if r["label"] != NORMAL and not r["plan"].defect]
    have = Counter(w.label for r in records for w in r["plan"].defect)
    for cls in col.classes:
        if not have[cls]:
            why = "; ".join(f"{s['path']}: {s['reason']}" for s in (without + skipped)[:3])
            raise DataError(f"class '{cls}' yields no defect patch" + (f" ({why})" if why else "")
                            + ". Fix its masks or files, or remove the class.")

    groups = _split(p, records, [], label_idx, skipped)
    fractions = {"train": p.split.train, "val": p.split.val, "test": p.split.test}
    for r in records:
        r["split"] = groups.split_of(r)

    # ---- caps: each (class, split) takes its share, one patch per source image in turn
    candidates: dict[tuple[str, str], dict[str, list]] = {}
    for r in records:
        for w in r["plan"].defect + r["plan"].normal:
            candidates.setdefault((w.label, r["split"]), {}).setdefault(r["item"].id, []).append((r["item"].id, w))
    keep: dict[str, list] = {}
    for (label, split), by_image in sorted(candidates.items()):
        cap = pt.shares(pp.max_normal if label == NORMAL else pp.max_defect_per_class, fractions)[split]
        rng = np.random.default_rng([p.seed, zlib.crc32(f"patches/{label}/{split}".encode())])
        for image_id, w in pt.round_robin(by_image, cap, rng):
            keep.setdefault(image_id, []).append(w)

    # ---- pass 2: cut the kept patches (conversions were counted in pass 1)
    ctx = Ctx(resolution=ctx.resolution, channels=ctx.channels, resize=ctx.resize, mask_threshold=ctx.mask_threshold)
    res, ch = size, p.channels
    rows: list[dict] = []
    sources: list = []                           # preview tiles of a few source images with their patches
    for r in _progress([r for r in records if r["item"].id in keep], f"{p.source}: cutting patches"):
        item = r["item"]
        windows = sorted(keep[item.id], key=lambda w: (w.label == NORMAL, w.y, w.x))
        try:
            cut, image, mask = pt.cut(item.load_native(ctx), windows, size, pp.scale)
        except BadInput as err:                  # the file changed since pass 1
            raise DataError(f"{err.path} could be read a moment ago but not now ({err.reason}); run prepare "
                            "again once the files no longer change.") from None
        for w, img, m in cut:
            png = encode_png(img)
            rows.append({"schema_version": mf.PATCH_SCHEMA_VERSION, "id": f"{item.id}#x{w.x}y{w.y}",
                         "split": r["split"], "label": w.label, "label_idx": label_idx[w.label], "image_png": png,
                         "mask_png": encode_mask_png(m), "has_mask": True, "unpaired_pool": True,
                         "width": res, "height": res, "channels": ch, "source_path": item.source_path,
                         "source_id": item.source_id, "content_hash": mf.sha256(png),
                         "source_image": item.id, "patch_x": w.x, "patch_y": w.y, "scale": float(pp.scale),
                         _SOURCE_LABEL: r["label"]})
        # Preview: the first few source images that keep a defect and a normal patch.
        if len(sources) < 8 and len({w.label == NORMAL for w in windows}) == 2:
            sources.append(source_tile(image, mask, windows, size, patch_tile(size)))
    _unique_ids(rows)
    order = {s: i for i, s in enumerate(SPLITS)}
    rows.sort(key=lambda r: (order[r["split"]], r["label_idx"], r["id"]))

    notes = _notes(col, read_ctx, groups.duplicates)
    plans = [r["plan"] for r in records]
    n_defect_images = sum(1 for r in records if r["label"] != NORMAL)
    cand = {c: {**{s: 0 for s in SPLITS}, "total": 0} for c in classes}
    for (label, split), by_image in candidates.items():
        n = sum(len(v) for v in by_image.values())
        cand[label][split] += n
        cand[label]["total"] += n
    from_defect = sum(1 for r in rows if r["label"] == NORMAL and r[_SOURCE_LABEL] != NORMAL)
    patch_stats = {
        "size": size,
        "scale": pp.scale,
        "source_images": {"total": len(records), "defect": n_defect_images, "normal": len(records) - n_defect_images,
                          "by_split": {s: sum(1 for r in records if r["split"] == s) for s in SPLITS},
                          "with_patches": len(keep), "padded": sum(1 for x in plans if x.padded)},
        "components": {"with_patch": sum(sum(x.components.values()) for x in plans),
                       "by_class": {c: sum(x.components.get(c, 0) for x in plans) for c in col.classes},
                       "larger_than_patch": sum(x.larger_than_patch for x in plans),
                       "below_min_component_px": sum(x.too_small for x in plans)},
        "candidates": cand,
        "normal_from": {"normal_images": sum(1 for r in rows if r["label"] == NORMAL) - from_defect,
                        "defect_images": from_defect},
        "defect_images_without_patch": len(without),
        "without_patch": without,
    }
    notes.append(f"patch mode: {len(rows)} patches of {size} px cut at scale {pp.scale:g} from {len(keep)} of "
                 f"{len(records)} image(s); rows are patches (source_image, patch_x, patch_y, scale link each to "
                 "its image); every patch is in the unpaired pools (a normal patch is another region than "
                 "any defect patch)")
    if without:
        notes.append(f"{len(without)} defect image(s) give no defect patch; see patches.without_patch")
    return _write(p, tmp, col, classes, rows, [], skipped, notes, None, mf.PATCH_SCHEMA_VERSION,
                  (mf.PATCH_IMAGES_SCHEMA, mf.PATCH_PAIRED_SCHEMA), {"patches": patch_stats},
                  lambda path: make_patch_preview(rows, classes, sources, size, path))
