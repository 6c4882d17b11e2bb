"""Equalised-LR layers, pixel norm, minibatch stddev, SPADE and noise injection (METHODS.md)."""

import math

import torch
import torch.nn.functional as F

from pipeline.models.equalized import EqualizedConv2d, EqualizedLinear, MinibatchStdDev, PixelNorm
import pytest

from pipeline.models.spade import SPADE, NoiseInjection, SPADEResBlock, UniformControl, _stretch


# ---- equalised learning rate -----------------------------------------------------------------

def test_equalized_conv_unit_variance_weights_and_he_scale():
    torch.manual_seed(0)
    conv = EqualizedConv2d(64, 128, 3, padding=1)
    assert abs(conv.weight.std().item() - 1.0) < 0.02
    assert abs(conv.weight.mean().item()) < 0.02
    assert math.isclose(conv.scale, math.sqrt(2.0 / (64 * 3 * 3)))
    gained = EqualizedConv2d(8, 4, 1, gain=1.0)
    assert math.isclose(gained.scale, 1.0 / math.sqrt(8))


def test_equalized_conv_output_equals_conv2d_with_scaled_weight():
    torch.manual_seed(0)
    conv = EqualizedConv2d(3, 5, 3, stride=2, padding=1)
    with torch.no_grad():
        conv.bias.normal_()
    x = torch.randn(2, 3, 8, 8)
    expected = F.conv2d(x, conv.weight * math.sqrt(2.0 / 27), conv.bias, stride=2, padding=1)
    torch.testing.assert_close(conv(x), expected, rtol=0, atol=0)


def test_equalized_linear_scale_and_output():
    torch.manual_seed(0)
    lin = EqualizedLinear(256, 512)
    assert abs(lin.weight.std().item() - 1.0) < 0.01
    assert math.isclose(lin.scale, math.sqrt(2.0 / 256))
    x = torch.randn(3, 256)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight * math.sqrt(2.0 / 256), lin.bias), rtol=0, atol=0)


# ---- pixel norm and minibatch stddev ---------------------------------------------------------

def test_pixel_norm_unit_mean_square_over_channels():
    x = torch.randn(2, 7, 3, 3) * 5 + 1
    y = PixelNorm()(x)
    torch.testing.assert_close(y.pow(2).mean(dim=1), torch.ones(2, 3, 3), rtol=1e-5, atol=1e-5)
    # Hand check on one pixel: (3, 4) has mean square 12.5.
    v = PixelNorm(eps=0.0)(torch.tensor([3.0, 4.0]).view(1, 2, 1, 1)).flatten()
    torch.testing.assert_close(v, torch.tensor([3.0, 4.0]) / math.sqrt(12.5))


def test_minibatch_stddev_hand_check():
    # Batch of 2, 2 features, 1x1 pixel: feature 0 values (1, 3) -> std 1; feature 1 (0, 4) -> std 2.
    x = torch.tensor([[1.0, 0.0], [3.0, 4.0]]).view(2, 2, 1, 1)
    y = MinibatchStdDev(group_size=0, eps=0.0)(x)
    assert y.shape == (2, 3, 1, 1)
    torch.testing.assert_close(y[:, :2], x)
    torch.testing.assert_close(y[:, 2], torch.full((2, 1, 1), 1.5))   # mean of (1, 2)


def test_minibatch_stddev_groups_and_spatial_broadcast():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 2, 2)
    y = MinibatchStdDev(group_size=2, eps=0.0)(x)
    assert y.shape == (4, 4, 2, 2)
    # Group layout as in ProGAN: sample i is in group i % (B / G) -> groups {0, 2} and {1, 3}.
    for members in ([0, 2], [1, 3]):
        expected = x[members].std(dim=0, unbiased=False).mean()
        for i in members:
            torch.testing.assert_close(y[i, 3], torch.full((2, 2), expected.item()))
    whole = MinibatchStdDev(group_size=0, eps=0.0)(x)[:, 3]
    torch.testing.assert_close(whole, torch.full((4, 2, 2), x.std(dim=0, unbiased=False).mean().item()))


# ---- SPADE ------------------------------------------------------------------------------------

def test_spade_zero_gamma_beta_gives_zero_output():
    torch.manual_seed(0)
    spade = SPADE(4, 3, hidden=8)
    with torch.no_grad():
        for conv in (spade.gamma, spade.beta):
            conv.weight.zero_()
            conv.bias.zero_()
    x, control = torch.randn(2, 4, 8, 8), torch.rand(2, 3, 8, 8)
    assert torch.equal(spade(x, control), torch.zeros(2, 4, 8, 8))


def test_spade_output_is_gamma_times_normalized_plus_beta():
    torch.manual_seed(0)
    spade = SPADE(2, 1, hidden=4)
    # Gamma = 2, beta = -1 everywhere (weights 0, constant biases): out = 2 * IN(x) - 1.
    with torch.no_grad():
        spade.gamma.weight.zero_(); spade.gamma.bias.fill_(2.0)
        spade.beta.weight.zero_(); spade.beta.bias.fill_(-1.0)
    x = torch.tensor([[1.0, 3.0], [5.0, 7.0]]).view(1, 1, 2, 2).repeat(1, 2, 1, 1)
    normalized = (x - 4.0) / math.sqrt(5.0 + 1e-5)          # mean 4, population var 5
    torch.testing.assert_close(spade(x, torch.zeros(1, 1, 2, 2)), 2 * normalized - 1)
    # And for a learned net: out == gamma * IN(x) + beta with gamma, beta from `modulation`.
    spade2 = SPADE(3, 2, hidden=4)
    x2, c2 = torch.randn(1, 3, 4, 4), torch.rand(1, 2, 4, 4)
    gamma, beta = spade2.modulation(c2, (4, 4))
    torch.testing.assert_close(spade2(x2, c2), gamma * F.instance_norm(x2) + beta)


