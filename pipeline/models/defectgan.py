"""Defect-GAN (Zhang et al., WACV 2021; METHODS.md, "Defect-GAN") — the final target.

Code (vs. paper): one generator G does both defacement (normal n -> defect of class k) and
restoration (defect -> normal), steered by the spatial & categorical control map
A (B, K, H, W) (K = spec.num_classes, class 0 = normal). G outputs a foreground f and a
spatial distribution map m; the image is composed layer-wise:

    f_d, m_d = G(n, A_{n->d});   d  = n * (1 - m_d)  + f_d  * m_d       (defacement)
    f_n, m_n = G(d, A_{d->n});   n^ = d * (1 - m_n^) + f_n^ * m_n^     (restoration)

and, in the other direction, real defects b are restored (r = G(b, A_normal)) and defaced back
to their own class (b^ = G(r, A_{label_b})), as the paper trains both ways.

    G: [image, A] -> conv7 -> n_down x (conv4 s2) -> n_blocks x SPADEResBlock(A)
       -> n_down x (upsample, SPADEResBlock(A)) -> heads: f = tanh(conv7), m = sigmoid(conv7)
       SPADE on A at every bottleneck/decoder layer; learned-scale noise after every conv there
       (the paper's adaptive noise insertion, stochastic variation of the defects).
    D: StarGAN's D (source head + auxiliary classifier over the whole final map), no normalisation
       (WGAN-GP); `d_arch: patchgan` keeps the lighter PatchGAN.

Losses (means over elements; both directions summed):
    L_D = -L_adv + lambda_gp GP + lambda_cls_real CE(D_cls(real), label)
    L_G =  L_adv + lambda_cls_fake CE(D_cls(fake), target) + lambda_rec (|n^ - n| + |b^ - b|)
           + lambda_sd_cyc (|m_d - m_n^| + |m_r - m_b^|)
           + lambda_sd_con (|m_d| + |m_n^| + |m_r| + |m_b^|)
Training uses a constant A (the target label at every pixel); at inference A may vary over the
image (target class inside a user region, normal outside) to place defects where asked.

Defaults and where they come from. The paper (as the lecture notes give it) states the losses
but not their weights; the two public re-implementations that carry the paper's settings agree on
6 residual blocks, lambda_rec 5, lambda_sd_cyc 5 and lambda_sd_con 1, and differ on the classifier
weights (jason2714/de-i2i-gan: cls_real 2, cls_fake 5; RyanLu0701/Defect-GAN: 5, 10). We take
jason2714's (the smaller pair), and from the paper: Adam(2e-4, 0.5, 0.999), n_critic 5,
lambda_gp 10 (WGAN-GP), StarGAN's D (6 stride-2 convs, class head over the whole final map) and
StarGAN's widths (G from 64 channels). README "Training presets" has the complete paper setting.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.validation import positive, require
from pipeline.errors import PipelineError
from pipeline.generation.placement import shift_range
from pipeline.models import losses
from pipeline.models.base import DataSpec, GANFamily, Stats
from pipeline.models.base import fixed_rng as _fixed_rng
from pipeline.models.blocks import D_ARCHS, InstanceNorm, cat_channels, class_discriminator
from pipeline.models.spade import SPADEResBlock, UniformControl


TRAIN_CONTROLS = ("uniform", "boxes", "masks")
MASK_SUP_LOSSES = ("balanced_bce", "dice_bce")


@dataclass
class Config:
    base_channels: int = 64          # G's first conv width (StarGAN: 64); x2 per down ...
    max_channels: int = 256          # ... up to this (StarGAN: 256 at the bottleneck)
    n_down: int = 2                  # encoder downsamplings (= decoder upsamplings), as StarGAN
    n_blocks: int = 6                # SPADE ResBlocks at the bottleneck (re-implementations: 6)
    spade_hidden: int = 32           # width of SPADE's gamma/beta conv net
    noise: bool = True               # adaptive noise insertion
    d_arch: str = "stargan"          # the paper's (StarGAN's) D; "patchgan": lighter, class logits averaged
    d_base_channels: int = 64
    d_layers: int = 6                # StarGAN's D: 6 stride-2 convs (capped so the final map is >= 2x2)
    lambda_gp: float = 10.0          # WGAN-GP
    lambda_cls_real: float = 2.0     # jason2714 (RyanLu0701: 5)
    lambda_cls_fake: float = 5.0     # jason2714 (RyanLu0701: 10)
    lambda_rec: float = 5.0          # both re-implementations
    lambda_sd_cyc: float = 5.0       # both
    lambda_sd_con: float = 1.0       # both
    n_critic: int = 5                # paper
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    beta1: float = 0.5
    beta2: float = 0.999
    # ---- beyond the paper: named options, off by default (the paper's method); params.yaml turns
    # them on for the CPU budget, bench/results/defectgan_ablation.md measures each one.
    # Training control maps. "uniform" (paper): the target label at every pixel. "boxes": the target
    # label inside a random box (sides in [region_min, region_max] of the image, as generation
    # places defects), normal outside. "masks": inside a real defect mask of the target class taken
    # from the batch (flipped, shifted, dilated by 1 px), a box where the data has no mask.
    train_control: str = "uniform"
    region_min: float = 0.2
    region_max: float = 0.5
    # E[m (1 - R)] on every defacement mask: the mask stays inside the requested region R (with
    # uniform control R is the whole image and the term is 0).
    lambda_region: float = 0.0
    # Real defects with a known mask supervise the two masks of their cycle: restoration removes
    # exactly the defect (m_r = mask_b) and defacing the restored image back to its class puts it
    # exactly there (m_b^ = mask_b): BCE(m_r, mask_b) + BCE(m_b^, mask_b). Pixel masks the paper
    # does not use; they teach G what each class looks like. BCE, not L1: the L1-optimal answer to
    # a sparse, uncertain target is 0, i.e. the collapse.
    lambda_mask_sup: float = 0.0
    # The form of that supervision (MASK_SUP_LOSSES). "balanced_bce": defect and background pixels
    # weigh half each; on a defect of 2 % of the image that up-weights defect pixels ~25x, so every
    # uncertain rim pixel is called defect and the masks come out as fat blobs over the whole
    # control region (measured: mean area 9 % against ~2 % real on the classic preset, every sample
    # read as a spot). "dice_bce": soft Dice (scale-free, its optimum is the mask's own area) plus
    # the pixel-mean BCE (calibrated per pixel), the pairing segmentation models use for sparse masks.
    # Measured (bench/results/defectgan_ablation.md, runs L-M): classic preset 2 kimg, class accuracy
    # 0.29 -> 0.64, mean mask area 9.3 % -> 5.0 %; production-like preset 2 kimg, mask_in_region
    # 0.77 -> 1.00, mean area 2.7 % -> 1.1 %, fid_domain 2824 -> 526 (doing nothing: 3212).
    mask_sup_loss: str = "dice_bce"
    # L1 between b^ and b inside b's known mask, over the mask's area (the image-wide L_rec is
    # dominated by the background, so on a defect of a few pixels it barely asks for the defect's
    # appearance): defacing back must repaint the real defect.
    lambda_defect_rec: float = 0.0
    # D-only iterations for the first d_warmup_kimg: D's classifier learns the classes from real
    # images before G is asked to fool it (otherwise L_cls^f carries no class signal and the
    # sparsity term wins: "change nothing").
    d_warmup_kimg: float = 0.0
    # Initial bias of the mask head. 0 (paper code's default init): m starts at 0.5 everywhere, and
    # the sparsity term then drives the sigmoid into saturation before D's classifier has learned
    # the classes; a negative bias starts from small masks with a live gradient.
    mask_bias: float = 0.0

    def validate(self, where: str) -> None:
        require(self.d_arch in D_ARCHS, f"{where}.d_arch", f"must be one of {', '.join(D_ARCHS)}, got {self.d_arch!r}.")
        positive(self, where, "base_channels", "max_channels", "n_down", "spade_hidden",
                 "d_base_channels", "d_layers", "n_critic", "lr_g", "lr_d")
        require(self.n_blocks >= 0, f"{where}.n_blocks", "must be 0 or more.")
        for name in ("lambda_gp", "lambda_cls_real", "lambda_cls_fake", "lambda_rec",
                     "lambda_sd_cyc", "lambda_sd_con"):
            require(getattr(self, name) >= 0, f"{where}.{name}", "must be 0 or positive.")
        require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"{where}.beta1", "and beta2 must be in [0, 1).")
        require(self.train_control in TRAIN_CONTROLS, f"{where}.train_control",
                f"must be one of {', '.join(TRAIN_CONTROLS)}, got {self.train_control!r}.")
        require(0 < self.region_min <= self.region_max <= 1, f"{where}.region_min",
                f"and region_max must satisfy 0 < region_min <= region_max <= 1, got "
                f"{self.region_min}, {self.region_max}.")
        require(self.mask_sup_loss in MASK_SUP_LOSSES, f"{where}.mask_sup_loss",
                f"must be one of {', '.join(MASK_SUP_LOSSES)}, got {self.mask_sup_loss!r}.")
        for name in ("lambda_region", "lambda_mask_sup", "lambda_defect_rec", "d_warmup_kimg"):
            require(getattr(self, name) >= 0, f"{where}.{name}", "must be 0 or positive.")


# --------------------------------------------------------------------------- composition and losses

def compose(x: torch.Tensor, f: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Layer-wise composition x * (1 - m) + f * m: m = 0 keeps x exactly, m = 1 gives f exactly."""
    return x * (1 - m) + f * m


