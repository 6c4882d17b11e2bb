"""The downstream segmenter: it learns from masks, is seeded like the classifier, stops and
selects as its log says; the joint augmentation keeps image and mask aligned."""

import functools
import math

import numpy as np
import pytest
import torch

from pipeline.downstream.augment import strong_classical, strong_classical_joint
from pipeline.downstream.pixel_scores import pixel_average_precision
from pipeline.downstream.segmenter import SmallUNet, StopRule, predict_pixel_scores, train_segmenter


def squares(n, seed, res=32, channels=1):
    """Every other image has one bright 4-7 px square (its mask) on mid-grey noise; label 1."""
    rng = np.random.default_rng(seed)
    images = rng.integers(60, 200, (n, channels, res, res)).astype(np.uint8)
    masks = np.zeros((n, 1, res, res), np.uint8)
    labels = np.zeros(n, np.int64)
    for i in range(1, n, 2):
        side = int(rng.integers(4, 8))
        y, x = rng.integers(0, res - side, 2)
        masks[i, 0, y:y + side, x:x + side] = 1
        images[i][:, masks[i, 0] == 1] = 250
        labels[i] = 1
    return images, masks, labels


TRAIN, VAL = squares(48, 0), squares(16, 1)
LEARN = StopRule(eval_every=10, patience=100, min_steps=10, max_steps=100)


def train(masks=None, val_masks=None, *, lr=3e-3, seed=0, stop=LEARN, **kw):
    x, m, y = TRAIN
    return train_segmenter(x, m if masks is None else masks, y, val_images=VAL[0],
                           val_masks=VAL[1] if val_masks is None else val_masks, stop=stop, batch_size=8,
                           lr=lr, seed=seed, **kw)


@functools.lru_cache(maxsize=1)
def trained_on_the_squares():
    """(model, log) taught the true squares (shared by two tests: training is the slow part)."""
    return train()


def test_unet_keeps_the_image_size_and_rejects_sides_it_cannot_pool():
    for res, channels in ((32, 1), (64, 3), (48, 3)):
        net = SmallUNet(channels).eval()
        x = torch.zeros(2, channels, res, res).contiguous(memory_format=torch.channels_last)
        assert net(x).shape == (2, 1, res, res)
    assert SmallUNet(1, depth=2)(torch.zeros(1, 1, 36, 36)).shape == (1, 1, 36, 36)
    with pytest.raises(ValueError, match="divisible by 8"):
        SmallUNet(1)(torch.zeros(1, 1, 36, 36))
    with pytest.raises(ValueError, match="depth"):
        SmallUNet(1, depth=0)


def test_it_learns_bright_squares_from_their_masks():
    x_val, m_val, _ = VAL
    untrained, _ = train(lr=0.0, stop=StopRule(10, 1, 10, 10))
    before = pixel_average_precision(predict_pixel_scores(untrained, x_val), m_val)
    model, log = trained_on_the_squares()
    scores = predict_pixel_scores(model, x_val)
    assert scores.shape == (16, 32, 32) and scores.dtype == np.float32
    assert scores.min() >= 0 and scores.max() <= 1
    after = pixel_average_precision(scores, m_val)
    # Chance level is the defect fraction (~2 %); the square is one bright blob.
    assert before < 0.3 < 0.9 < after
    assert log.best_val_pixel_ap > 0.9
    assert after == pytest.approx(log.best_val_pixel_ap, abs=1e-3)      # the returned weights are the best ones


def test_it_learns_from_the_masks_not_the_images():
    """The same images with every mask mirrored left-right (the squares become background)."""
    model_a, _ = trained_on_the_squares()
    model_b, _ = train(TRAIN[1][..., ::-1].copy(), VAL[1][..., ::-1].copy())
    scores_a, scores_b = predict_pixel_scores(model_a, VAL[0]), predict_pixel_scores(model_b, VAL[0])
    assert not np.allclose(scores_a, scores_b, atol=1e-3)
    # Scored against the true squares, the model taught them wins by far.
    assert pixel_average_precision(scores_a, VAL[1]) > pixel_average_precision(scores_b, VAL[1]) + 0.3


def test_same_seed_same_initial_weights_for_any_data_and_same_results():
    # lr = 0: the parameters stay at their initialisation (BatchNorm statistics still move).
    other_masks = np.zeros_like(TRAIN[1])
    other_masks[:, :, 10:20, 10:20] = 1
    a, _ = train(lr=0.0, stop=StopRule(5, 1, 5, 5))
    b, _ = train(other_masks, lr=0.0, stop=StopRule(5, 1, 5, 5))
    c, _ = train(lr=0.0, seed=1, stop=StopRule(5, 1, 5, 5))
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))

    state = torch.random.get_rng_state()
    first, log_1 = train(stop=StopRule(5, 100, 5, 20))
    second, log_2 = train(stop=StopRule(5, 100, 5, 20))
    assert torch.equal(torch.random.get_rng_state(), state)                 # global RNG untouched
    assert log_1.history == log_2.history
    for (name, t1), t2 in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(t1, t2), name


