"""Headline DVC metrics: which figures each file keeps, its shared key names, 4 significant digits,
the plot TSV, and that `dvc metrics show` over a full DAG's headline files fits 200 columns."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import headline

FAMILIES = ["progan", "pix2pix", "cyclegan", "stargan", "defectgan"]
EVALUATE_REFERENCE_ROWS = ["do_nothing", "noise", "real_vs_real"]
CONDITIONS = ["real_only", "real_classical", "real_copy_paste"] + [
    f"real_synth_{m}{suffix}" for m in FAMILIES for suffix in ("", "_classical")]


def test_train_headline_keeps_kimg_rate_and_the_two_totals():
    last_tick = {"D/loss": 0.123456, "G/loss": 12.34567, "kimg": 0.6, "img_per_s": 95.4321,
                 "D/adv": 1.0, "lr/G": 1e-4, "progress/alpha": 0.5}
    assert headline.train_headline(last_tick) == {"kimg": 0.6, "D_loss": 0.1235, "G_loss": 12.35}


def test_evaluate_headline_keeps_the_overall_headline_metrics_that_were_computed():
    metrics = {"metrics": ["swd", "kid_domain", "mmd_domain", "duplicate_rate", "c2st"],
               "models": {"defectgan": {"overall": {"swd": 220.8379, "swd_16px": 250.3, "kid_domain": 14.1235,
                                                    "kid_domain_std": 1.27, "mmd_domain": 0.98, "c2st": 0.6041667,
                                                    "c2st_std": 0.03, "c2st_worse_than_do_nothing": False,
                                                    "duplicate_rate": None, "n_real": 48}},
                          "cyclegan": {"overall": {"swd": 758.88, "kid_domain": 0.8077, "duplicate_rate": 0.0}},
                          "real_vs_real": {"overall": {"swd": 50.0, "c2st": 0.5}}}}
    # kid_domain (fid_domain's feature space again) and every std, detail and flag stay in metrics.json.
    assert headline.evaluate_headline(metrics) == {
        "defectgan": {"swd": 220.8, "c2st": 0.6042},                          # null duplicate_rate left out
        "cyclegan": {"swd": 758.9, "duplicate_rate": 0.0},
        "real_vs_real": {"swd": 50.0, "c2st": 0.5}}


def test_downstream_headline_reads_the_paired_differences():
    flat = {"shots_5/real_only/macro_f1_mean": 0.41234, "shots_5/real_only/macro_f1_std": 0.02,
            "shots_5/real_only/degenerate": 0.0,
            "shots_5/real_synth_defectgan/macro_f1_mean": 0.45678,
            "shots_5/real_synth_defectgan/macro_f1_delta_mean": 0.044444,
            "shots_5/real_synth_defectgan/macro_f1_delta_ci_low": -0.0123456,
            "shots_5/real_synth_defectgan/macro_f1_delta_ci_high": 0.1012345,
            "shots_20/real_classical/macro_f1_mean": 0.6,
            "shots_20/real_classical/macro_f1_delta_mean": -0.01,
            "shots_20/real_classical/macro_f1_delta_ci_low": None,           # one seed: no interval
            "shots_20/real_classical/macro_f1_delta_ci_high": None,
            "cas/defectgan/accuracy_mean": 0.3}
    assert headline.downstream_headline(flat) == {
        (5, "real_only"): {"macro_f1": 0.4123},
        (5, "real_synth_defectgan"): {"macro_f1": 0.4568, "delta": 0.04444, "ci_low": -0.01235, "ci_high": 0.1012},
        (20, "real_classical"): {"macro_f1": 0.6, "delta": -0.01}}


def test_downstream_folder_is_replaced_whole(tmp_path):
    folder = tmp_path / "metrics" / "downstream"
    headline.write_downstream(folder, {"shots_5/real_only/macro_f1_mean": 0.5, "shots_5/old/macro_f1_mean": 0.1})
    headline.write_downstream(folder, {"shots_5/real_only/macro_f1_mean": 0.7})
    assert sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*.json")) == ["5shot/real_only.json"]
    assert json.loads((folder / "5shot" / "real_only.json").read_text()) == {"macro_f1": 0.7}


def test_scores_vs_shots_tsv_is_one_row_per_shot_count():
    flat = {"shots_20/real_only/macro_f1_mean": 0.6, "shots_5/real_only/macro_f1_mean": 0.4,
            "shots_5/real_only/accuracy_mean": 0.5, "shots_20/real_only/accuracy_mean": 0.7,
            "shots_5/real_synth_x/macro_f1_mean": 0.45, "shots_5/real_only/macro_f1_std": 0.1,
            "shots_5/real_synth_x/macro_f1_delta_mean": 0.05}
    assert headline.scores_vs_shots_tsv(flat).splitlines() == [
        "shots\treal_only/macro_f1\treal_synth_x/macro_f1\treal_only/accuracy\treal_synth_x/accuracy",
        "5\t0.4\t0.45\t0.5\t",
        "20\t0.6\t\t0.7\t"]
    # The plotted conditions are columns even where they did not run (dvc plots never misses a field).
    tsv = headline.scores_vs_shots_tsv(flat, metrics=["macro_f1"], conditions=headline.plotted_conditions(["y"]))
    assert tsv.splitlines() == [
        "shots\treal_only/macro_f1\treal_classical/macro_f1\treal_copy_paste/macro_f1\treal_synth_y/macro_f1"
        "\treal_synth_x/macro_f1", "5\t0.4\t\t\t\t0.45", "20\t0.6\t\t\t\t"]


def test_a_headline_never_grows_past_15_keys(tmp_path):
    with pytest.raises(ValueError, match="more than 15"):
        headline._write(tmp_path / "x.json", {f"k{i}": 1.0 for i in range(16)})


def _full_dag_headlines(root: Path) -> None:
    """Headline files as the default DAG writes them, with wide but plausible values."""
    for i, family in enumerate(FAMILIES):
        headline.write_train(root / "metrics" / "train" / f"{family}.json",
                             {"kimg": 1.2, "img_per_s": 422.57215 + i, "D/loss": -1.94549, "G/loss": 15.69211})
    headline.write_evaluate(root / "metrics" / "evaluate", {
        "metrics": ["swd", "kid_domain", "fid_domain", "mmd_domain", "duplicate_rate", "mask_in_region", "c2st"],
        "models": {m: {"overall": {"swd": 1225.74168, "kid_domain": 123.79673, "fid_domain": 215.38536,
                                   "mmd_domain": 0.98, "duplicate_rate": 0.95833, "mask_in_region": 0.139,
                                   "c2st": 0.7152778, "c2st_std": 0.0123, "c2st_worse_than_do_nothing": True}}
                   for m in FAMILIES + EVALUATE_REFERENCE_ROWS}})
    flat = {}
    for shots in (5, 20):
        for c in CONDITIONS:
            flat[f"shots_{shots}/{c}/macro_f1_mean"] = 0.123456
            if c != "real_only":
                flat.update({f"shots_{shots}/{c}/macro_f1_delta_mean": -0.104545,
                             f"shots_{shots}/{c}/macro_f1_delta_ci_low": -0.204545,
                             f"shots_{shots}/{c}/macro_f1_delta_ci_high": -0.004545,
                             f"shots_{shots}/{c}/degenerate": 1.0})
            if not c.endswith("_classical"):                     # the segmenter's conditions
                d = "real_draem" if c == "real_classical" else c
                flat[f"segment/shots_{shots}/{d}/pixel_ap_mean"] = 0.123456
                if c != "real_only":
                    flat.update({f"segment/shots_{shots}/{d}/pixel_ap_delta_mean": -0.104545,
                                 f"segment/shots_{shots}/{d}/pixel_ap_delta_ci_low": -0.204545,
                                 f"segment/shots_{shots}/{d}/pixel_ap_delta_ci_high": -0.004545})
    headline.write_downstream(root / "metrics" / "downstream", flat)


def test_dvc_metrics_show_fits_200_columns(tmp_path):
    dvc = Path(sys.executable).with_name("dvc")
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run([str(dvc), "init", "-q"], cwd=tmp_path, check=True, env=env)
    _full_dag_headlines(tmp_path)
    (tmp_path / "dvc.yaml").write_text("metrics:\n  - metrics/train\n  - metrics/evaluate\n  - metrics/downstream\n")
    show = subprocess.run([str(dvc), "metrics", "show"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert show.returncode == 0, show.stderr
    lines = show.stdout.splitlines()
    segment_rows = 2 * len([c for c in CONDITIONS if not c.endswith("_classical")])
    assert len(lines) == 1 + 5 + 5 + 3 + 2 * len(CONDITIONS) + segment_rows   # header + one row per headline file
    assert max(map(len, lines)) <= 200, max(lines, key=len)
    assert lines[0].split() == ["Path", "D_loss", "G_loss", "c2st", "ci_high", "ci_low", "delta", "duplicate_rate",
                                "fid_domain", "kimg", "macro_f1", "pixel_ap", "swd"]