def control_map(labels: torch.Tensor, num_classes: int, size: tuple[int, int],
                region: torch.Tensor | None = None) -> torch.Tensor:
    """A (B, K, H, W): one-hot(labels) inside `region` (B, 1, H, W) in {0, 1}, one-hot(normal) outside.

    region None: the label at every pixel (training's constant map).
    """
    onehot = F.one_hot(labels.long(), num_classes).float()[:, :, None, None]   # (B, K, 1, 1)
    A = onehot.expand(-1, -1, *size)
    if region is None:
        return A.contiguous()
    normal = torch.zeros_like(onehot)
    normal[:, 0] = 1.0
    region = region.to(A.dtype)
    return A * region + normal * (1 - region)


def random_boxes(n: int, size: tuple[int, int], side_min: float, side_max: float, device) -> torch.Tensor:
    """(n, 1, H, W) {0, 1}: one axis-aligned box per image, each side a uniform fraction in
    [side_min, side_max] of the image, uniformly placed (global torch RNG)."""
    h, w = size
    u = torch.rand(n, 4, device=device)
    bh = (side_min + (side_max - side_min) * u[:, 0]) * h
    bw = (side_min + (side_max - side_min) * u[:, 1]) * w
    bh, bw = bh.round().clamp(1, h), bw.round().clamp(1, w)
    y0 = (u[:, 2] * (h - bh + 1)).floor()
    x0 = (u[:, 3] * (w - bw + 1)).floor()
    rows = torch.arange(h, device=device)[None, :, None]
    cols = torch.arange(w, device=device)[None, None, :]
    inside = ((rows >= y0[:, None, None]) & (rows < (y0 + bh)[:, None, None])
              & (cols >= x0[:, None, None]) & (cols < (x0 + bw)[:, None, None]))
    return inside[:, None].float()


