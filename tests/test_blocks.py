"""pipeline/models/blocks.py and pool.py: shapes, receptive field, spectral norm, history pool."""

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize

from pipeline.models.blocks import (
    DCGANDiscriminator,
    DCGANGenerator,
    InstanceNorm,
    PatchDiscriminator,
    ResnetBlock,
    ResnetGenerator,
    SmallMapConv2d,
    StarGANDiscriminator,
    UnetGenerator,
    difference_mask,
    init_weights,
    norm_layer,
    patch_layers_for,
    set_small_map_gemm,
)
from pipeline.models.pool import ImagePool


# --------------------------------------------------------------------------- PatchGAN

@pytest.mark.parametrize("res,n_layers,grid", [(32, 3, 2), (64, 3, 6), (256, 3, 30), (16, 2, 2), (32, 1, 14)])
def test_patchgan_output_grid(res, n_layers, grid):
    d = PatchDiscriminator(3, base_channels=2, n_layers=n_layers)
    scores, logits = d(torch.randn(2, 3, res, res))
    assert scores.shape == (2, 1, grid, grid)        # 256 px, n_layers=3: the paper's 30x30 grid
    assert logits is None


def test_patchgan_receptive_field_analytic():
    assert PatchDiscriminator(3, 4, n_layers=3).receptive_field() == 70
    assert PatchDiscriminator(3, 4, n_layers=2).receptive_field() == 34
    assert PatchDiscriminator(3, 4, n_layers=1).receptive_field() == 16


def test_patchgan_receptive_field_by_gradient():
    torch.manual_seed(0)
    d = PatchDiscriminator(1, base_channels=2, n_layers=3, norm="none")   # norm would couple all pixels
    x = torch.randn(1, 1, 96, 96, requires_grad=True)
    scores, _ = d(x)                                                      # (1, 1, 10, 10)
    scores[0, 0, 5, 5].backward()
    rows = x.grad[0, 0].abs().sum(1).nonzero().flatten()
    cols = x.grad[0, 0].abs().sum(0).nonzero().flatten()
    assert rows.max() - rows.min() + 1 == 70
    assert cols.max() - cols.min() + 1 == 70


def test_patch_layers_capped_for_small_images():
    assert patch_layers_for(16, 3) == 2
    assert patch_layers_for(32, 3) == 3
    assert patch_layers_for(256, 3) == 3
    assert patch_layers_for(128, 6) == 5


def test_patchgan_aux_classifier_head():
    d = PatchDiscriminator(3, base_channels=4, n_layers=2, num_classes=5, norm="none")
    scores, logits = d(torch.randn(3, 3, 16, 16))
    assert scores.shape == (3, 1, 2, 2)
    assert logits.shape == (3, 5)