def check_log(log, stop):
    steps = [s for s, _, _ in log.history]
    assert steps == sorted(set(steps)) and steps[-1] == log.steps
    assert all(s % stop.eval_every == 0 or s == stop.max_steps for s in steps)
    best = max(log.history, key=lambda h: (h[1], -h[2]))
    assert (log.best_step, log.best_val_pixel_ap, log.best_val_loss) == best
    evals_after_best = len(steps) - 1 - steps.index(log.best_step)
    if log.stopped_by == "patience":
        assert stop.min_steps <= log.steps < stop.max_steps and evals_after_best >= stop.patience
        # It stopped at the first evaluation where both conditions held.
        assert log.steps - stop.eval_every < stop.min_steps or evals_after_best - 1 < stop.patience
    else:
        assert log.stopped_by == "max_steps" and log.steps == stop.max_steps


def test_early_stopping_log_is_consistent_and_the_best_weights_are_returned():
    # Weights fixed (lr = 0): validation scores only wander with the BatchNorm statistics, so
    # patience 1 stops early and the returned (best) weights are not the last ones.
    stop = StopRule(eval_every=5, patience=1, min_steps=10, max_steps=200)
    model, log = train(lr=0.0, stop=stop)
    check_log(log, stop)
    assert log.stopped_by == "patience"
    scores = predict_pixel_scores(model, VAL[0])
    assert pixel_average_precision(scores, VAL[1]) == pytest.approx(log.best_val_pixel_ap, abs=1e-4)

    stop = StopRule(eval_every=7, patience=100, min_steps=10, max_steps=30)     # 30 is not a multiple of 7
    _, log = train(stop=stop)
    check_log(log, stop)
    assert [s for s, _, _ in log.history] == [7, 14, 21, 28, 30]


def test_augmented_and_bf16_training_run_and_inputs_are_checked():
    _, log = train(stop=StopRule(5, 100, 5, 10), augment=strong_classical_joint)
    assert log.steps == 10 and math.isfinite(log.best_val_loss)
    model, log = train(stop=StopRule(5, 100, 5, 10), precision="bf16")
    assert predict_pixel_scores(model, VAL[0][:3], precision="bf16").shape == (3, 32, 32)
    assert predict_pixel_scores(model, VAL[0][:0]).shape == (0, 32, 32)
    with pytest.raises(ValueError, match="val_masks has no defect pixel"):
        train(val_masks=np.zeros_like(VAL[1]))
    with pytest.raises(ValueError, match="masks must be"):
        train(TRAIN[1][:, :, :16])
    with pytest.raises(ValueError, match="labels"):
        train_segmenter(TRAIN[0], TRAIN[1], TRAIN[2][:5], val_images=VAL[0], val_masks=VAL[1],
                        stop=StopRule(), batch_size=8, lr=1e-3, seed=0)


# --------------------------------------------------------------------------- joint augmentation

def test_strong_classical_joint_moves_the_mask_with_the_image():
    rng = np.random.default_rng(5)
    masks = np.zeros((64, 1, 32, 32), np.float32)
    for m in masks:                                       # an off-centre rectangle, so every flip/turn shows
        y, x = rng.integers(2, 14, 2)
        m[0, y:y + 12, x:x + 9] = 1
    m = torch.from_numpy(masks)
    x = (m * 2 - 1).repeat(1, 3, 1, 1)                    # the image IS its mask, in every channel
    out_x, out_m = strong_classical_joint(x, m, torch.Generator().manual_seed(3))
    # One mechanism: the image is exactly what strong_classical makes from the same generator state.
    assert torch.equal(out_x, strong_classical(x, torch.Generator().manual_seed(3)))
    assert torch.equal(x, (m * 2 - 1).repeat(1, 3, 1, 1))                  # inputs left alone
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}
    assert (out_m != m).flatten(1).any(1).sum() > 40                    # the masks did move
    # Brightness/contrast maps the image's two levels to two others, in order; the warps then act
    # on image and mask alike. So, per image, where the image is more than halfway from its low
    # to its high level, the warped mask must be 1 (undecidable within 1 % of halfway).
    low = out_x.amin(dim=(1, 2, 3), keepdim=True)
    high = out_x.amax(dim=(1, 2, 3), keepdim=True)
    fraction = (out_x[:, :1] - low) / (high - low)
    clear = (fraction - 0.5).abs() > 0.01
    assert torch.equal((fraction > 0.5)[clear], out_m.bool()[clear])
    assert clear.float().mean() > 0.98


def test_strong_classical_joint_rejects_a_mask_of_another_shape():
    with pytest.raises(ValueError, match="m must be"):
        strong_classical_joint(torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8), torch.Generator())


def test_masks_of_0_and_255_train_like_masks_of_0_and_1():
    stop = StopRule(5, 100, 5, 10)
    a, log_a = train(stop=stop)
    b, log_b = train(TRAIN[1] * 255, VAL[1] * 255, stop=stop)
    assert log_a.history == log_b.history
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
