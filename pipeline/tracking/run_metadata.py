"""What a run is named and tagged with: MLflow-safe keys, flattened params, the git commit, the
`dvc repro` id that groups one repro's runs, and the tag names lineage is traced by."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

from pipeline.config import REPO_ROOT
from pipeline.tracking.store import EXPERIMENT_PREFIX
from pipeline.validation import flatten

LAUNCH_TAG = "pipeline.launch_id"  # one per driver invocation: a retry before any checkpoint finds its run
REPRO_TAG = "pipeline.repro_id"    # the same on every run of one `dvc repro`
REPRO_ENV = "PIPELINE_REPRO_ID"
GENERATOR_SHA_TAG = "pipeline.generator_sha256"
MODEL_VERSION_TAG = "pipeline.model_version"
MANIFEST_SHA_TAG = "pipeline.manifest_sha256"
NOTE_TAG = "mlflow.note.content"   # the run's "Description" in the UI (markdown)

# Tags shown in descriptions, in this order; plus every `lineage.*` tag. The model-version page shows
# only some of its tags and the run page folds them away, so lineage is written out in the text too.
_NOTE_KEYS = (REPRO_TAG, "train_run_id", MODEL_VERSION_TAG, GENERATOR_SHA_TAG, MANIFEST_SHA_TAG,
              "dataset_hash", "git_commit", "dvc_stage", "dvc_experiment")

_BAD_NAME_CHARS = re.compile(r"[^/\w.\- :]")


def sanitize_name(name: str) -> str:
    """A valid MLflow metric/param key: allowed are alphanumerics, _ - . space : and /.

    `D/loss` stays `D/loss`; other characters become `_`; path-like forms MLflow rejects
    (`a//b`, leading `/`, `..`) are normalised.
    """
    name = _BAD_NAME_CHARS.sub("_", str(name))
    parts = [p for p in name.split("/") if p not in ("", ".")]
    parts = ["_" if p == ".." else p for p in parts]
    return "/".join(parts)[:250] or "_"


def flat_params(config: dict) -> dict[str, str]:
    """Flattened config as MLflow params (string values, MLflow length limit)."""
    return {sanitize_name(k): str(v)[:6000] for k, v in flatten(config).items()}


def git_commit(repo: Path = REPO_ROOT) -> str | None:
    """HEAD of the repo, with a `-dirty` suffix when tracked files changed; None without git."""
    try:
        head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
        return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def repro_id() -> str | None:
    """One id per `dvc repro` / `dvc exp run`, the same in all of its stages: PIPELINE_REPRO_ID when
    set, else (inside a DVC stage, DVC_STAGE set) the start time and pid of the `dvc` process that
    runs the stage; None outside DVC."""
    explicit = os.environ.get(REPRO_ENV, "").strip()
    if explicit:
        return explicit
    if not os.environ.get("DVC_STAGE"):
        return None
    try:
        import psutil

        for proc in psutil.Process().parents():
            cmd = proc.cmdline()
            if any(Path(a).name == "dvc" for a in cmd[:2]) or cmd[1:3] == ["-m", "dvc"]:
                return f"dvc-{time.strftime('%Y%m%d-%H%M%S', time.localtime(proc.create_time()))}-{proc.pid}"
    except Exception:  # noqa: BLE001 - no id is better than a failed stage
        return None
    return None


def run_context_tags() -> dict[str, str]:
    """Tags every run gets: repro id, DVC stage and experiment name, git commit (those known)."""
    tags = {REPRO_TAG: repro_id(), "dvc_stage": os.environ.get("DVC_STAGE"),
            "dvc_experiment": os.environ.get("DVC_EXP_NAME")}
    commit = git_commit()
    if commit:
        tags.update({"git_commit": commit, "mlflow.source.git.commit": commit.removesuffix("-dirty")})
    return {k: v for k, v in tags.items() if v}


def default_model_name(family: str) -> str:
    return f"{EXPERIMENT_PREFIX}-{family}"


def lineage_note(title: str, tags: dict[str, str]) -> str:
    """Markdown for a run's or a model version's description: `title`, then one line per lineage tag
    present (`key`: value), keys spelled as in tag searches (`tags.pipeline.repro_id = '...'`)."""
    keys = [k for k in _NOTE_KEYS if tags.get(k)] + sorted(k for k in tags if k.startswith("lineage.") and tags[k])
    lines = [title, ""] + [f"- `{k}`: {tags[k]}" for k in keys]
    return "\n".join(lines).strip() + "\n"