def test_spectral_norm_unit_largest_singular_value():
    torch.manual_seed(0)
    d = PatchDiscriminator(3, base_channels=4, n_layers=2, num_classes=2, spectral_norm=True)
    convs = [m for m in d.modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(parametrize.is_parametrized(m, "weight") for m in convs)
    d.train()
    with torch.no_grad():
        for _ in range(30):                          # one power iteration per forward in train mode
            d(torch.randn(2, 3, 16, 16))
    d.eval()                                         # read the weights without another iteration
    for m in convs:
        w = m.weight.detach().reshape(m.weight.shape[0], -1)
        assert torch.linalg.matrix_norm(w, ord=2).item() == pytest.approx(1.0, abs=0.03)
        raw = m.parametrizations.weight.original.detach().reshape(w.shape[0], -1)
        assert abs(torch.linalg.matrix_norm(raw, ord=2).item() - 1.0) > 0.1   # it was not 1 before SN


def test_patchgan_norm_choices():
    assert any(isinstance(m, InstanceNorm) for m in PatchDiscriminator(3, 4, 2, norm="instance").modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in PatchDiscriminator(3, 4, 2, norm="batch").modules())
    plain = PatchDiscriminator(3, 4, 2, norm="none")
    assert not any(isinstance(m, (InstanceNorm, nn.BatchNorm2d)) for m in plain.modules())
    with pytest.raises(ValueError):
        PatchDiscriminator(3, 4, 2, norm="layer")


# --------------------------------------------------------------------------- generators

def test_resnet_generator_shape_blocks_and_range():
    g = ResnetGenerator(4, 3, base_channels=4, n_blocks=3, n_down=2)
    y = g(torch.randn(2, 4, 16, 16) * 10)
    assert y.shape == (2, 3, 16, 16)
    assert y.abs().max() <= 1.0                      # tanh
    assert sum(isinstance(m, ResnetBlock) for m in g.modules()) == 3
    assert any(isinstance(m, nn.ReflectionPad2d) for m in g.modules())
    # the bottleneck runs at 16 / 2**2 = 4 px with 4 * 2**2 channels
    block = next(m for m in g.modules() if isinstance(m, ResnetBlock))
    assert block.block[1].in_channels == 16


def test_resnet_block_is_residual():
    blk = ResnetBlock(4, "instance")
    with torch.no_grad():
        for m in blk.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.zero_()
                m.bias.zero_()
    x = torch.randn(1, 4, 8, 8)
    assert torch.equal(blk(x), x)


@pytest.mark.parametrize("res", [16, 32, 64])
def test_unet_generator_depth_from_resolution(res):
    g = UnetGenerator(3, 2, base_channels=4, resolution=res)
    assert g.num_downs == res.bit_length() - 1       # log2(res): 1x1 bottleneck
    y = g(torch.randn(2, 3, res, res))
    assert y.shape == (2, 2, res, res) and y.abs().max() <= 1.0


def test_unet_skip_connections_and_dropout_placement():
    g = UnetGenerator(3, 3, base_channels=8, num_downs=8, norm="batch")
    # the outermost up-conv sees its decoder features concatenated with the encoder's (skip): 2 x 8
    outer_up = [m for m in g.model.model if isinstance(m, nn.ConvTranspose2d)][0]
    assert outer_up.in_channels == 16
    assert sum(isinstance(m, nn.Dropout) for m in g.modules()) == 3     # as in the 256-px paper net
    with pytest.raises(ValueError):
        UnetGenerator(3, 3)


def test_norm_layer_and_init_weights():
    assert isinstance(norm_layer("instance", 4), InstanceNorm)
    assert isinstance(norm_layer("batch", 4), nn.BatchNorm2d)
    assert isinstance(norm_layer("none", 4), nn.Identity)
    with pytest.raises(ValueError):
        norm_layer("group", 4)
    torch.manual_seed(0)
    net = init_weights(nn.Sequential(nn.Conv2d(64, 64, 3), nn.BatchNorm2d(64)))
    assert net[0].weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert net[0].bias.abs().sum() == 0
    assert net[1].weight.mean().item() == pytest.approx(1.0, abs=0.01)


def test_dcgan_shapes_and_conditioning():
    g = DCGANGenerator(z_dim=8, channels=3, resolution=16, base_channels=4, num_classes=3)
    labels = torch.tensor([0, 2, 1, 1])
    x = g(torch.randn(4, 8), labels)
    assert x.shape == (4, 3, 16, 16)
    cgan = DCGANDiscriminator(3, 16, 4, num_classes=3, conditioning="cgan")
    assert cgan.features[0].in_channels == 3 + 3    # one-hot label planes concatenated
    scores, logits = cgan(x, labels)
    assert scores.shape == (4,) and logits is None
    acgan = DCGANDiscriminator(3, 16, 4, num_classes=3, conditioning="acgan")
    scores, logits = acgan(x)
    assert scores.shape == (4,) and logits.shape == (4, 3)
    with pytest.raises(ValueError):
        DCGANGenerator(8, 3, 24, 4)


def test_difference_mask_range():
    a = torch.zeros(2, 3, 4, 4)
    b = a.clone()
    b[0, :, 1, 1] = 1.0
    b[0, 0, 2, 2] = 0.5
    m = difference_mask(b, a)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0, 1, 1] == 1.0 and m[0, 0, 2, 2].item() == pytest.approx(0.5 / 3)
    assert m[1].abs().sum() == 0                     # unchanged image: empty mask