def test_spade_modulation_differs_where_the_control_map_differs():
    torch.manual_seed(0)
    spade = SPADE(4, 2, hidden=8, kernel_size=1)   # 1x1 convs: modulation is strictly per pixel
    control = torch.zeros(1, 2, 4, 4)
    control[:, 0] = 1.0                             # class 0 everywhere ...
    control[:, :, :2, :2] = torch.tensor([0.0, 1.0]).view(1, 2, 1, 1)   # ... class 1 top-left
    gamma, beta = spade.modulation(control, (8, 8))     # control resized (nearest) to 8x8
    inside, outside = gamma[..., :4, :4], gamma[..., 4:, 4:]
    assert torch.allclose(inside, inside[..., :1, :1].expand_as(inside))   # constant within a region
    assert torch.allclose(outside, outside[..., :1, :1].expand_as(outside))
    assert not torch.allclose(inside[..., 0, 0], outside[..., 0, 0])      # differs between regions
    assert not torch.allclose(beta[..., 0, 0], beta[..., 7, 7])


def test_spade_resblock_shapes_and_learned_shortcut():
    torch.manual_seed(0)
    same = SPADEResBlock(8, 8, label_channels=3, hidden=8)
    change = SPADEResBlock(8, 4, label_channels=3, hidden=8)
    assert not same.learned_shortcut and change.learned_shortcut
    x, control = torch.randn(2, 8, 8, 8), torch.rand(2, 3, 16, 16)
    assert same(x, control).shape == (2, 8, 8, 8)
    assert change(x, control).shape == (2, 4, 8, 8)


# ---- noise injection --------------------------------------------------------------------------

def test_noise_injection_zero_weight_is_identity():
    layer = NoiseInjection(3)
    x = torch.randn(2, 3, 4, 4)
    assert torch.equal(layer(x), x)                                   # weight starts at 0
    assert torch.equal(layer.weight, torch.zeros(1, 3, 1, 1))


def test_noise_injection_adds_weighted_noise():
    layer = NoiseInjection(3)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, -1.0, 2.0]).view(1, 3, 1, 1))
    x, noise = torch.randn(2, 3, 4, 4), torch.randn(2, 1, 4, 4)
    torch.testing.assert_close(layer(x, noise), x + layer.weight * noise)
    # Drawn from the global RNG when not given: same seed, same output.
    torch.manual_seed(1)
    a = layer(x)
    torch.manual_seed(1)
    torch.testing.assert_close(layer(x), a)
    torch.manual_seed(1)
    torch.testing.assert_close(a, x + layer.weight * torch.randn(2, 1, 4, 4))


# ---- SPADE on a per-image constant control map ---------------------------------------------------

def test_stretch_keeps_the_borders_and_repeats_the_middle():
    t = torch.arange(5.0).view(1, 5)
    assert _stretch(t, 1, 9, 2).tolist() == [[0, 1, 2, 2, 2, 2, 2, 3, 4]]
    assert _stretch(t, 1, 6, 2).tolist() == [[0, 1, 2, 2, 3, 4]]
    assert _stretch(torch.arange(3.0).view(3, 1), 0, 4, 1).flatten().tolist() == [0, 1, 1, 2]


@pytest.mark.parametrize("size", [(1, 1), (3, 4), (5, 5), (6, 9), (16, 16), (33, 20)])
@pytest.mark.parametrize("kernel_size", [3, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_uniform_control_modulation_equals_the_dense_map(size, kernel_size, channels_last):
    """Computing gamma/beta once per class on a small map and stretching it gives the dense
    path's values and gradients at every pixel, borders included."""
    torch.manual_seed(0)
    K, C = 4, 6
    spade = SPADE(C, K, hidden=5, kernel_size=kernel_size)
    with torch.no_grad():
        for p in spade.parameters():
            p.normal_()
    labels = torch.tensor([3, 0, 3, 1, 2])
    control = UniformControl(labels, K)
    dense = F.one_hot(labels, K).float()[:, :, None, None].expand(-1, -1, *size).contiguous()
    assert torch.equal(control.dense(size), dense)
    x = torch.randn(5, C, *size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    gamma, beta = spade.modulation(control, size)
    gamma_ref, beta_ref = spade.modulation(dense, size)
    torch.testing.assert_close(gamma, gamma_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(beta, beta_ref, rtol=1e-5, atol=1e-5)
    out = spade(x, control)
    ref = spade(x, dense)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    if channels_last and min(size) > 1:
        assert out.is_contiguous(memory_format=torch.channels_last)
    w = torch.randn_like(ref)
    grads = torch.autograd.grad((out * w).sum(), list(spade.parameters()))
    grads_ref = torch.autograd.grad((ref * w).sum(), list(spade.parameters()))
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-4, atol=1e-4)
