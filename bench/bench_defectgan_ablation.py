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
from pipeline.config import AugmentParams, TrainCommonParams, from_dict  # noqa: E402
from pipeline.data.datasets import decode_images  # noqa: E402
from pipeline.generation.placement import jitter_mask, random_box, real_class_masks  # noqa: E402
from pipeline.metrics.features import predict, train_feature_net  # noqa: E402
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
    p.add_argument("--samples", type=int, default=30, help="per defect class")
    args = p.parse_args()
    torch.set_num_threads(1)

    common = from_dict(TrainCommonParams, {"kimg": args.kimg, "batch_size": args.batch, "snapshot_ticks": 1000,
                                           "tick_kimg": max(args.kimg / 10, 0.05), "ema_decay": 0.99}, "common")
    cfg = from_dict(REGISTRY["defectgan"].Config, json.loads(args.overrides), "train.defectgan")
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
    net = train_feature_net(train["image"].numpy(), train["label"].numpy(), K, epochs=20, seed=0, min_steps=300)
    real_acc = float((predict(net, test["image"].numpy()) == test["label"].numpy()).mean())
    val = decode_images(args.prepared, "val")
    normals = val["image"][val["label"] == 0]
    class_masks = real_class_masks(args.prepared) if args.placement == "real" else {}
    gen = torch.Generator().manual_seed(0)
    images, labels, regions, masks = [], [], [], []
    for k in range(1, K):
        x = normals[torch.randint(0, len(normals), (args.samples,), generator=gen)].float() / 127.5 - 1
        region = np.stack([jitter_mask(class_masks[k], 1000 * k + i) if k in class_masks
                           else random_box(1000 * k + i, res, 0.2, 0.5) for i in range(args.samples)])
        torch.manual_seed(k)
        y, m = fam.synthesize(x, torch.full((args.samples,), k), torch.from_numpy(region).float()[:, None])
        images.append(((y + 1) * 127.5).round().clamp(0, 255).to(torch.uint8))
        labels += [k] * args.samples
        regions.append(torch.from_numpy(region).float()[:, None])
        masks.append((m >= 0.5).float())
    images, regions, masks, labels = torch.cat(images), torch.cat(regions), torch.cat(masks), np.array(labels)
    frac = masks.flatten(1).mean(1)
    mass = masks.flatten(1).sum(1)
    inside = (masks * regions).flatten(1).sum(1)[mass > 0] / mass[mass > 0]
    pred = predict(net, images.numpy())
    print(json.dumps({
        "train_s": round(train_s), "real_test_acc": round(real_acc, 3),
        "kept": round(float(((frac >= 0.002) & (frac <= 0.9)).float().mean()), 3),
        "mask_in_region": round(float(inside.mean()), 3) if len(inside) else 0.0,
        "area_0.2-30%": round(float(((frac >= 0.002) & (frac <= 0.3)).float().mean()), 3),
        "mean_area": round(float(frac.mean()), 4),
        "class_acc": round(float((pred == labels).mean()), 3),
        "per_class": {fam.spec.classes[k]: round(float((pred[labels == k] == k).mean()), 3) for k in range(1, K)},
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