# --------------------------------------------------------------------------- image pool

def _const_batch(values):
    return torch.stack([torch.full((1, 2, 2), float(v)) for v in values])


def test_pool_returns_same_batch_until_full():
    pool = ImagePool(4)
    first = _const_batch([0, 1, 2])
    assert torch.equal(pool.query(first), first)
    assert len(pool) == 3
    # one slot left: the first image is stored and returned, the second may be swapped
    torch.manual_seed(0)
    out = pool.query(_const_batch([3, 4]))
    assert out[0, 0, 0, 0] == 3 and len(pool) == 4


def test_pool_mixes_current_and_stored_once_full():
    torch.manual_seed(0)
    pool = ImagePool(4)
    pool.query(_const_batch([0, 1, 2, 3]))
    seen_stored = False
    for step in range(5):
        current = [10 * (step + 1) + i for i in range(4)]
        stored_before = {im[0, 0, 0].item() for im in pool.images}
        out = pool.query(_const_batch(current))
        for i, img in enumerate(out):
            v = img[0, 0, 0].item()
            # an earlier image of the same batch may already have been swapped in (as in CycleGAN)
            assert v == current[i] or v in stored_before or v in current[:i]
            seen_stored |= v in stored_before
        assert len(pool) == 4
    assert seen_stored


def test_pool_size_zero_passthrough():
    x = torch.randn(3, 1, 2, 2)
    assert ImagePool(0).query(x) is x


def test_pool_state_dict_roundtrip_reproduces_future_outputs():
    torch.manual_seed(3)
    pool = ImagePool(5)
    pool.query(torch.randn(6, 1, 2, 2))
    state = pool.state_dict()
    assert state["images"].shape == (5, 1, 2, 2)
    rng = torch.get_rng_state()
    batches = [torch.randn(4, 1, 2, 2) for _ in range(4)]
    torch.set_rng_state(rng)
    first = [pool.query(b) for b in batches]
    resumed = ImagePool(50)
    resumed.load_state_dict(state)
    torch.set_rng_state(rng)
    second = [resumed.query(b) for b in batches]
    assert resumed.size == 5
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # the roundtrip was not trivial: some output came from the stored history
    assert any(not torch.equal(a, b) for a, b in zip(first, batches))


def test_instance_norm_matches_torch_and_keeps_channels_last():
    torch.manual_seed(0)
    x = (torch.randn(3, 5, 7, 6) * 3 + 2).requires_grad_()
    ref = nn.InstanceNorm2d(5)(x)
    ours = InstanceNorm(5)(x)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    # each (sample, channel) plane has mean 0 and (biased) variance 1
    torch.testing.assert_close(ours.mean((2, 3)), torch.zeros(3, 5), rtol=0, atol=1e-5)
    torch.testing.assert_close(ours.var((2, 3), unbiased=False), torch.ones(3, 5), rtol=1e-3, atol=1e-3)
    w = torch.randn(3, 5, 7, 6)
    g_ref, = torch.autograd.grad((ref * w).sum(), x)
    g_ours, = torch.autograd.grad((ours * w).sum(), x)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-4, atol=1e-5)
    cl = x.detach().contiguous(memory_format=torch.channels_last)
    assert InstanceNorm(5)(cl).is_contiguous(memory_format=torch.channels_last)
    assert not nn.InstanceNorm2d(5)(cl).is_contiguous(memory_format=torch.channels_last)
    assert list(InstanceNorm(5).state_dict()) == list(nn.InstanceNorm2d(5).state_dict()) == []