def jitter_masks(masks: torch.Tensor) -> torch.Tensor:
    """Real masks (n, 1, H, W) {0, 1} made into new regions of the same shape: random horizontal /
    vertical flips, a random shift of up to a quarter of the image that keeps the mask inside it,
    dilation by 1 px (a region a little larger than the defect it is shaped like). Global torch
    RNG. Generation's `placement: real_masks` jitters the same way (placement.jitter_mask)."""
    n, _, h, w = masks.shape
    flips = torch.rand(n, 2, device=masks.device) < 0.5
    out = torch.where(flips[:, 0, None, None, None], masks.flip(-1), masks)
    out = torch.where(flips[:, 1, None, None, None], out.flip(-2), out)
    moved = []
    for o in out:
        rows, cols = o[0].any(1).nonzero().flatten(), o[0].any(0).nonzero().flatten()
        if len(rows) == 0:
            moved.append(o)
            continue
        (dy0, dy1), (dx0, dx1) = (shift_range(int(rows[0]), int(rows[-1]), h),
                                  shift_range(int(cols[0]), int(cols[-1]), w))
        dy, dx = int(torch.randint(dy0, dy1 + 1, ())), int(torch.randint(dx0, dx1 + 1, ()))
        moved.append(torch.roll(o, (dy, dx), dims=(-2, -1)))
    return F.max_pool2d(torch.stack(moved), 3, stride=1, padding=1)


