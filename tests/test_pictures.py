"""Every picture the pipeline writes explains itself: checked through the text drawn on it (titles,
row and column labels, legends, axis labels), not pixels."""

from __future__ import annotations

import io

import numpy as np
import torch
from matplotlib.colors import to_rgb
from PIL import Image

from pipeline.training.grid import labelled_grid, sample_grid_text, save_grid
from pipeline.training.plots import MAX_SERIES, loss_figure, plot_loss_curves


def png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_training_sample_grid_has_a_title_and_labelled_rows_and_columns(tmp_path):
    rows = {"normal": torch.rand(4, 3, 16, 16) * 2 - 1, "defaced": torch.rand(4, 3, 16, 16) * 2 - 1,
            "mask": torch.rand(4, 1, 16, 16)}
    batch = {"a": rows["normal"], "label": torch.tensor([1, 2, 1, 2])}
    title, columns = sample_grid_text("defectgan", 12_500, batch, ["normal", "scratch", "spot"])
    assert "defectgan" in title and "12.50 kimg" in title
    assert columns == ["scratch", "spot", "scratch", "spot"]
    image, labels = labelled_grid(rows, title=title, columns=columns)
    assert labels.title == title
    assert labels.rows == ["input (normal)", "output (defect added)", "generated mask"]
    assert labels.columns == columns
    bare = labelled_grid(rows)[0]
    assert image.height > bare.height       # room made above the grid for the title and classes
    path = save_grid(rows, tmp_path / "samples.png", title=title, columns=columns)
    assert path.name == "samples.png" and Image.open(path).size == image.size


def test_unpaired_batches_label_columns_by_the_defect_class():
    _, columns = sample_grid_text("cyclegan", 0, {"a": torch.zeros(2), "label_b": torch.tensor([2, 1])},
                                  ["normal", "crack", "stain"])
    assert columns == ["stain", "crack"]
    assert sample_grid_text("dcgan", 0, {"image": torch.zeros(2)}, ["normal"])[1] == []


def test_synthetic_preview_has_a_title_and_labelled_rows_and_columns(tmp_path):
    from pipeline.generation.writer import PREVIEW_FILE, SyntheticWriter

    writer = SyntheticWriter(tmp_path, ["scratch", "spot"], channels=3)
    rng = np.random.default_rng(0)
    img = lambda ch: png(rng.integers(0, 255, (16, 16, 3) if ch == 3 else (16, 16), dtype=np.uint8))  # noqa: E731
    n = 4
    labels = ["scratch", "spot", "scratch", "spot"]
    writer.add({"id": [f"s{i}" for i in range(n)], "label": labels, "label_idx": [1, 2, 1, 2],
                "image_png": [img(3) for _ in range(n)], "mask_png": [img(1) for _ in range(n)],
                "region_png": [img(1) for _ in range(n)], "model": ["defectgan"] * n, "seed": list(range(n)),
                "normal_id": [f"n{i}" for i in range(n)], "mask_fraction": [0.1] * n},
               normal_png=lambda i: img(3))
    text = writer.preview_text({"model": "defectgan"})
    writer.close({"model": "defectgan"})
    assert "defectgan" in text["title"]
    assert text["columns"] == labels
    _, drawn = labelled_grid(writer._preview_rows(), **text)
    assert drawn.rows == ["input (normal)", "output (generated)", "generated mask", "requested mask"]
    assert drawn.columns == labels and drawn.title == text["title"]
    assert (tmp_path / PREVIEW_FILE).is_file()


def test_loss_curves_show_at_most_six_distinct_series_per_panel_with_the_legend_outside(tmp_path):
    d_keys = [f"D/term{i}" for i in range(7)]
    g_keys = [f"G/term{i}" for i in range(5)]                    # Defect-GAN: 12 series in all
    history = [{"nimg": 100 * t, **{k: float(t + i) for i, k in enumerate(d_keys + g_keys)},
                "D/grad_norm": 1.0} for t in range(1, 5)]
    fig = loss_figure(history, title="defectgan")
    try:
        axes = [ax for ax in fig.axes if ax.get_visible()]
        assert len(axes) == 3                                       # D split in two, G in one
        assert fig._suptitle.get_text() == "defectgan: training losses"
        shown = []
        for ax in axes:
            lines = ax.get_lines()
            assert 1 <= len(lines) <= MAX_SERIES
            assert len({to_rgb(line.get_color()) for line in lines}) == len(lines)      # distinct colours
            legend = ax.get_legend()
            assert [t.get_text() for t in legend.get_texts()] == [line.get_label() for line in lines]
            assert legend.get_bbox_to_anchor().x0 > ax.get_window_extent().x1 - 1   # beside the curves
            assert "kimg" in ax.get_xlabel() and "loss" in ax.get_ylabel()
            assert "losses" in ax.get_title()
            shown += [line.get_label() for line in lines]
        assert sorted(shown) == sorted(d_keys + g_keys)             # every term, grad norms left out
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    path = plot_loss_curves(history, tmp_path / "loss_curves.png", title="defectgan")
    assert path.name == "loss_curves.png" and path.stat().st_size > 0