# --------------------------------------------------------------------------- SmallMapConv2d

def _penalised_grads(conv_fn, x, weight, bias):
    """Output, and the gradients of a WGAN-GP style loss (output + squared input gradient, which
    needs the double backward) with respect to the input, the weight and the bias."""
    x = x.clone().requires_grad_()
    out = conv_fn(x)
    g_x, = torch.autograd.grad((out ** 2).sum(), x, create_graph=True)
    loss = out.sum() + (g_x ** 2).sum()
    return (out, *torch.autograd.grad(loss, [x, weight, bias]))


@pytest.mark.parametrize("stride,padding,size", [(2, 1, 4), (2, 1, 8), (1, 0, 3), (1, 1, 2)])
def test_small_map_conv_gemm_route_is_the_same_convolution(stride, padding, size, monkeypatch):
    torch.manual_seed(0)
    conv = SmallMapConv2d(6, 10, 4 if stride == 2 else 3, stride, padding).double()
    conv.MIN_GEMM_WEIGHT = 0                          # route this small layer too
    x = torch.randn(3, 6, size, size, dtype=torch.float64)
    assert conv.routes_to_gemm(x)
    unfold_calls = []
    real_unfold = torch.nn.functional.unfold
    monkeypatch.setattr(torch.nn.functional, "unfold", lambda *a, **k: unfold_calls.append(1) or real_unfold(*a, **k))
    ours = _penalised_grads(conv, x, conv.weight, conv.bias)
    assert unfold_calls                               # the matrix-product route ran
    reference = _penalised_grads(lambda t: torch.nn.functional.conv2d(t, conv.weight, conv.bias, stride, padding),
                                 x, conv.weight, conv.bias)
    assert ours[0].shape == reference[0].shape
    for got, want in zip(ours, reference):        # output, d/dx, d/dweight, d/dbias (double backward inside)
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


def test_small_map_conv_routes_only_large_weights_on_tiny_maps():
    D = StarGANDiscriminator(3, 128, 64, 6, num_classes=5)       # the papers' D: 64 -> 2048 channels
    seen = []
    for layer in D.features:
        if isinstance(layer, SmallMapConv2d):
            layer.register_forward_pre_hook(lambda m, args: seen.append((m.out_channels, m.routes_to_gemm(args[0]))))
    with torch.no_grad():
        D(torch.randn(1, 3, 128, 128))
    # 128 -> 64 -> ... -> 2 px: only 512 -> 1024 (8 -> 4 px) and 1024 -> 2048 (4 -> 2 px) qualify
    assert seen == [(64, False), (128, False), (256, False), (512, False), (1024, True), (2048, True)]
    deepest = D.features[-2]
    assert not deepest.routes_to_gemm(torch.empty(1, 1024, 4, 4, device="meta"))   # off the CPU: the kernel
    assert set_small_map_gemm(D, False) == 6
    assert not any(m.routes_to_gemm(torch.zeros(1, m.in_channels, 4, 4)) for m in D.features
                   if isinstance(m, SmallMapConv2d))
    assert list(D.state_dict()) == list(StarGANDiscriminator(3, 128, 64, 6, num_classes=5).state_dict())


def test_small_map_conv_under_bf16_autocast_and_channels_last():
    torch.manual_seed(0)
    conv = SmallMapConv2d(32, 64, 4, 2, 1)
    conv.MIN_GEMM_WEIGHT = 0
    x = torch.randn(4, 32, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours = conv(x)
        set_small_map_gemm(conv, False)
        kernel = conv(x)
    assert ours.dtype == kernel.dtype == torch.bfloat16 and ours.shape == kernel.shape == (4, 64, 2, 2)
    torch.testing.assert_close(ours.float(), kernel.float(), rtol=2e-2, atol=2e-2)
