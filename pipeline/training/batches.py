"""Training batches from pre-decoded uint8 tensors held in memory.

Images are decoded from the prepared Parquet once per worker (its shard only), so the step never
waits on PNG decoding. Sampling uses a private torch.Generator and augmentation is seeded from
(seed, draw counter), so the sampler state is a few integers and a resumed run draws exactly the
batches an uninterrupted one would have drawn.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.errors import DataError


def to_float(images_u8: torch.Tensor) -> torch.Tensor:
    """uint8 (B, C, H, W) -> float in [-1, 1]."""
    return images_u8.float().div_(127.5).sub_(1.0)


class Pool:
    """One sampling pool of aligned tensors (same first dimension), drawn in shuffled epochs."""

    def __init__(self, tensors: dict[str, torch.Tensor], generator: torch.Generator, name: str):
        sizes = {t.shape[0] for t in tensors.values()}
        if len(sizes) != 1 or 0 in sizes:
            raise DataError(f"training pool '{name}' is empty on this worker. Prepare more images or use fewer workers.")
        self.tensors, self.gen, self.n = tensors, generator, sizes.pop()
        self.order = torch.randperm(self.n, generator=self.gen)
        self.pos = 0

    def draw(self, k: int) -> dict[str, torch.Tensor]:
        idx = []
        while len(idx) < k:
            if self.pos >= self.n:
                self.order, self.pos = torch.randperm(self.n, generator=self.gen), 0
            take = min(k - len(idx), self.n - self.pos)
            idx.extend(self.order[self.pos:self.pos + take].tolist())
            self.pos += take
        index = torch.tensor(idx)
        return {key: t[index] for key, t in self.tensors.items()}

    def state_dict(self) -> dict:
        return {"order": self.order, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.pos = state["order"], int(state["pos"])


class BatchSource:
    """Batches in the layout `data_kind` asks for (see pipeline/models/base.py)."""

    def __init__(self, data_kind: str, prepared_dir: Path, seed: int, shard: tuple[int, int],
                 augment=None, split: str = "train"):
        from pipeline.data.datasets import decode_images, decode_pairs, unpaired_normal_mask

        self.kind, self.augment, self.seed = data_kind, augment, seed
        self.gen = torch.Generator().manual_seed(seed)
        self.draws = 0
        if data_kind == "paired":
            pairs = decode_pairs(prepared_dir, split=split, shard=shard)
            self.pools = {"pair": Pool(pairs, self.gen, "paired")}
        else:
            data = decode_images(prepared_dir, split=split, shard=shard)
            if data_kind == "labelled":
                self.pools = {"all": Pool(data, self.gen, "images")}
            elif data_kind == "unpaired":
                # Normals whose source also has a defect image are left out, so the two
                # domains never share a physical part (prepare marks them).
                normal = torch.as_tensor(unpaired_normal_mask(prepared_dir, split, shard))
                defect = data["label"] != 0
                self.pools = {"a": Pool({k: v[normal] for k, v in data.items()}, self.gen, "normal"),
                              "b": Pool({k: v[defect] for k, v in data.items()}, self.gen, "defect")}
            else:
                raise ValueError(f"unknown data kind {data_kind!r}")

    def _augment(self, images: list[torch.Tensor], mask: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """One albumentations draw per sample, applied identically to its image(s) and mask.

        A pair's second image goes in under the target name the Compose registers for it
        (transforms.PAIR_TARGET); under any other name albumentations would pass it through
        untouched while A and the mask flip.
        """
        if self.augment is None:
            return images, mask
        from pipeline.data.transforms import PAIR_TARGET

        names = ["image", PAIR_TARGET][: len(images)]
        out_imgs = [img.clone() for img in images]
        out_mask = mask.clone()
        for i in range(mask.shape[0]):
            self.augment.set_random_seed(self.seed * 1_000_003 + self.draws * 4099 + i)
            arrays = {name: img[i].permute(1, 2, 0).numpy() for name, img in zip(names, images)}
            res = self.augment(**arrays, mask=mask[i, 0].numpy())
            for name, out in zip(names, out_imgs):
                out[i] = torch.from_numpy(np.ascontiguousarray(res[name])).permute(2, 0, 1)
            out_mask[i, 0] = torch.from_numpy(np.ascontiguousarray(res["mask"]))
        return out_imgs, out_mask

    def next(self, batch_size: int, device: torch.device, channels_last: bool = False) -> dict[str, torch.Tensor]:
        fmt = torch.channels_last if channels_last else torch.contiguous_format

        def img(t):
            return to_float(t).to(device, non_blocking=True).contiguous(memory_format=fmt)

        def msk(t):
            return t.float().to(device, non_blocking=True)

        if self.kind == "labelled":
            d = self.pools["all"].draw(batch_size)
            (x,), m = self._augment([d["image"]], d["mask"])
            batch = {"image": img(x), "mask": msk(m), "label": d["label"].to(device)}
        elif self.kind == "paired":
            d = self.pools["pair"].draw(batch_size)
            (a, b), m = self._augment([d["a"], d["b"]], d["mask"])
            batch = {"a": img(a), "b": img(b), "mask": msk(m), "label": d["label"].to(device)}
        else:
            da, db = self.pools["a"].draw(batch_size), self.pools["b"].draw(batch_size)
            (a,), _ = self._augment([da["image"]], da["mask"])
            (b,), mb = self._augment([db["image"]], db["mask"])
            batch = {"a": img(a), "b": img(b), "label_b": db["label"].to(device), "mask_b": msk(mb),
                     "has_mask_b": db["has_mask"].to(device)}
        self.draws += 1
        return batch

    def state_dict(self) -> dict:
        return {"gen": self.gen.get_state(), "draws": self.draws,
                "pools": {k: p.state_dict() for k, p in self.pools.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.draws = int(state["draws"])
        for k, p in self.pools.items():
            p.load_state_dict(state["pools"][k])