def bce_terms(m: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel cross-entropy of masks in [0, 1] against {0, 1} masks, split into the defect
    pixels' -log m and the others' -log(1 - m) (each 0 elsewhere). fp32: under bf16 autocast
    log(1 - m) would round away small masks; written out because F.binary_cross_entropy refuses
    CUDA autocast."""
    m, target = m.float().clamp(1e-6, 1 - 1e-6), target.float()
    return target * -torch.log(m), (1 - target) * -torch.log(1 - m)


def mask_bce(m: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Class-balanced binary cross-entropy: the mean of -log m over defect pixels and of
    -log(1 - m) over the others, averaged. A plain pixel mean lets a defect of 20 px in 4096 weigh
    0.5 %, and the masks it learns stay far smaller than the defect (measured: mean 0.002 against
    real masks of 0.01 on the production preset)."""
    pos, neg = bce_terms(m, target)
    target = target.float()
    return 0.5 * (pos.sum() / target.sum().clamp_min(1.0) + neg.sum() / (1 - target).sum().clamp_min(1.0))


def soft_dice_loss(m: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - 2 sum(m t) / (sum m + sum t), per image, averaged: 0 when m equals the {0, 1} target,
    independent of how small the defect is. fp32, as bce_terms."""
    m, target = m.float().flatten(1), target.float().flatten(1)
    overlap = (m * target).sum(1)
    return (1 - 2 * overlap / (m.sum(1) + target.sum(1)).clamp_min(1e-6)).mean()


def pixel_bce(m: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-mean binary cross-entropy (bce_terms averaged over every pixel)."""
    pos, neg = bce_terms(m, target)
    return (pos + neg).mean()


def mask_supervision(m: torch.Tensor, target: torch.Tensor, form: str) -> torch.Tensor:
    """The mask supervision loss `form` (Config.mask_sup_loss) of m against the real mask."""
    if form == "balanced_bce":
        return mask_bce(m, target)
    return soft_dice_loss(m, target) + pixel_bce(m, target)


def region_loss(m: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
    """E[m (1 - R)]: mask mass outside the requested region R (0 when m stays inside)."""
    return (m * (1 - region)).mean()


def sd_cycle_loss(m_a: torch.Tensor, m_b: torch.Tensor) -> torch.Tensor:
    """Spatial-distribution cycle loss E|m_a - m_b|: restoration must remove what defacement added."""
    return losses.l1(m_a, m_b)


def sd_constraint_loss(*masks: torch.Tensor) -> torch.Tensor:
    """Spatial-distribution constraint sum_i E|m_i - 0|: keeps the masks sparse."""
    return sum(losses.l1(m, torch.zeros_like(m)) for m in masks)


# --------------------------------------------------------------------------- networks

class DefectGenerator(nn.Module):
    """Encoder -> SPADE ResBlocks (with noise) -> SPADE decoder -> (foreground f, mask m)."""

    def __init__(self, channels: int, num_classes: int, base_channels: int = 32, max_channels: int = 256,
                 n_down: int = 2, n_blocks: int = 4, spade_hidden: int = 32, noise: bool = True,
                 mask_bias: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        widths = [min(base_channels * 2 ** i, max_channels) for i in range(n_down + 1)]
        act = nn.LeakyReLU(0.2)
        # Encoder sees the control map too (StarGAN's label-to-channels), so it can read
        # which pixels are asked to change.
        enc: list[nn.Module] = [nn.Conv2d(channels + num_classes, widths[0], 7, padding=3),
                                InstanceNorm(widths[0]), act]
        for i in range(n_down):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, 2, 1), InstanceNorm(widths[i + 1]), act]
        self.encoder = nn.Sequential(*enc)
        c = widths[-1]
        self.blocks = nn.ModuleList([SPADEResBlock(c, c, num_classes, spade_hidden, noise)
                                     for _ in range(n_blocks)])
        self.ups = nn.ModuleList([SPADEResBlock(widths[i + 1], widths[i], num_classes, spade_hidden, noise)
                                  for i in reversed(range(n_down))])
        self.act = act
        self.to_foreground = nn.Conv2d(widths[0], channels, 7, padding=3)
        self.to_mask = nn.Conv2d(widths[0], 1, 7, padding=3)
        if mask_bias:
            nn.init.constant_(self.to_mask.bias, mask_bias)

    def forward(self, x: torch.Tensor, A: torch.Tensor | UniformControl) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W), A (B, K, H, W) or one class per image -> f (B, C, H, W) in [-1, 1],
        m (B, 1, H, W) in [0, 1]."""
        dense = A.dense(x.shape[-2:], x.dtype) if isinstance(A, UniformControl) else A.to(x.dtype)
        h = self.encoder(cat_channels([x, dense]))                  # (B, C_n, H / 2^n, W / 2^n)
        for block in self.blocks:
            h = block(h, A)
        for up in self.ups:
            h = up(F.interpolate(h, scale_factor=2, mode="nearest"), A)
        h = self.act(h)                                                  # (B, C_0, H, W)
        return torch.tanh(self.to_foreground(h)), torch.sigmoid(self.to_mask(h))


def _shape(t) -> tuple:
    return tuple(t.shape)


# --------------------------------------------------------------------------- family

class DefectGAN(GANFamily):
    name = "defectgan"
    Config = Config
    data_kind = "unpaired"

    def __init__(self, cfg: Config, spec: DataSpec):
        super().__init__(cfg, spec)
        K = spec.num_classes
        if K < 2:
            raise PipelineError(f"Defect-GAN needs the normal class and at least one defect class, "
                                f"got classes {list(spec.classes)}.")
        step = 2 ** cfg.n_down
        if spec.resolution % step or spec.resolution // step < 2:
            raise PipelineError(f"Defect-GAN with train.defectgan.n_down={cfg.n_down} needs a resolution "
                                f"divisible by {step} with at least 2 px left at the bottleneck; got "
                                f"{spec.resolution}. Lower n_down or change prepare.resolution.")
        self.G = DefectGenerator(spec.channels, K, cfg.base_channels, cfg.max_channels, cfg.n_down,
                                 cfg.n_blocks, cfg.spade_hidden, cfg.noise, cfg.mask_bias)
        self.D = class_discriminator(cfg.d_arch, spec.channels, spec.resolution, cfg.d_base_channels,
                                     cfg.d_layers, K)

    def set_progress(self, cur_nimg: int, total_nimg: int) -> None:
        self._nimg = cur_nimg

    def trains_generator(self) -> bool:
        return getattr(self, "_nimg", 0) >= self.cfg.d_warmup_kimg * 1000

    # ---- generator use ----------------------------------------------------------------------
    def translate(self, G: nn.Module, x: torch.Tensor, labels: torch.Tensor,
                  region: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(composed image, foreground f, mask m) for target classes `labels` (inside `region`)."""
        f, m = G(x, self._control(labels, region, x.shape[-2:]))
        return compose(x, f, m), f, m

    def _normal_labels(self, n: int, device) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long, device=device)

    def _control(self, labels: torch.Tensor, region: torch.Tensor | None, size: tuple[int, int]):
        if region is None:     # the training map: the label at every pixel, kept as labels (spade.py)
            return UniformControl(labels, self.spec.num_classes)
        return control_map(labels, self.spec.num_classes, size, region)

    def _translate_two(self, first: torch.Tensor, first_labels: torch.Tensor, second: torch.Tensor,
                       second_labels: torch.Tensor, first_region: torch.Tensor | None = None,
                       second_region: torch.Tensor | None = None
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image, mask) of two translations in one generator call: every layer of G works per
        sample (instance norm, per-sample noise), so this is the two calls' computation in one.
        Regions (B, 1, H, W) make that half's control map spatial (None: the label everywhere).
        Returns (first image, first mask, second image, second mask)."""
        sizes, size = [first.shape[0], second.shape[0]], first.shape[-2:]
        x = torch.cat([first, second])
        if first_region is None and second_region is None:
            A = UniformControl(torch.cat([first_labels, second_labels]), self.spec.num_classes)
        else:
            A = torch.cat([control_map(first_labels, self.spec.num_classes, size, first_region),
                           control_map(second_labels, self.spec.num_classes, size, second_region)])
        f, m = self.G(x, A)
        out = compose(x, f, m)
        (out_1, out_2), (m_1, m_2) = out.split(sizes), m.split(sizes)
        return out_1, m_1, out_2, m_2

    # ---- training control maps (train_control; the paper: uniform) ----------------------------
    def _training_targets(self, batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(target defect class per normal image, region or None) for defacement."""
        a = batch["a"]
        n, size, cfg = a.shape[0], a.shape[-2:], self.cfg
        if cfg.train_control == "uniform":
            # Random defect class per normal image (1..K-1), from the global RNG.
            return torch.randint(1, self.spec.num_classes, (n,), device=a.device), None
        boxes = random_boxes(n, size, cfg.region_min, cfg.region_max, a.device)
        if cfg.train_control == "boxes":
            return torch.randint(1, self.spec.num_classes, (n,), device=a.device), boxes
        # "masks": each normal image takes the class and the (jittered) mask of a real defect of the batch.
        pick = torch.randint(0, batch["b"].shape[0], (n,), device=a.device)
        if "mask_b" not in batch:          # a batch without masks: boxes, like data without masks
            return batch["label_b"].long()[pick], boxes
        masks = jitter_masks(batch["mask_b"][pick])
        known = self._known_masks(batch)[pick] & (masks.flatten(1).amax(1) > 0)
        return batch["label_b"].long()[pick], torch.where(known[:, None, None, None], masks, boxes)

    def _known_masks(self, batch) -> torch.Tensor:
        """(B,) bool: real defects whose mask is known (batches without the key: none)."""
        known = batch.get("has_mask_b")
        if known is None:
            return torch.zeros(batch["b"].shape[0], dtype=torch.bool, device=batch["b"].device)
        return known.bool()

    def _restore_region(self, batch) -> torch.Tensor | None:
        """Where defacing a restored defect back to its class may act: its own dilated mask where
        known, the whole image otherwise (None with the paper's uniform control)."""
        if self.cfg.train_control == "uniform":
            return None
        b = batch["b"]
        mask_b = batch.get("mask_b", b.new_zeros(b.shape[0], 1, *b.shape[-2:]))
        grown = F.max_pool2d(mask_b.float(), 3, stride=1, padding=1)
        known = self._known_masks(batch)[:, None, None, None]
        return torch.where(known, grown, torch.ones_like(grown))

    # ---- losses ---------------------------------------------------------------------------
    def forward_g(self, batch):
        a, b = batch["a"], batch["b"]
        target, region = self._training_targets(batch)
        # Defacement of a and restoration of b.
        d, m_d, r, m_r = self._translate_two(a, target, b, self._normal_labels(b.shape[0], b.device),
                                             first_region=region)
        fakes = {"d": d, "m_d": m_d, "r": r, "m_r": m_r, "target": target}
        if region is not None:
            fakes["region"] = region
        return fakes

    def _real(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = batch["a"], batch["b"]
        labels = torch.cat([self._normal_labels(a.shape[0], a.device), batch["label_b"].long()])
        return torch.cat([a, b]), labels

    def d_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        real, real_labels = self._real(batch)
        fake = torch.cat([fakes["d"], fakes["r"]])
        # Real and fake through D in one call: D has no normalisation, so samples do not interact.
        src, cls_logits = self.D(torch.cat([real, fake]))
        real_src, fake_src = src.split([real.shape[0], fake.shape[0]])
        real_cls = cls_logits[: real.shape[0]]
        adv = losses.d_adversarial("wgan-gp", real_src, fake_src)
        gp = losses.gradient_penalty(lambda x: self.D(x)[0], real, fake)
        cls = losses.classification(real_cls, real_labels)
        loss = adv + self.cfg.lambda_gp * gp + self.cfg.lambda_cls_real * cls
        acc = (real_cls.argmax(1) == real_labels).float().mean()
        return loss, {"D/loss": loss.item(), "D/adv": adv.item(), "D/gp": gp.item(), "D/cls": cls.item(),
                      "D/cls_acc": acc.item(), "D/real": real_src.mean().item(), "D/fake": fake_src.mean().item()}

    def g_loss(self, batch, fakes) -> tuple[torch.Tensor, Stats]:
        a, b, label_b = batch["a"], batch["b"], batch["label_b"].long()
        d, m_d, r, m_r, target = fakes["d"], fakes["m_d"], fakes["r"], fakes["m_r"], fakes["target"]
        region, c = fakes.get("region"), self.cfg
        fake_src, fake_cls = self.D(torch.cat([d, r]))
        adv = losses.g_adversarial("wgan-gp", fake_src)
        cls = losses.classification(fake_cls, torch.cat([target, self._normal_labels(r.shape[0], r.device)]))
        # Cycles: restore the defaced normals; deface the restored defects back to their class.
        b_region = self._restore_region(batch)
        n_hat, m_nh, b_hat, m_bh = self._translate_two(d, self._normal_labels(d.shape[0], d.device), r, label_b,
                                                       second_region=b_region)
        rec = losses.l1(n_hat, a) + losses.l1(b_hat, b)
        sd_cyc = sd_cycle_loss(m_d, m_nh) + sd_cycle_loss(m_r, m_bh)
        sd_con = sd_constraint_loss(m_d, m_nh) + sd_constraint_loss(m_r, m_bh)
        loss = (adv + c.lambda_cls_fake * cls + c.lambda_rec * rec
                + c.lambda_sd_cyc * sd_cyc + c.lambda_sd_con * sd_con)
        stats = {"G/adv": adv.item(), "G/cls": cls.item(), "G/rec": rec.item(),
                 "G/sd_cyc": sd_cyc.item(), "G/sd_con": sd_con.item(),
                 "G/mask_mean": m_d.mean().item(), "G/restore_mask_mean": m_r.mean().item()}
        if region is not None:
            reg = region_loss(m_d, region) + region_loss(m_bh, b_region)
            loss = loss + c.lambda_region * reg
            stats["G/region"] = reg.item()
            stats["G/mask_in_region"] = ((m_d * region).sum() / m_d.sum().clamp_min(1e-8)).item()
        known = self._known_masks(batch) & ("mask_b" in batch)
        if (c.lambda_mask_sup > 0 or c.lambda_defect_rec > 0) and known.any():
            target_mask = batch["mask_b"][known].float()
            sup = (mask_supervision(m_r[known], target_mask, c.mask_sup_loss)
                   + mask_supervision(m_bh[known], target_mask, c.mask_sup_loss))
            area = target_mask.sum(dim=(1, 2, 3)).clamp_min(1.0)
            inside = ((b_hat[known] - b[known]).abs().mean(1, keepdim=True) * target_mask).sum(dim=(1, 2, 3))
            defect_rec = (inside / area).mean()
            loss = loss + c.lambda_mask_sup * sup + c.lambda_defect_rec * defect_rec
            stats["G/mask_sup"] = sup.item()
            stats["G/defect_rec"] = defect_rec.item()
        stats["G/loss"] = loss.item()
        return loss, stats

    # ---- sampling -------------------------------------------------------------------------
    def _mask_row(self, m: torch.Tensor) -> torch.Tensor:
        return (m * 2 - 1).expand(-1, self.spec.channels, -1, -1)

    def center_box(self, n: int, size: tuple[int, int], device) -> torch.Tensor:
        """(n, 1, H, W) region: the middle half of the image in each direction."""
        h, w = size
        region = torch.zeros(n, 1, h, w, device=device)
        region[..., h // 4: h - h // 4, w // 4: w - w // 4] = 1.0
        return region

    @torch.no_grad()
    def sample(self, batch, generators):
        G = generators["G"]
        a, b = batch["a"], batch["b"]
        K = self.spec.num_classes
        target = 1 + torch.arange(a.shape[0], device=a.device) % (K - 1)   # cycle through defect classes
        with _fixed_rng(a.device):
            d, _, m_d = self.translate(G, a, target)
            n_hat, _, _ = self.translate(G, d, self._normal_labels(a.shape[0], a.device))
            region = self.center_box(a.shape[0], a.shape[-2:], a.device)
            placed, _, m_p = self.translate(G, a, target, region)
            r, _, m_r = self.translate(G, b, self._normal_labels(b.shape[0], b.device))
        return {"normal": a, "defaced": d.clamp(-1, 1), "mask": self._mask_row(m_d),
                "restored": n_hat.clamp(-1, 1), "placed_center": placed.clamp(-1, 1),
                "placed_mask": self._mask_row(m_p), "real_defect": b, "real_restored": r.clamp(-1, 1),
                "real_restored_mask": self._mask_row(m_r)}

    # ---- synthesis (generation stage) ----------------------------------------------------
    @torch.no_grad()
    def synthesize(self, normal, labels, region=None):
        """Deface `normal` (B, C, H, W) with classes `labels` (B,), inside `region` (B, 1, H, W) if given.

        A = one-hot(label) inside the region and one-hot(normal) outside; region None: everywhere.
        Returns (images (B, C, H, W) in [-1, 1], the generator's masks m (B, 1, H, W) in [0, 1]).
        """
        device = next(self.G.parameters()).device
        normal, labels, region = self._check_inputs(normal, labels, region)
        image, _, m = self.translate(self.G, normal.to(device), labels.to(device),
                                     None if region is None else region.to(device))
        return image.clamp(-1, 1), m

    @torch.no_grad()
    def place_defect(self, normal: torch.Tensor, label, mask: torch.Tensor | None = None,
                     box: tuple[float, float, float, float] | None = None):
        """Put a defect of class `label` (index or name) on `normal`, where `mask` or `box` says.

        normal: (C, H, W) or (B, C, H, W) in [-1, 1]. mask: (H, W), (1, H, W), (B, 1, H, W);
        pixels > 0.5 are the region. box: (x0, y0, x1, y1) as fractions of width / height.
        Neither: the whole image is asked to change (training's constant control map).
        Returns (image, mask m, labels (B,)), image and m unbatched when `normal` was.
        """
        if not isinstance(normal, torch.Tensor) or normal.dim() not in (3, 4):
            got = _shape(normal) if isinstance(normal, torch.Tensor) else type(normal).__name__
            raise PipelineError(f"place_defect: normal must be an image tensor (C, H, W) or (B, C, H, W), "
                                f"got {got}.")
        single = normal.dim() == 3
        x = normal[None] if single else normal
        n, _, h, w = x.shape
        labels = self._labels_from(label, n)
        if mask is not None and box is not None:
            raise PipelineError("place_defect: give a mask or a box, not both.")
        region = None
        if mask is not None:
            region = self._region_from_mask(mask, n, h, w)
        elif box is not None:
            region = self._region_from_box(box, n, h, w, x.device)
        image, m = self.synthesize(x, labels, region)
        return (image[0], m[0], labels) if single else (image, m, labels)

    # ---- input checks -----------------------------------------------------------------------
    def _labels_from(self, label, n: int) -> torch.Tensor:
        if isinstance(label, str):
            if label not in self.spec.classes:
                raise PipelineError(f"unknown defect class {label!r}; known: {', '.join(self.spec.classes[1:])}.")
            label = self.spec.classes.index(label)
        if isinstance(label, int):
            return torch.full((n,), label, dtype=torch.long)
        label = torch.as_tensor(label).long()
        return label.expand(n) if label.dim() == 0 else label

    def _check_inputs(self, normal, labels, region):
        C, K, step = self.spec.channels, self.spec.num_classes, 2 ** self.cfg.n_down
        if not isinstance(normal, torch.Tensor) or normal.dim() != 4 or normal.shape[1] != C:
            got = _shape(normal) if isinstance(normal, torch.Tensor) else type(normal).__name__
            raise PipelineError(f"Defect-GAN: normal images must have shape (B, {C}, H, W), got {got}.")
        n, _, h, w = normal.shape
        if h % step or w % step:
            raise PipelineError(f"Defect-GAN: image size {h}x{w} must be divisible by {step} "
                                f"(train.defectgan.n_down={self.cfg.n_down}).")
        labels = torch.as_tensor(labels).long()
        if labels.shape != (n,):
            raise PipelineError(f"Defect-GAN: labels must have shape ({n},), one per image, got {_shape(labels)}.")
        if n and (labels.min() < 1 or labels.max() >= K):
            raise PipelineError(f"Defect-GAN: labels must be defect classes 1..{K - 1} "
                                f"({', '.join(self.spec.classes[1:])}), got {labels.tolist()}.")
        if region is not None:
            if not isinstance(region, torch.Tensor) or _shape(region) != (n, 1, h, w):
                got = _shape(region) if isinstance(region, torch.Tensor) else type(region).__name__
                raise PipelineError(f"Defect-GAN: region mask must have shape (B, 1, H, W) = {(n, 1, h, w)}, "
                                    f"got {got}.")
            region = (region > 0.5).float()
        return normal, labels, region

    def _region_from_mask(self, mask, n: int, h: int, w: int) -> torch.Tensor:
        mask = torch.as_tensor(mask)
        m = mask
        if m.dim() == 2:
            m = m[None, None]
        elif m.dim() == 3:
            m = m[None]
        if m.dim() != 4 or m.shape[1] != 1 or m.shape[-2:] != (h, w) or m.shape[0] not in (1, n):
            raise PipelineError(f"place_defect: mask has shape {_shape(mask)}; expected ({h}, {w}), "
                                f"(1, {h}, {w}) or ({n}, 1, {h}, {w}) to match the image.")
        return (m.expand(n, 1, h, w) > 0.5).float()

    def _region_from_box(self, box, n: int, h: int, w: int, device) -> torch.Tensor:
        try:
            x0, y0, x1, y1 = (float(v) for v in box)
        except (TypeError, ValueError):
            raise PipelineError(f"place_defect: box must be (x0, y0, x1, y1) fractions, got {box!r}.") from None
        if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
            raise PipelineError(f"place_defect: box {box!r} must satisfy 0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1 "
                                f"(fractions of width and height).")
        c0, r0 = min(int(x0 * w), w - 1), min(int(y0 * h), h - 1)
        c1, r1 = max(c0 + 1, round(x1 * w)), max(r0 + 1, round(y1 * h))   # at least one pixel
        region = torch.zeros(n, 1, h, w, device=device)
        region[..., r0:r1, c0:c1] = 1.0
        return region
