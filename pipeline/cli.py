"""`pipeline` command line: parse, load params, call one library function.

Every command turns a `PipelineError` into a one-paragraph message on stderr and a non-zero
exit code, never a traceback. Library imports happen inside commands so `--help` is instant.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer

from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Synthetic defect datasets: prepare -> train -> generate -> evaluate -> downstream.")
cluster_app = typer.Typer(no_args_is_help=True, help="A local multi-node Ray cluster on this machine.")
app.add_typer(cluster_app, name="cluster")

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file to read")


def user_errors(fn):
    """Print PipelineErrors as a clear message and exit non-zero (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except PipelineError as err:
            typer.secho(f"error: {err}", fg=typer.colors.RED, err=True)
            raise typer.Exit(err.exit_code) from None
        except KeyboardInterrupt:
            typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
            raise typer.Exit(130) from None

    return wrapper


@app.command()
@user_errors
def prepare(params: Path = ParamsOpt,
            out: Path = typer.Option(Path("data/prepared"), help="output folder")):
    """Validate, convert, split and write a ready-to-train dataset (Parquet + stats + preview)."""
    from pipeline.config import load_params
    from pipeline.data.prepare import run_prepare

    run_prepare(load_params(params).prepare, out)


@app.command()
@user_errors
def train(stage: str = typer.Option(..., "--stage", help="GAN family to train"),
          params: Path = ParamsOpt,
          data: Path = typer.Option(Path("data/prepared"), help="prepared dataset folder"),
          out: Optional[Path] = typer.Option(None, help="model output folder (default models/<stage>)"),
          address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; local Ray when absent"),
          num_workers: Optional[int] = typer.Option(None, help="Ray Train workers"),
          cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per worker"),
          use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--no-gpu", help="one GPU per worker"),
          resume: bool = typer.Option(False, "--resume", help="continue the named run from its last checkpoint"),
          run_name: Optional[str] = typer.Option(None, help="run name (Ray run folder and MLflow run)"),
          dvc_stage: Optional[str] = typer.Option(None, hidden=True, help="set by dvc.yaml")):
    """Train one GAN family on Ray Train, tracked in MLflow."""
    from pipeline.config import load_params
    from pipeline.models import family_class
    from pipeline.training.ray_train import launch_training

    family_class(stage)  # unknown family: clear error before anything starts
    cfg = load_params(params)
    overrides = {k: v for k, v in dict(address=address, num_workers=num_workers,
                                       cpus_per_worker=cpus_per_worker, use_gpu=use_gpu).items() if v is not None}
    launch_training(cfg, stage, data_dir=data, out_dir=out or Path("models") / stage,
                    ray_overrides=overrides, resume=resume, run_name=run_name, dvc_stage=dvc_stage)


@app.command()
@user_errors
def generate(params: Path = ParamsOpt,
             model: Optional[str] = typer.Option(None, help="family whose generator to use (default generate.model)"),
             models_dir: Path = typer.Option(Path("models"), help="trained models folder"),
             data: Path = typer.Option(Path("data/prepared"), help="prepared dataset folder"),
             out: Optional[Path] = typer.Option(None, help="output folder (default data/synthetic/<model>)"),
             address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS"),
             use_gpu: bool = typer.Option(False, "--use-gpu")):
    """Generate a labelled, masked synthetic defect dataset with Ray Data."""
    from pipeline.config import load_params
    from pipeline.generation.ray_generate import run_generate

    cfg = load_params(params)
    name = model or cfg.generate.model
    run_generate(cfg.generate, name, models_dir / name, data, out or Path("data/synthetic") / name,
                 address=address, use_gpu=use_gpu)


@app.command()
@user_errors
def evaluate(params: Path = ParamsOpt,
             data: Path = typer.Option(Path("data/prepared")),
             synthetic: Path = typer.Option(Path("data/synthetic")),
             out: Path = typer.Option(Path("reports/evaluate"))):
    """Offline metrics (SWD, domain KID/FID, MMD, diversity, placement) per model and class."""
    from pipeline.config import load_params
    from pipeline.metrics.evaluate import run_evaluate

    cfg = load_params(params)
    run_evaluate(cfg.evaluate, data, synthetic, out, models=cfg.generate.models)


@app.command()
@user_errors
def downstream(params: Path = ParamsOpt,
               data: Path = typer.Option(Path("data/prepared")),
               synthetic: Path = typer.Option(Path("data/synthetic")),
               out: Path = typer.Option(Path("reports"))):
    """Train a defect classifier on real / real+augmentation / real+synthetic and compare."""
    from pipeline.config import load_params
    from pipeline.downstream.run import run_downstream

    cfg = load_params(params)
    run_downstream(cfg.downstream, cfg.prepare.augment, data, synthetic, out, models=cfg.generate.models)


@app.command()
@user_errors
def ui(port: int = typer.Option(5000, help="port on 127.0.0.1"),
       host: str = typer.Option("127.0.0.1", help="bind address; keep loopback unless behind an auth proxy")):
    """Start the MLflow UI against the pipeline's tracking store."""
    from pipeline.tracking import serve_ui

    serve_ui(host=host, port=port)


@cluster_app.command("up")
@user_errors
def cluster_up(nodes: int = typer.Option(2, help="head + workers"),
               cpus_per_node: float = typer.Option(1, help="CPUs each node offers"),
               object_store_mb: int = typer.Option(512, help="object store per node (MiB)")):
    """Start a head and worker Ray nodes on this machine."""
    from pipeline.cluster import cluster_up as up

    up(nodes=nodes, cpus_per_node=cpus_per_node, object_store_mb=object_store_mb)


@cluster_app.command("down")
@user_errors
def cluster_down():
    """Stop the nodes `cluster up` started (by PID, nothing else)."""
    from pipeline.cluster import cluster_down as down

    down()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
