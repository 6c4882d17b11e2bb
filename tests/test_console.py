"""pipeline.console: where progress goes (live / plain / off), plain periodic lines with a correct ETA,
stage lines, one-line package warnings, verbosity through the environment, and the CLI printing
exactly two lines of its own for a stage."""

from __future__ import annotations

import json
import re
import warnings

import pytest

from pipeline import console


class FakeClock:
    """Stands in for the `time` module inside pipeline.console."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self):
        return self.now

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = FakeClock()
    monkeypatch.setattr(console, "time", fake)
    return fake


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    for key in ("DVC_STAGE", console.PROGRESS_ENV, console.INTERVAL_ENV, console.VERBOSE_ENV, "TERM"):
        monkeypatch.delenv(key, raising=False)


def test_progress_mode_follows_dvc_terminal_and_override(monkeypatch):
    assert console.progress_mode() == "plain"          # pytest captures stderr: not a terminal
    monkeypatch.setattr(console.sys.stderr, "isatty", lambda: True, raising=False)
    assert console.progress_mode() == "live"
    monkeypatch.setenv("DVC_STAGE", "train@cyclegan")   # dvc repro from a terminal: still no redraws
    assert console.progress_mode() == "plain"
    monkeypatch.delenv("DVC_STAGE")
    monkeypatch.setenv("TERM", "dumb")
    assert console.progress_mode() == "plain"
    monkeypatch.setenv(console.PROGRESS_ENV, "off")
    assert console.progress_mode() == "off"


def test_plain_progress_prints_a_line_per_interval_with_eta(clock, monkeypatch, capsys):
    monkeypatch.setenv(console.INTERVAL_ENV, "10")
    with console.progress("train cyclegan", total=0.6, unit="kimg", precision=2) as bar:
        bar.update(completed=0.1, note="first tick")      # t = 0: the rate starts here, no line yet
        clock.now += 4
        bar.update(completed=0.2)                          # 4 s < 10 s: still no line
        clock.now += 6
        bar.update(completed=0.3, note="95 img/s · D 0.41 · G 2.1")
        clock.now += 3
        bar.update(completed=0.4)                          # 3 s after the last line: nothing
    lines = capsys.readouterr().err.splitlines()
    # 0.2 kimg in 10 s since the first update -> 0.3 kimg left take 15 s.
    assert lines == ["  train cyclegan: 0.30/0.60 kimg (50%), ETA 15 s, 95 img/s · D 0.41 · G 2.1"]


def test_off_mode_prints_nothing(monkeypatch, clock, capsys):
    monkeypatch.setenv(console.PROGRESS_ENV, "off")
    monkeypatch.setenv(console.INTERVAL_ENV, "1")
    with console.progress("generate", total=10, unit="kept") as bar:
        for i in range(10):
            clock.now += 5
            bar.advance(1)
    assert bar.completed == 10 and capsys.readouterr().err == ""


def test_eta_and_counts_formats():
    assert [console.format_eta(s) for s in (None, float("nan"), -1, 4.4, 125, 3700)] == \
        ["?", "?", "?", "4 s", "2 min 05 s", "1 h 01 min"]
    bar = console.Progress("evaluate", total=None, unit="model", precision=0, mode="plain")
    bar.update(completed=3)
    assert bar.counts() == "3 model" and bar.line() == "  evaluate: 3 model" and bar.eta_s() is None


def test_live_progress_nests_on_one_display(monkeypatch):
    monkeypatch.setenv(console.PROGRESS_ENV, "live")
    with console.progress("outer", total=2, unit="model") as outer:
        first = console._live
        with console.progress("inner", total=5, unit="step") as inner:
            assert console._live is first and len(first.tasks) == 2   # one display, a row each
            inner.update(completed=5, note="done")
            task = next(t for t in first.tasks if t.description == "inner")
            assert task.completed == 5 and task.fields["counts"] == "5/5 step"
        outer.advance(1)
        assert [t.description for t in first.tasks] == ["outer"]
    assert console._live is None


def test_stage_lines(clock, capsys):
    with console.stage("train@cyclegan", "cyclegan, 0.6 kimg") as st:
        clock.now += 12.34
        st.summary = "0.60 kimg, 95 img/s"
    with pytest.raises(ValueError):
        with console.stage("evaluate"):
            clock.now += 1
            raise ValueError("boom")
    assert capsys.readouterr().err.splitlines() == [
        "▶ train@cyclegan  cyclegan, 0.6 kimg", "✓ train@cyclegan  0.60 kimg, 95 img/s (12.3 s)",
        "▶ evaluate", "✗ evaluate  failed after 1.0 s"]


def test_stage_name_is_dvcs_when_dvc_runs_us(monkeypatch):
    assert console.stage_name("train cyclegan") == "train cyclegan"
    monkeypatch.setenv("DVC_STAGE", "train@cyclegan")
    assert console.stage_name("train cyclegan") == "train@cyclegan"


def test_package_warnings_print_as_one_line(monkeypatch, capsys):
    from pipeline.tracking import TrackingWarning

    monkeypatch.setattr(warnings, "showwarning", warnings.showwarning)   # restored after the test
    console.setup(False)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn("tracking: the store is down", TrackingWarning)
        warnings.warn("something else", DeprecationWarning)
    err = capsys.readouterr().err
    assert "warning: tracking: the store is down\n" in err
    assert "something else" not in err          # other warnings go on to the previous handler (pytest's here)


def test_verbosity_through_the_environment(monkeypatch):
    assert not console.verbose() and console.quiet_env()["MLFLOW_LOGGING_LEVEL"] == "ERROR"
    console.setup(True)
    assert console.verbose() and console.quiet_env() == {}
    console.setup(False)                                 # no --verbose: PIPELINE_VERBOSE=1 still wins
    assert console.verbose()
    monkeypatch.setenv(console.VERBOSE_ENV, "0")
    console.setup(False)
    assert not console.verbose()


def test_cli_prints_two_lines_for_a_stage(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from pipeline.cli import app

    params = tmp_path / "params.yaml"
    params.write_text("prepare: {resolution: 16, synthetic: {classes: [scratch], per_class: 4, normal: 4, paired: 2}}\n")
    monkeypatch.setenv("DVC_STAGE", "prepare")
    res = CliRunner().invoke(app, ["prepare", "--params", str(params), "--out", str(tmp_path / "prepared")])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    assert len(lines) == 2, lines
    assert lines[0] == f"▶ prepare  synthetic data -> {tmp_path / 'prepared'}"
    assert lines[1].startswith("✓ prepare  8 images (train ") and "2 pairs, 2 classes, 16 px" in lines[1]


# --------------------------------------------------------------------------- the evaluate and downstream stages

@pytest.fixture
def fake_tracking(monkeypatch):
    """The stages log into this list, never into a real MLflow store."""
    import sys
    import types

    calls = []
    fake = types.ModuleType("pipeline.tracking")
    fake.log_evaluation = lambda metrics, artifacts: calls.append("evaluation")
    fake.log_downstream = lambda metrics, artifacts: calls.append("downstream")
    monkeypatch.setitem(sys.modules, "pipeline.tracking", fake)
    return calls


def _stage_output(capfd, caplog, name: str) -> tuple[list[str], list[str]]:
    """(the stage's stderr lines between its ▶ and ✓ lines, its stdout) after asserting the two
    lines frame it and no package logger warned."""
    out, err = capfd.readouterr()
    lines = err.splitlines()
    assert lines[0] == f"▶ {name}" and lines[-1].startswith(f"✓ {name}  "), lines
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == []
    return lines[1:-1], out.splitlines()


def test_evaluate_stage_prints_its_two_lines_and_plain_progress_only(tmp_path, monkeypatch, capfd, caplog,
                                                                     fake_tracking):
    from pipeline.config import EvaluateParams
    from pipeline.metrics.evaluate import run_evaluate
    from tests.test_downstream import make_prepared, make_synthetic

    monkeypatch.setenv("DVC_STAGE", "evaluate")                # as under dvc repro: not a terminal
    monkeypatch.setenv(console.INTERVAL_ENV, "1e-9")           # a plain line at every update
    prepared = make_prepared(tmp_path / "prepared")
    syn = tmp_path / "syn"
    make_synthetic(syn, "stargan", ["scratch", "spot"])
    make_synthetic(syn, "cyclegan", ["defect"], seed=2)       # no regions: mask_in_region gets a note
    params = EvaluateParams(metrics=["swd", "kid_domain", "fid_domain", "mask_in_region"], feature_epochs=1,
                            feature_min_steps=5, kid_subsets=5, swd_projections=16, swd_patches_per_image=8,
                            reference_rows=False)         # the two models' lines only (no noise, real_vs_real)
    with console.stage(console.stage_name("x")):
        metrics = run_evaluate(params, prepared, syn, tmp_path / "out", ["stargan", "cyclegan"])
    assert metrics["notes"] and fake_tracking == ["evaluation"]
    between, stdout = _stage_output(capfd, caplog, "evaluate")
    assert stdout == []
    net_lines = [ln for ln in between if ln.startswith("  domain feature network: ")]
    model_lines = [ln for ln in between if ln.startswith("  evaluate models: ")]
    assert net_lines and net_lines[-1].startswith(f"  domain feature network: {len(net_lines)}/")
    assert model_lines == ["  evaluate models: 1/2 model (50%), ETA ?, stargan",
                           "  evaluate models: 2/2 model (100%), ETA 0 s, cyclegan"]
    assert len(net_lines) + len(model_lines) == len(between), between      # nothing else


def test_downstream_stage_prints_its_two_lines_and_plain_progress_only(tmp_path, monkeypatch, capfd, caplog,
                                                                       fake_tracking):
    from pipeline.config import DownstreamParams
    from pipeline.downstream.run import run_downstream
    from tests.test_downstream import TINY, make_prepared, make_synthetic

    monkeypatch.setenv("DVC_STAGE", "downstream")
    monkeypatch.setenv(console.INTERVAL_ENV, "1e-9")
    prepared = make_prepared(tmp_path / "prepared", {"train": 4, "val": 2, "test": 2})
    syn = tmp_path / "syn"
    make_synthetic(syn, "cyclegan", ["defect"])        # labelled only "defect": skipped with a note, no line
    params = DownstreamParams(**{**TINY, "shots": [2], "seeds": [0], "max_steps": 10})
    with console.stage(console.stage_name("x")):
        run_downstream(params, prepared, syn, tmp_path / "out", ["cyclegan"])
    between, stdout = _stage_output(capfd, caplog, "downstream")
    assert stdout == [] and fake_tracking == ["downstream"]
    runs = json.loads((tmp_path / "out" / "downstream_runs.json").read_text())
    assert any("cyclegan" in n for n in runs["notes"])
    total = len(runs["runs"])                          # classifiers, segmenters, CAS of real
    assert len(between) == total, between              # one plain line per model done, nothing else
    for i, line in enumerate(between, start=1):
        assert re.fullmatch(rf"  downstream classifiers and segmenters: {i}/{total} model \({100 * i / total:.0f}%\), "
                            r"ETA (\?|\d+ s|\d+ min \d\d s)", line), line
