"""StarGAN (Choi et al. 2018): one generator translates between all domains (normal + each defect class).

    G(x, c): target label c (one-hot) replicated over H x W, concatenated to x's channels
    D(x) -> (patch scores, domain logits)  StarGAN's D (6 stride-2 convs, 3x3 source head, class head
                                           over the whole final map), no normalisation (wgan-gp critic)
    L_D = -L_adv + lambda_cls CE(D_cls(x), c_org)             L_adv: wgan-gp (lambda_gp = 10)
    L_G =  L_adv + lambda_cls CE(D_cls(G(x, c_trg)), c_trg) + lambda_rec ||G(G(x, c_trg), c_org) - x||_1
Target labels are a random permutation of the batch's labels (as StarGAN's solver does),
drawn from the global torch RNG in forward_g.

Mask vector (paper section 3.2), for training on several datasets with different label sets:
the label vector is [labels of dataset 0 | ... | labels of dataset K-1 | one-hot dataset id];
a sample's own block holds its one-hot label, the other blocks (unknown labels) are zero, and
the classifier loss only looks at the sample's own block. Batches then carry `dataset` (B,) long
and `label` indexes that dataset's classes; dataset 0 is the one described by `spec.classes`,
which `synthesize` targets. The default single-dataset path uses a plain one-hot label.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.validation import positive, require
from pipeline.errors import ParamsError
from pipeline.models import losses
from pipeline.models.base import DataSpec, GANFamily, Stats
from pipeline.models.blocks import D_ARCHS, ResnetBlock, cat_channels, class_discriminator, difference_mask, norm_layer


@dataclass
class Config:
    loss: str = "wgan-gp"
    lambda_cls: float = 1.0
    lambda_rec: float = 10.0
    lambda_gp: float = 10.0          # wgan-gp only
    clip: float = 0.01               # wgan only
    n_critic: int = 5
    lr: float = 1e-4
    beta1: float = 0.5
    beta2: float = 0.999
    base_channels: int = 64
    n_blocks: int = 6
    n_down: int = 2
    d_base_channels: int = 64
    d_layers: int = 6                # StarGAN's D has 6 stride-2 convs; capped so the map stays >= 2x2
    d_arch: str = "stargan"          # the paper's D; "patchgan": a lighter 70 px PatchGAN + averaged class logits
    mask_vector: bool = False
    num_datasets: int = 1
    dataset_classes: list[int] = field(default_factory=list)   # label-set size per dataset; [] = spec's for all

    def validate(self, where: str) -> None:
        require(self.loss in losses.LOSS_NAMES, f"{where}.loss",
                f"must be one of {', '.join(losses.LOSS_NAMES)}, got {self.loss!r}.")
        require(self.d_arch in D_ARCHS, f"{where}.d_arch", f"must be one of {', '.join(D_ARCHS)}, got {self.d_arch!r}.")
        positive(self, where, "n_critic", "lr", "base_channels", "n_down", "d_base_channels",
                 "d_layers", "num_datasets", "clip")
        for name in ("lambda_cls", "lambda_rec", "lambda_gp", "n_blocks"):
            require(getattr(self, name) >= 0, f"{where}.{name}", "must be 0 or more.")
        for name in ("beta1", "beta2"):
            require(0 <= getattr(self, name) < 1, f"{where}.{name}", "must be in [0, 1).")
        require(self.mask_vector or self.num_datasets == 1, f"{where}.num_datasets",
                f"is {self.num_datasets}; several datasets need {where}.mask_vector: true.")
        require(len(self.dataset_classes) in (0, self.num_datasets), f"{where}.dataset_classes",
                f"must list one label-set size per dataset ({self.num_datasets}), got {self.dataset_classes}.")
        require(all(n > 0 for n in self.dataset_classes), f"{where}.dataset_classes", "sizes must be > 0.")


def build_label_vector(labels: torch.Tensor, sizes: Sequence[int], dataset: torch.Tensor | None = None,
                       mask_vector: bool = False) -> torch.Tensor:
    """Label vectors (B, sum(sizes) [+ len(sizes)]) float.

    labels (B,) long: index into the sample's own dataset's label set; dataset (B,) long
    (None: all 0). Sample i gets one_hot(labels[i]) in block dataset[i], zeros in the other
    blocks, and with `mask_vector` one_hot(dataset[i]) appended.
    """
    b = labels.shape[0]
    if dataset is None:
        dataset = torch.zeros(b, dtype=torch.long, device=labels.device)
    offsets = torch.tensor([0, *sizes[:-1]], device=labels.device).cumsum(0)      # block starts
    out = torch.zeros(b, sum(sizes), device=labels.device)
    out[torch.arange(b, device=labels.device), offsets[dataset] + labels] = 1.0
    if mask_vector:
        out = torch.cat([out, F.one_hot(dataset, len(sizes)).float()], 1)
    return out


class StarGenerator(nn.Module):
    """G(x, c) over [x, c replicated over H x W], StarGAN's layout (yunjey/stargan model.py):

        conv7 -> IN -> ReLU; n_down x [conv4 s2 -> IN -> ReLU]; n_blocks x residual block;
        n_down x [convT4 s2 -> IN -> ReLU]; conv7 -> tanh
    Zero padding everywhere and instance norm with a learned scale and shift; convs without bias.
    Both matter for the label: with reflection padding the constant label planes stay constant
    across the first conv's window, so it adds one value per channel at every pixel, which an
    affine-free instance norm then subtracts exactly, and G's output would not depend on c.
    Zero padding makes the label's contribution vary near the borders, so it survives the norm.
    """

    def __init__(self, channels: int, label_dim: int, base_channels: int, n_blocks: int, n_down: int):
        super().__init__()
        norm = "instance-affine"
        ch = base_channels
        layers: list[nn.Module] = [nn.Conv2d(channels + label_dim, ch, 7, 1, 3, bias=False),
                                   norm_layer(norm, ch), nn.ReLU(inplace=True)]
        for _ in range(n_down):
            layers += [nn.Conv2d(ch, ch * 2, 4, 2, 1, bias=False), norm_layer(norm, ch * 2), nn.ReLU(inplace=True)]
            ch *= 2
        layers += [ResnetBlock(ch, norm, padding="zeros") for _ in range(n_blocks)]
        for _ in range(n_down):
            layers += [nn.ConvTranspose2d(ch, ch // 2, 4, 2, 1, bias=False), norm_layer(norm, ch // 2),
                       nn.ReLU(inplace=True)]
            ch //= 2
        layers += [nn.Conv2d(ch, channels, 7, 1, 3, bias=False), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    @staticmethod
    def condition(x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        c_map = c.to(x.dtype)[:, :, None, None].expand(-1, -1, *x.shape[2:])    # (B, L, H, W)
        return cat_channels([x, c_map])                                         # (B, C + L, H, W)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.net(self.condition(x, c))


class StarGAN(GANFamily):
    name = "stargan"
    Config = Config
    data_kind = "labelled"

    def __init__(self, cfg: Config, spec: DataSpec):
        super().__init__(cfg, spec)
        res, c = spec.resolution, spec.channels
        if res % (2 ** cfg.n_down):
            raise ParamsError(f"train.stargan.n_down={cfg.n_down} needs a resolution divisible by "
                              f"{2 ** cfg.n_down}, got {res}.")
        if cfg.mask_vector:
            self.sizes = tuple(cfg.dataset_classes) or (spec.num_classes,) * cfg.num_datasets
            if self.sizes[0] != spec.num_classes:
                raise ParamsError(f"train.stargan.dataset_classes[0] must be the {spec.num_classes} classes of "
                                  f"the prepared dataset, got {self.sizes[0]}.")
        else:
            self.sizes = (spec.num_classes,)
        label_dim = sum(self.sizes) + (len(self.sizes) if cfg.mask_vector else 0)
        self.G = StarGenerator(c, label_dim, cfg.base_channels, cfg.n_blocks, cfg.n_down)
        self.D = class_discriminator(cfg.d_arch, c, res, cfg.d_base_channels, cfg.d_layers, sum(self.sizes))

    # ---- labels ---------------------------------------------------------------------------
    def _dataset(self, batch) -> torch.Tensor:
        label = batch["label"]
        ds = batch.get("dataset") if self.cfg.mask_vector else None
        return ds if ds is not None else torch.zeros_like(label)

    def label_vector(self, labels: torch.Tensor, dataset: torch.Tensor | None = None) -> torch.Tensor:
        return build_label_vector(labels, self.sizes, dataset, self.cfg.mask_vector)

    def _target_labels(self, labels: torch.Tensor, dataset: torch.Tensor) -> torch.Tensor:
        """Random permutation of the batch's labels (within each dataset), global torch RNG."""
        if not self.cfg.mask_vector:
            return labels[torch.randperm(labels.shape[0]).to(labels.device)]
        target = labels.clone()
        for d in range(len(self.sizes)):
            idx = (dataset == d).nonzero().flatten()
            target[idx] = labels[idx[torch.randperm(idx.numel()).to(labels.device)]]
        return target

    def _cls_loss(self, logits: torch.Tensor, labels: torch.Tensor, dataset: torch.Tensor) -> torch.Tensor:
        """CE over each sample's own dataset block of the classifier's logits (mean over samples)."""
        if not self.cfg.mask_vector:
            return losses.classification(logits, labels)
        total, start = logits.new_zeros(()), 0
        for d, size in enumerate(self.sizes):
            sel = dataset == d
            if sel.any():
                total = total + losses.classification(logits[sel, start:start + size], labels[sel]) * sel.sum()
            start += size
        return total / labels.shape[0]

    # ---- losses ---------------------------------------------------------------------------
    def forward_g(self, batch):
        x, label = batch["image"], batch["label"]
        dataset = self._dataset(batch)
        label_trg = self._target_labels(label, dataset)
        fake = self.G(x, self.label_vector(label_trg, dataset))              # x -> target domain
        return {"fake": fake, "label_trg": label_trg}

    def d_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        cfg, x, label = self.cfg, batch["image"], batch["label"]
        dataset = self._dataset(batch)
        real_s, real_c = self.D(x)
        fake_s, _ = self.D(fakes["fake"])
        adv = losses.d_adversarial(cfg.loss, real_s, fake_s)
        cls = self._cls_loss(real_c, label, dataset)                       # classify real by c_org
        loss = adv + cfg.lambda_cls * cls
        stats = {"D/adv": adv.item(), "D/cls": cls.item()}
        if cfg.loss == "wgan-gp":
            gp = losses.gradient_penalty(lambda inp: self.D(inp)[0], x, fakes["fake"])
            loss = loss + cfg.lambda_gp * gp
            stats["D/gp"] = gp.item()
        return loss, stats

    def g_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        cfg, x, label = self.cfg, batch["image"], batch["label"]
        dataset = self._dataset(batch)
        fake, label_trg = fakes["fake"], fakes["label_trg"]
        fake_s, fake_c = self.D(fake)
        adv = losses.g_adversarial(cfg.loss, fake_s)
        cls = self._cls_loss(fake_c, label_trg, dataset)                   # fake must look like c_trg
        # Reconstruction back to the original domain (only needed on G steps, so computed here).
        rec = losses.l1(self.G(fake, self.label_vector(label, dataset)), x)
        loss = adv + cfg.lambda_cls * cls + cfg.lambda_rec * rec
        return loss, {"G/adv": adv.item(), "G/cls": cls.item(), "G/rec": rec.item()}

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, batch, generators):
        x = batch["image"]
        k = self.spec.num_classes
        # Deterministic targets cycling through the defect classes (no training RNG used).
        target = 1 + torch.arange(x.shape[0], device=x.device) % max(k - 1, 1) if k > 1 \
            else torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        out = generators["G"](x, self.label_vector(target))
        mask = difference_mask(out, x).expand_as(x) * 2 - 1
        return {"real": x, "translated": out, "mask": mask}

    @torch.no_grad()
    def synthesize(self, normal, labels, region=None):
        out = self.G(normal, self.label_vector(labels.to(normal.device)))
        return out, difference_mask(out, normal)
