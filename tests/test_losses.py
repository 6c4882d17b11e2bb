"""pipeline/models/losses.py on hand-computed values."""

import math

import pytest
import torch
from torch import nn

from pipeline.models import losses

ZEROS = torch.zeros(2, 1, 3, 3)          # logit 0 <=> D = sigmoid(0) = 0.5 everywhere


def test_vanilla_d_loss_at_half_is_2_log_2():
    assert losses.d_adversarial("vanilla", ZEROS, ZEROS).item() == pytest.approx(2 * math.log(2))
    assert losses.d_adversarial("nonsaturating", ZEROS, ZEROS).item() == pytest.approx(2 * math.log(2))


def test_vanilla_and_nonsaturating_on_other_logits():
    real = torch.full((4,), math.log(3.0))   # D(x) = 0.75
    fake = torch.full((4,), -math.log(3.0))  # D(G(z)) = 0.25
    expected_d = -math.log(0.75) - math.log(1 - 0.25)
    assert losses.d_adversarial("vanilla", real, fake).item() == pytest.approx(expected_d)
    # vanilla G minimises E[log(1 - D(G(z)))], nonsaturating minimises -E[log D(G(z))]
    assert losses.g_adversarial("vanilla", fake).item() == pytest.approx(math.log(0.75))
    assert losses.g_adversarial("nonsaturating", fake).item() == pytest.approx(-math.log(0.25))
    assert losses.g_adversarial("vanilla", ZEROS).item() == pytest.approx(-math.log(2))


def test_lsgan_values():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    # 0.5 * (mean((0, 2)^2) + mean((0, 2)^2)) = 0.5 * (2 + 2)
    assert losses.d_adversarial("lsgan", real, fake).item() == pytest.approx(2.0)
    # mean((0-1)^2, (2-1)^2) = 1
    assert losses.g_adversarial("lsgan", fake).item() == pytest.approx(1.0)


def test_hinge_values():
    real, fake = torch.tensor([0.5, 2.0]), torch.tensor([-2.0, 0.0])
    # mean(relu(0.5), relu(-1)) + mean(relu(-1), relu(1)) = 0.25 + 0.5
    assert losses.d_adversarial("hinge", real, fake).item() == pytest.approx(0.75)
    assert losses.g_adversarial("hinge", fake).item() == pytest.approx(1.0)


@pytest.mark.parametrize("kind", ["wgan", "wgan-gp"])
def test_wgan_values(kind):
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.0, 2.0])
    assert losses.d_adversarial(kind, real, fake).item() == pytest.approx(1.0 - 2.0)
    assert losses.g_adversarial(kind, fake).item() == pytest.approx(-1.0)


def test_unknown_loss_name_raises():
    with pytest.raises(ValueError, match="known"):
        losses.d_adversarial("wasserstein", ZEROS, ZEROS)
    with pytest.raises(ValueError):
        losses.g_adversarial("wasserstein", ZEROS)


def _linear_critic(w: torch.Tensor):
    return lambda x: x.flatten(1) @ w.flatten()          # (B,)


def test_gradient_penalty_zero_for_unit_norm_linear_critic():
    torch.manual_seed(0)
    w = torch.randn(3, 4, 4)
    w = w / w.norm()                                      # ||w|| = 1: grad norm 1 everywhere
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    assert losses.gradient_penalty(_linear_critic(w), real, fake).item() == pytest.approx(0.0, abs=1e-10)
    # ||w|| = 3 -> (3 - 1)^2 = 4 for every sample
    assert losses.gradient_penalty(_linear_critic(3 * w), real, fake).item() == pytest.approx(4.0, rel=1e-5)


def test_gradient_penalty_trains_the_critic():
    lin = nn.Linear(6, 1)
    gp = losses.gradient_penalty(lambda x: lin(x).squeeze(1), torch.randn(4, 6), torch.randn(4, 6))
    gp.backward()                                          # create_graph: GP depends on the weights
    assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_r1_on_linear_critic_is_squared_weight_norm():
    torch.manual_seed(1)
    w = torch.randn(2, 3, 3)
    r1 = losses.r1_penalty(_linear_critic(w), torch.randn(4, 2, 3, 3))
    assert r1.item() == pytest.approx(w.pow(2).sum().item(), rel=1e-5)


def test_clip_weights_bounds_every_parameter():
    torch.manual_seed(2)
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Linear(4, 2))
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 1)
    small = net[0].weight.detach().abs() < 0.01
    before = net[0].weight.detach().clone()
    losses.clip_weights(net, 0.01)
    for p in net.parameters():
        assert p.abs().max().item() <= 0.01 + 1e-12
    assert torch.equal(net[0].weight[small], before[small])          # values inside are kept
    assert (net[0].weight.abs() == 0.01).any()                        # values outside hit the bound


def test_drift_l1_and_classification():
    assert losses.drift_penalty(torch.tensor([1.0, 2.0, 3.0])).item() == pytest.approx(14 / 3)
    assert losses.l1(torch.tensor([1.0, -1.0]), torch.tensor([0.0, 1.0])).item() == pytest.approx(1.5)
    assert losses.classification(torch.zeros(3, 4), torch.tensor([0, 1, 3])).item() == pytest.approx(math.log(4))
