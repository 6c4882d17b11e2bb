"""Bad input: each case gives a clear message naming the file or key, a non-zero exit where the
run cannot go on, no traceback, and no half-written output (driven through the CLI)."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

from pipeline.cli import app
from pipeline.config import load_params
from pipeline.errors import ParamsError
from test_data_helpers import make_folder_dataset, save, square_mask, write_params

runner = CliRunner()


def _folder_params(tmp_path, root, **folder):
    return write_params(tmp_path / "params.yaml", {
        "source": "folder", "resolution": 16, "strict": folder.pop("strict", True),
        "folder": {"root": str(root), **folder}})


def _run(params_file, out):
    return runner.invoke(app, ["prepare", "--params", str(params_file), "--out", str(out)])


def _fails(result, *needles):
    assert result.exit_code != 0, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    for needle in needles:
        assert needle in result.output, (needle, result.output)


def _no_leftovers(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]


# --------------------------------------------------------------------------- bad files

def _corrupt(path):
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])              # truncated PNG


def _not_image(path):
    path.write_text("this is a text file, not a PNG\n")


def _empty(path):
    path.write_bytes(b"")


@pytest.mark.parametrize("damage, reason", [(_corrupt, "corrupt or truncated"),
                                             (_not_image, "not an image file"),
                                             (_empty, "empty (0 bytes)")])
def test_bad_image_strict_stops_nonstrict_skips(tmp_path, damage, reason):
    root = make_folder_dataset(tmp_path / "src", n_scratch=5)
    bad = root / "scratch" / "s1.png"
    damage(bad)
    out = tmp_path / "out"
    result = _run(_folder_params(tmp_path, root, strict=True), out)
    _fails(result, str(bad), reason, "prepare.strict")
    _no_leftovers(out)

    result = _run(_folder_params(tmp_path, root, strict=False), out)
    assert result.exit_code == 0, result.output
    stats = json.loads((out / "stats.json").read_text())
    assert [(x["path"], x["label"]) for x in stats["skipped"]] == [(str(bad), "scratch")]
    assert reason in stats["skipped"][0]["reason"]
    assert stats["images"]["by_class"]["scratch"]["total"] == 4


def test_mask_of_different_size(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    save(root / "scratch" / "s2_mask.png", square_mask(size=(24, 20)))
    out = tmp_path / "out"
    _fails(_run(_folder_params(tmp_path, root), out), str(root / "scratch" / "s2_mask.png"), "24x20", "20x20")
    _no_leftovers(out)


def test_missing_mask_when_required(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    (root / "scratch" / "s3_mask.png").unlink()
    out = tmp_path / "out"
    _fails(_run(_folder_params(tmp_path, root, masks_required=True), out),
           str(root / "scratch" / "s3.png"), "has no mask", "s3_mask.png", "masks_required")
    _no_leftovers(out)
    # spot/ has no masks at all: every spot image is reported when masks are required (non-strict)
    result = _run(_folder_params(tmp_path, root, masks_required=True, strict=False), out)
    _fails(result, "class 'spot' has no usable images")
    _no_leftovers(out)


def test_empty_class_folder(tmp_path):
    root = make_folder_dataset(tmp_path / "src")
    (root / "crack").mkdir()
    (root / "crack" / "notes.txt").write_text("no images yet")
    out = tmp_path / "out"
    _fails(_run(_folder_params(tmp_path, root, strict=False), out), str(root / "crack"), "is empty")
    _no_leftovers(out)


def test_class_with_fewer_images_than_the_split_needs(tmp_path):
    root = make_folder_dataset(tmp_path / "src", n_spot=2)
    out = tmp_path / "out"
    _fails(_run(_folder_params(tmp_path, root), out), "class 'spot'", "needs at least 3", "prepare.split.val")
    _no_leftovers(out)
    # with a train-only split two images are enough
    params = write_params(tmp_path / "p2.yaml", {"source": "folder", "resolution": 16,
                                                 "split": {"train": 1.0, "val": 0.0, "test": 0.0},
                                                 "folder": {"root": str(root)}})
    assert _run(params, out).exit_code == 0


def test_missing_root_folder(tmp_path):
    out = tmp_path / "out"
    _fails(_run(_folder_params(tmp_path, tmp_path / "nope"), out), "prepare.folder.root", "does not exist")


# --------------------------------------------------------------------------- params

@pytest.mark.parametrize("prepare, needles", [
    ({"source": "kaggle"}, ["prepare.source", "'kaggle'", "allowed values"]),
    ({"resolutoin": 32}, ["unknown params key", "prepare.resolutoin'", "Did you mean", "prepare.resolution'"]),
    ({"synthetic": {"per_clas": 3}}, ["prepare.synthetic.per_clas'", "Did you mean", "prepare.synthetic.per_class'"]),
    ({"resolution": "big"}, ["prepare.resolution", "must be an integer"]),
    ({"resolution": 0}, ["prepare.resolution", "greater than 0"]),
    ({"resolution": -32}, ["prepare.resolution", "greater than 0"]),
    ({"synthetic": {"per_class": 0}}, ["prepare.synthetic.per_class", "greater than 0"]),
    ({"synthetic": {"normal": -1}}, ["prepare.synthetic.normal", "greater than 0"]),
    ({"synthetic": {"paired": -1}}, ["prepare.synthetic.paired", "0 or more"]),
    ({"elpv": {"per_class": -5}}, ["prepare.elpv.per_class"]),
    ({"synthetic": {"classes": ["scrach"]}}, ["prepare.synthetic.classes", "Did you mean 'scratch'"]),
    ({"channels": 4}, ["prepare.channels"]),
    ({"source": "folder"}, ["prepare.folder.root"]),
    ({"split": {"train": 0.5, "val": 0.1, "test": 0.1}}, ["prepare.split", "sum to 1"]),
    ({"folder": {"class_regex": "("}}, ["prepare.folder.class_regex", "regular expression"]),
    ({"folder": {"mask_pattern": "{stm}_mask.png"}}, ["prepare.folder.mask_pattern", "stm"]),
])
def test_bad_params_named_by_key(tmp_path, prepare, needles):
    path = write_params(tmp_path / "params.yaml", prepare)
    with pytest.raises(ParamsError):
        load_params(path)
    out = tmp_path / "out"
    _fails(_run(path, out), *needles)
    _no_leftovers(out)


# --------------------------------------------------------------------------- output folder

def _tiny_synthetic(tmp_path):
    return write_params(tmp_path / "params.yaml", {"resolution": 16, "synthetic": {"per_class": 3, "normal": 3, "paired": 0}})


def test_output_under_a_file_is_not_writable(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    out = blocker / "sub"
    _fails(_run(_tiny_synthetic(tmp_path), out), str(blocker), "is a file")
    assert blocker.read_text() == "x"


def test_output_is_an_existing_file_or_foreign_folder(tmp_path):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    _fails(_run(_tiny_synthetic(tmp_path), f), str(f), "is a file")
    assert f.read_text() == "keep me"
    d = tmp_path / "mystuff"
    d.mkdir()
    (d / "thesis.tex").write_text("keep me")
    _fails(_run(_tiny_synthetic(tmp_path), d), str(d), "refusing to replace")
    assert sorted(os.listdir(d)) == ["thesis.tex"]


def test_failure_keeps_the_previous_good_output(tmp_path):
    out = tmp_path / "out"
    assert _run(_tiny_synthetic(tmp_path), out).exit_code == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    root = make_folder_dataset(tmp_path / "src")
    (root / "spot" / "p0.jpg").write_bytes(b"")
    _fails(_run(_folder_params(tmp_path, root, strict=True), out), "p0.jpg")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    # and a good run replaces it
    assert _run(_folder_params(tmp_path, root, strict=False), out).exit_code == 0
    assert json.loads((out / "classes.json").read_text())["classes"] == ["normal", "scratch", "spot"]


def test_stage_entry_point_runs_the_same_command(tmp_path):
    import subprocess
    import sys

    from pipeline.config import REPO_ROOT

    bad = write_params(tmp_path / "params.yaml", {"resolutoin": 3})
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "prepare.py"), "--params", str(bad),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "prepare.resolutoin" in proc.stderr and "Traceback" not in proc.stderr
    good = write_params(tmp_path / "good.yaml", {"resolution": 16, "synthetic": {"per_class": 3, "normal": 3, "paired": 0}})
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "stages" / "prepare.py"), "--params", str(good),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "out" / "images.parquet").is_file()


def test_prepare_imports_no_torch_and_no_gan_family(tmp_path):
    """`pipeline prepare` validates its params without the families (torch, six GANs): measured in
    a fresh interpreter, as a test process has long imported them."""
    import subprocess
    import sys

    import yaml

    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"prepare": {"resolution": 16, "synthetic": {"per_class": 3, "normal": 3, "paired": 0}},
                                    "train": {"cyclegan": {"base_channels": 8}},
                                    "evaluate": {"metrics": ["swd", "kid_domain"]}}))
    script = ("import sys\nfrom pipeline.cli import app\n"
              f"try:\n    app(['prepare', '--params', {str(good)!r}, '--out', {str(tmp_path / 'out')!r}])\n"
              "except SystemExit as e:\n    assert not e.code, e.code\n"
              "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('pipeline.models')))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]", proc.stdout
    assert (tmp_path / "out" / "images.parquet").is_file()


def test_prepare_into_a_folder_holding_only_a_gitignore_keeps_it(tmp_path):
    """A fresh clone has data/prepared/.gitignore (written by DVC) and nothing else."""
    from pipeline.config import PrepareParams, SyntheticSourceParams
    from pipeline.data.prepare import run_prepare

    out = tmp_path / "prepared"
    out.mkdir()
    (out / ".gitignore").write_text("/images.parquet\n")
    run_prepare(PrepareParams(resolution=16, synthetic=SyntheticSourceParams(per_class=4, normal=8, paired=2)),
                out, quiet=True)
    assert (out / "classes.json").is_file()
    assert (out / ".gitignore").read_text() == "/images.parquet\n"
