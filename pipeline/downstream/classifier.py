"""The downstream defect classifier: a small ResNet trained from scratch (no pretrained weights).

Defect-GAN's downstream check trains a ResNet34 on real vs real + synthetic images; at 32-128 px
and a few hundred images a ResNet-34 is far too large for CPU, so this is the same design
scaled down: a 3x3 stem, three stages of BasicBlocks (He et al. 2016: conv-BN-ReLU-conv-BN +
identity or 1x1 projection shortcut), global average pooling and a linear head.

Training is seeded and deterministic on CPU: initialisation under a forked RNG, batch order
from a private `torch.Generator`, augmentation from the albumentations Compose's own seed.
The budget is a number of optimizer steps, not epochs, so that conditions with more images
(real + synthetic) do not also get more training (see run.py).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.metrics.features import recalibrate_batchnorm

Augment = Callable[[np.ndarray], np.ndarray]     # HWC uint8 -> HWC uint8


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity() if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNetClassifier(nn.Module):
    """(B, C, H, W) in [-1, 1] -> (B, num_classes) logits. Widths w, 2w, 4w; sides H, H/2, H/4."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, blocks: tuple[int, ...] = (1, 1, 1)):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * 2 ** i
            for j in range(n):
                layers.append(BasicBlock(cin, cout, stride=2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.stages = nn.Sequential(*layers)
        self.head = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.stages(self.stem(x))              # (B, 4w, H/4, W/4)
        return self.head(h.mean(dim=(2, 3)))       # global average pool -> (B, K)


def to_input(images: np.ndarray) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float (N, C, H, W) in [-1, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)


def _augment_batch(images: np.ndarray, augment: Augment) -> np.ndarray:
    """Apply `augment` to each (C, H, W) image of a batch (albumentations works on HWC)."""
    out = np.empty_like(images)
    for i, img in enumerate(images):
        a = np.asarray(augment(np.ascontiguousarray(img.transpose(1, 2, 0))))
        out[i] = (a[:, :, None] if a.ndim == 2 else a).transpose(2, 0, 1)
    return out


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, steps: int,
                     batch_size: int, lr: float, seed: int, width: int = 32,
                     augment: Optional[Augment] = None,
                     precision: Literal["fp32", "bf16"] = "fp32") -> ResNetClassifier:
    """Adam on cross-entropy for `steps` optimizer steps over shuffled passes of the data.

    images uint8 (N, C, H, W), labels int (N,). The global RNG state is left untouched.
    """
    n = len(labels)
    if n < 2:
        raise ValueError("train_classifier needs at least 2 images")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ResNetClassifier(images.shape[1], num_classes, width=width)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        gen = torch.Generator().manual_seed(seed)
        y_all = torch.from_numpy(np.asarray(labels, np.int64))
        bs = min(batch_size, n)
        model.train()
        step, order = 0, torch.randperm(n, generator=gen)
        pos = 0
        while step < steps:
            if pos + bs > n:                         # next pass: reshuffle, drop the ragged tail
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + bs].numpy()
            pos += bs
            batch = images[idx]
            if augment is not None:
                batch = _augment_batch(batch, augment)
            x = to_input(batch)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)
            loss = F.cross_entropy(logits.float(), y_all[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
        recalibrate_batchnorm(model, to_input(images), batch_size)   # exact BN statistics for eval
    return model.eval()


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, batch_size: int = 128,
            precision: Literal["fp32", "bf16"] = "fp32") -> np.ndarray:
    """Predicted class index per image (N,)."""
    model.eval()
    out = []
    for s in range(0, len(images), batch_size):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out.append(model(to_input(images[s:s + batch_size])).float().argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros((0,), np.int64)
