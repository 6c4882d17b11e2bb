"""The domain feature network: a small CNN the pipeline trains on the real training images.

Published FID/KID use ImageNet-trained Inception features, which need a download and know
little about, say, scratches on brushed metal. Instead we train this network to classify the
real classes (normal + defect classes) of the prepared training split for
`evaluate.feature_epochs` epochs (seeded), and use its penultimate layer (global-average-
pooled last conv block, `feature_dim` values) as the embedding for `kid_domain`,
`fid_domain`, `mmd_domain`. These are "domain" features, not Inception: values depend on this
dataset and this network and are not comparable with published FIDs.

The trained network is cached as `<evaluate out>/feature_net.pt`, keyed by the prepared data's
content hash and the training settings, so re-evaluating new synthetic sets reuses it.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import Progress
from torch import nn

from pipeline.fsutil import atomic_file

ARCH_VERSION = 1          # bump when the architecture or training recipe changes (invalidates caches)
CACHE_NAME = "feature_net.pt"


def _conv_bn(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DomainFeatureNet(nn.Module):
    """conv stages (each halves the side) -> global average pool (features) -> linear classifier."""

    def __init__(self, channels: int, num_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.config = dict(channels=channels, num_classes=num_classes, width=width, feature_dim=feature_dim)
        self.trunk = nn.Sequential(
            _conv_bn(channels, width), _conv_bn(width, width, 2),               # (B, w, H/2, W/2)
            _conv_bn(width, 2 * width), _conv_bn(2 * width, 2 * width, 2),      # (B, 2w, H/4, W/4)
            _conv_bn(2 * width, feature_dim), _conv_bn(feature_dim, feature_dim, 2),  # (B, D, H/8, W/8)
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.trunk(x).mean(dim=(2, 3))          # (B, D): the penultimate layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, x: torch.Tensor, batch_size: int) -> None:
    """Re-estimate BatchNorm running statistics as exact averages over `x` (B, C, H, W).

    A short training run leaves the running statistics dominated by their initial values
    (momentum 0.1 per step), so eval-mode outputs would be mis-scaled; one pass in train mode
    with cumulative averaging (momentum=None) fixes that. Weights are not changed.
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns or len(x) == 0:
        return
    momenta = [m.momentum for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for start in range(0, len(x), batch_size):
        model(x[start:start + batch_size])
    for m, momentum in zip(bns, momenta):
        m.momentum = momentum
    model.train(was_training)


def train_feature_net(images: np.ndarray, labels: np.ndarray, num_classes: int, *, epochs: int,
                      seed: int, batch_size: int = 64, lr: float = 1e-3, min_steps: int = 0) -> DomainFeatureNet:
    """Train the classifier on real images for `epochs` passes, and at least `min_steps` optimizer
    steps (a small dataset would otherwise get a handful of updates). Seeded; the global RNG
    state is left untouched."""
    n = len(labels)
    bs = min(batch_size, n)
    total = max(epochs * math.ceil(n / bs), min_steps)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = DomainFeatureNet(images.shape[1], num_classes)
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(net.parameters(), lr=lr)
        x_all, y_all = to_input(images), torch.from_numpy(labels.astype(np.int64))
        net.train()
        step = 0
        with Progress(transient=True) as progress:
            task = progress.add_task("domain feature network", total=total)
            while step < total:
                perm = torch.randperm(n, generator=gen)
                for start in range(0, n - bs + 1, bs):            # drop the ragged tail (BatchNorm)
                    idx = perm[start:start + bs]
                    x = x_all[idx]
                    flip = torch.rand(len(idx), generator=gen) < 0.5      # cheap, label-safe augmentation
                    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
                    loss = F.cross_entropy(net(x), y_all[idx])
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    step += 1
                    progress.advance(task)
                    if step >= total:
                        break
        recalibrate_batchnorm(net, x_all, batch_size)
    return net.eval()


@torch.no_grad()
def extract_features(net: DomainFeatureNet, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 (N, C, H, W) -> (N, D) float64 penultimate features."""
    net.eval()
    out = [net.features(to_input(images[s:s + batch_size])).double().numpy()
           for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, net.config["feature_dim"]))


@torch.no_grad()
def predict(net: DomainFeatureNet, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    net.eval()
    out = [net(to_input(images[s:s + batch_size])).argmax(1).numpy() for s in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0,), np.int64)


# --------------------------------------------------------------------------- cache

def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_key(data_digest: str, settings: dict[str, Any]) -> str:
    blob = json.dumps({"data": data_digest, "arch": ARCH_VERSION, **settings}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass
class FeatureNetInfo:
    key: str
    cached: bool
    config: dict[str, Any]


def load_cached(path: Optional[Path], key: str) -> Optional[DomainFeatureNet]:
    """The cached network when `path` holds one trained with the same key, else None."""
    if path is None or not Path(path).is_file():
        return None
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # a broken cache is simply retrained  # noqa: BLE001
        return None
    if not isinstance(blob, dict) or blob.get("key") != key:
        return None
    net = DomainFeatureNet(**blob["config"])
    net.load_state_dict(blob["state_dict"])
    return net.eval()


def save_cached(net: DomainFeatureNet, path: Path, key: str) -> None:
    buf = io.BytesIO()
    torch.save({"key": key, "config": net.config, "state_dict": net.state_dict()}, buf)
    with atomic_file(path, "wb") as fh:
        fh.write(buf.getvalue())


def domain_feature_net(train_images: np.ndarray, train_labels: np.ndarray, num_classes: int, *,
                       data_digest: str, epochs: int, seed: int, batch_size: int, min_steps: int,
                       cache_in: Optional[Path], cache_out: Path) -> tuple[DomainFeatureNet, FeatureNetInfo]:
    """Load the cached network for this data and settings, or train it; save it to `cache_out`."""
    settings = dict(epochs=epochs, min_steps=min_steps, seed=seed, batch_size=batch_size,
                    num_classes=num_classes, shape=list(train_images.shape[1:]))
    key = cache_key(data_digest, settings)
    net = load_cached(cache_in, key)
    cached = net is not None
    if net is None:
        net = train_feature_net(train_images, train_labels, num_classes, epochs=epochs, seed=seed,
                                batch_size=batch_size, min_steps=min_steps)
    save_cached(net, cache_out, key)
    return net, FeatureNetInfo(key=key, cached=cached, config=dict(net.config, **settings))
