"""Defect-GAN ablation on a CPU budget: train in-process (the production Trainer, no Ray), then
measure what the product needs from the samples.

    python bench/bench_defectgan_ablation.py PREPARED OUT KIMG '{"train_control": "masks", ...}' [--placement real]

Overrides are train.defectgan keys (JSON) on top of the family's defaults. After training it
synthesises 30 samples per defect class onto validation normals, with a random box per sample
(--placement random) or a jittered real training mask of the class (--placement real, as
`generate.placement: real_masks`), and prints one JSON line:
    kept            share passing the generation quality filter (mask area in [0.2 %, 90 %])
    mask_in_region  share of the thresholded mask inside the requested region (mean over samples)
    area_0.2-30%    share of samples whose mask covers 0.2 %-30 % of the image (issue 12 "no collapse")
    class_acc       share a classifier trained on the real training split (train_feature_net)
                    assigns to the class asked for; real_test_acc is that classifier's accuracy on
                    the real test split (an upper bound on what samples can score)
and writes OUT/preview.png: per class, 8 samples and their masks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline  # noqa: E402,F401  (offline library defaults)
from pipeline.config import AugmentParams, TrainCommonParams, from_dict, load_params  # noqa: E402
from pipeline.data.datasets import decode_images  # noqa: E402
from pipeline.generation.placement import jitter_mask, random_box, real_class_masks  # noqa: E402
from pipeline.fsutil import file_sha256  # noqa: E402
from pipeline.metrics.features import domain_feature_net, extract_features, predict, train_feature_net  # noqa: E402
from pipeline.metrics.kernel import fid_from_features  # noqa: E402
from pipeline.models import REGISTRY  # noqa: E402
from pipeline.training.loop import Trainer, TrainJob  # noqa: E402

HISTORY_KEYS = ("kimg", "D/cls_acc", "G/cls", "G/mask_mean", "G/restore_mask_mean", "G/mask_in_region", "img_per_s")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("prepared", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("kimg", type=float)
    p.add_argument("overrides", nargs="?", default="{}")
    p.add_argument("--placement", choices=("random", "real"), default="random")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--box-min", type=float, default=0.2, help="placement box side, fraction of the image")
    p.add_argument("--box-max", type=float, default=0.5)
    p.add_argument("--samples", type=int, default=30, help="per defect class")
    p.add_argument("--params", type=Path, default=None,
                   help="start from this params file's train.defectgan / train.common / prepare.augment "
                        "(the overrides then go on top) instead of the family's paper defaults")
    p.add_argument("--scorer", choices=("bench", "evaluate"), default="bench",
                   help="bench: a classifier trained here (20 epochs); evaluate: the evaluate stage's domain "
                        "network with --params' evaluate settings (the DAG's class_accuracy_domain scorer)")
    args = p.parse_args()
    torch.set_num_threads(1)

    overrides = json.loads(args.overrides)
    if args.params is not None:
        params = load_params(args.params)
        # kimg and snapshot_ticks in the family section: there they win over train.common and
        # over a kimg params.yaml sets for defectgan, as the bench's own figures must.
        job = TrainJob.from_params(params, "defectgan", args.prepared, args.out / "model", work_dir=args.out / "work",
                                   overrides={"defectgan": {**overrides, "kimg": args.kimg, "snapshot_ticks": 1000}})
    else:
        common = from_dict(TrainCommonParams, {"kimg": args.kimg, "batch_size": args.batch, "snapshot_ticks": 1000,
                                               "tick_kimg": max(args.kimg / 10, 0.05), "ema_decay": 0.99}, "common")
        cfg = from_dict(REGISTRY["defectgan"].Config, overrides, "train.defectgan")
        job = TrainJob("defectgan", common, cfg, args.prepared, args.out / "model", args.out / "work",
                       augment=AugmentParams(hflip=0.5))
    start = time.time()
    trainer = Trainer(job)
    trainer.run()
    train_s = time.time() - start
    for row in trainer.history[:: max(1, len(trainer.history) // 5)] + trainer.history[-1:]:
        print({k: round(v, 3) for k, v in row.items() if k in HISTORY_KEYS}, flush=True)

    fam = trainer.family
    fam.G.load_state_dict(trainer.ema["G"].state_dict())
    fam.eval()
    train, test = decode_images(args.prepared, "train"), decode_images(args.prepared, "test")
    K, res = fam.spec.num_classes, fam.spec.resolution
    if args.scorer == "evaluate":
        if args.params is None:
            p.error("--scorer evaluate needs --params (its evaluate settings)")
        ev = params.evaluate
        net, _ = domain_feature_net(train["image"].numpy(), train["label"].numpy(), K,
                                    data_digest=file_sha256(args.prepared / "images.parquet"),
                                    epochs=ev.feature_epochs, seed=ev.seed, batch_size=ev.feature_batch_size,
                                    min_steps=ev.feature_min_steps, cache_in=args.out.parent / "feature_net.pt",
                                    cache_out=args.out.parent / "feature_net.pt")
    else:
        net = train_feature_net(train["image"].numpy(), train["label"].numpy(), K, epochs=20, seed=0, min_steps=300)
    real_acc = float((predict(net, test["image"].numpy()) == test["label"].numpy()).mean())
    val = decode_images(args.prepared, "val")
    normals = val["image"][val["label"] == 0]
    class_masks = real_class_masks(args.prepared) if args.placement == "real" else {}
    gen = torch.Generator().manual_seed(0)
    images, labels, regions, masks, inputs = [], [], [], [], []
    for k in range(1, K):
        x = normals[torch.randint(0, len(normals), (args.samples,), generator=gen)].float() / 127.5 - 1
        region = np.stack([jitter_mask(class_masks[k], 1000 * k + i) if k in class_masks
                           else random_box(1000 * k + i, res, args.box_min, args.box_max) for i in range(args.samples)])
        torch.manual_seed(k)
        y, m = fam.synthesize(x, torch.full((args.samples,), k), torch.from_numpy(region).float()[:, None])
        images.append(((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        inputs.append(((x + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels += [k] * args.samples
        regions.append(torch.from_numpy(region).float()[:, None])
        masks.append((m >= 0.5).float())
    images, regions, masks, labels = torch.cat(images), torch.cat(regions), torch.cat(masks), np.array(labels)
    inputs = torch.cat(inputs)
    frac = masks.flatten(1).mean(1)
    mass = masks.flatten(1).sum(1)
    inside = (masks * regions).flatten(1).sum(1)[mass > 0] / mass[mass > 0]
    pred = predict(net, images.numpy())
    # fid_domain of the samples and of their unmodified normal inputs (doing nothing) against the real
    # defect images of val + test, in the scorer's feature space (evaluate's fid_domain, all classes).
    real_defects = np.concatenate([d["image"][d["label"] > 0].numpy() for d in (val, test)])
    real_f = extract_features(net, real_defects)
    fid = fid_from_features(real_f, extract_features(net, images.numpy()))
    fid_nothing = fid_from_features(real_f, extract_features(net, inputs.numpy()))
    confusion = {fam.spec.classes[k]: {fam.spec.classes[j]: int((pred[labels == k] == j).sum()) for j in range(K)}
                 for k in range(1, K)}
    print(json.dumps({
        "train_s": round(train_s), "real_test_acc": round(real_acc, 3),
        "kept": round(float(((frac >= 0.002) & (frac <= 0.9)).float().mean()), 3),
        "mask_in_region": round(float(inside.mean()), 3) if len(inside) else 0.0,
        "area_0.2-30%": round(float(((frac >= 0.002) & (frac <= 0.3)).float().mean()), 3),
        "mean_area": round(float(frac.mean()), 4),
        "class_acc": round(float((pred == labels).mean()), 3),
        "per_class": {fam.spec.classes[k]: round(float((pred[labels == k] == k).mean()), 3) for k in range(1, K)},
        "fid_domain": round(fid, 1), "fid_domain_do_nothing": round(fid_nothing, 1),
        "confusion": confusion,
    }), flush=True)

    rows = []
    for k in range(1, K):
        sel = np.where(labels == k)[0][:8]
        rows.append(np.concatenate([images[i].permute(1, 2, 0).numpy() for i in sel], 1))
        rows.append(np.concatenate([(masks[i, 0].numpy() * 255).astype(np.uint8)[..., None]
                                    .repeat(images.shape[1], -1) for i in sel], 1))
    grid = np.concatenate(rows, 0)
    grid = grid[..., 0] if grid.shape[-1] == 1 else grid
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(args.out / "preview.png")


if __name__ == "__main__":
    main()
