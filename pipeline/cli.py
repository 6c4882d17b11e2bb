"""`pipeline` command line: parse, load params, call one library function.

Every command turns a `PipelineError` into a one-paragraph message on stderr and a non-zero
exit code, never a traceback. Library imports happen inside commands so `--help` is instant.

Console (pipeline/console.py): each command prints one line when it starts and one when it ends,
with a progress display in between; `pipeline --verbose ...` (or PIPELINE_VERBOSE=1) shows the
libraries' own logs too. Stages run by DVC also write their headline DVC metrics (`--headline`,
`--headline-dir`, pipeline/headline.py) and tag their MLflow runs with lineage (pipeline.tracking).
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path
from typing import Optional

import typer
from typer.core import TyperCommand, TyperGroup

from pipeline import console
from pipeline.errors import PipelineError

PACKAGE = "defect-synth-pipeline"


def families() -> list[str]:
    """The GAN families `train --stage` accepts (pipeline.models.REGISTRY; imports torch)."""
    from pipeline.models import REGISTRY

    return list(REGISTRY)


def sources() -> list[str]:
    """The data sources `prepare.source` accepts (the Literal of PrepareParams.source)."""
    import typing

    from pipeline.config import PrepareParams

    return list(typing.get_args(typing.get_type_hints(PrepareParams)["source"]))


# Help texts may name `{families}` / `{sources}`: filled when help is shown, so the lists come from
# the registry and the params schema, and no command pays the torch import just to start.
_HELP_LISTS = {"{families}": families, "{sources}": sources}


def _fill_help(text: Optional[str]) -> Optional[str]:
    for key, values in _HELP_LISTS.items():
        if text and key in text:
            text = text.replace(key, ", ".join(values()))
    return text


def _plain_flags(params: list) -> list:
    """typer 0.29 shows a type column for every option, `<bool>` after switches too (--help
    included); a switch takes no value, so its type column is left empty."""
    for param in params:
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class _Command(TyperCommand):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))

    def format_help(self, ctx, formatter):
        self.help = _fill_help(self.help)
        for param in self.get_params(ctx):
            param.help = _fill_help(getattr(param, "help", None))
        return super().format_help(ctx, formatter)


class _Group(TyperGroup):
    def get_params(self, ctx):
        return _plain_flags(super().get_params(ctx))


app = typer.Typer(add_completion=False, no_args_is_help=True, cls=_Group,
                  help="Synthetic defect datasets: prepare -> train -> generate -> evaluate -> downstream.")
cluster_app = typer.Typer(no_args_is_help=True, cls=_Group, help="A local multi-node Ray cluster on this machine.")
app.add_typer(cluster_app, name="cluster")
command = functools.partial(app.command, cls=_Command)
cluster_command = functools.partial(cluster_app.command, cls=_Command)

ParamsOpt = typer.Option(Path("params.yaml"), "--params", help="params file to read")
HeadlineOpt = typer.Option(None, "--headline", help="also write the headline DVC metrics (JSON) here")
HeadlineDirOpt = typer.Option(None, "--headline-dir", help="also write the headline DVC metrics into this folder")


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"pipeline {version(PACKAGE)}")
        except PackageNotFoundError:  # a checkout that was never `pip install -e .`-ed
            typer.echo("pipeline (version unknown: the package is not installed; pip install -e .)")
        raise typer.Exit()


@app.callback()
def main_options(verbose: bool = typer.Option(False, "--verbose", "-v",
                                              help="show Ray's, Ray Train's, Ray Data's and MLflow's own logs "
                                                   "(also PIPELINE_VERBOSE=1)"),
                 version: bool = typer.Option(False, "--version", is_eager=True, callback=_print_version,
                                              help="print the package version and exit")):
    """Synthetic defect datasets: prepare -> train -> generate -> evaluate -> downstream."""
    console.setup(verbose)


def _fmt(value, spec: str = ".3g") -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "?"


def _notes_there(notes: list) -> str:
    """`, N note(s) there` for a stage end line: the stage's notes (a model skipped, a metric not
    computable) are in its report, not printed one line each."""
    return f", {len(notes)} note(s) there" if notes else ""


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


@command()
@user_errors
def prepare(params: Path = ParamsOpt,
            out: Path = typer.Option(Path("data/prepared"), help="folder the prepared dataset is written to")):
    """Validate, convert, split and write a ready-to-train dataset (Parquet + stats + preview).

    The data source is `prepare.source` in the params file, one of: {sources}.
    """
    from pipeline.config import load_params
    from pipeline.data.prepare import run_prepare

    cfg = load_params(params, families=False)   # prepare reads no family; they import torch
    with console.stage(console.stage_name("prepare"), f"{cfg.prepare.source} data -> {out}") as st:
        stats = run_prepare(cfg.prepare, out, quiet=True)
        im, pairs = stats["images"], stats["paired"]
        st.summary = (f"{im['total']} images ({', '.join(f'{k} {n}' for k, n in im['by_split'].items())}), "
                      f"{pairs['total']} pairs, {len(stats['classes'])} classes, {stats['resolution']} px")
        if stats.get("skipped_count"):
            st.summary += f"; {stats['skipped_count']} file(s) skipped, reasons in {out / 'stats.json'}"


@command()
@user_errors
def train(stage: str = typer.Option(..., "--stage", help="GAN family to train, one of: {families}"),
          params: Path = ParamsOpt,
          data: Path = typer.Option(Path("data/prepared"), help="prepared dataset folder"),
          out: Optional[Path] = typer.Option(None, help="model output folder (default models/<stage>)"),
          address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS", help="Ray cluster address; local Ray when absent"),
          num_workers: Optional[int] = typer.Option(None, help="number of Ray Train workers (default: params' ray section)"),
          cpus_per_worker: Optional[float] = typer.Option(None, help="CPUs per Ray Train worker"),
          use_gpu: Optional[bool] = typer.Option(None, "--use-gpu/--no-gpu",
                                                 help="one GPU per worker, or none (default: params' ray section)"),
          resume: bool = typer.Option(False, "--resume", help="continue the named run from its last checkpoint"),
          run_name: Optional[str] = typer.Option(None, help="run name (Ray run folder and MLflow run)"),
          dvc_stage: Optional[str] = typer.Option(None, hidden=True, help="DVC stage name (set by dvc.yaml)"),
          headline: Optional[Path] = HeadlineOpt):
    """Train one GAN family on Ray Train, tracked in MLflow.

    Families (--stage): {families}.
    """
    from pipeline.config import load_params
    from pipeline.models import family_class
    from pipeline.training.loop import TrainJob
    from pipeline.training.ray_train import launch_training

    family_class(stage)  # unknown family: clear error before anything starts
    cfg = load_params(params)
    overrides = {k: v for k, v in dict(address=address, num_workers=num_workers,
                                       cpus_per_worker=cpus_per_worker, use_gpu=use_gpu).items() if v is not None}
    out = out or Path("models") / stage
    job = TrainJob.from_params(cfg, stage, data, out)      # the run, validated, built once
    resources = cfg.ray.with_overrides(overrides)
    with console.stage(console.stage_name(f"train {stage}"),
                       f"{stage}, {job.common.kimg:g} kimg on {resources.num_workers} Ray Train worker(s)"
                       + (f", resuming {run_name or 'the newest run'}" if resume else "")) as st:
        summary = launch_training(job, resources, resume=resume, run_name=run_name, dvc_stage=dvc_stage)
        m = summary["metrics"]
        if headline is not None:
            from pipeline.headline import write_train

            write_train(headline, m)
        st.summary = (f"{_fmt(m.get('kimg'), '.2f')} kimg, {_fmt(m.get('img_per_s'), '.0f')} img/s, "
                      f"D {_fmt(m.get('D/loss'))}, G {_fmt(m.get('G/loss'))} -> {out} "
                      f"(run {summary['run_name']}"
                      + (f", MLflow {summary['mlflow_run_id'][:8]}" if summary.get("mlflow_run_id") else "")
                      + f"; Ray: {summary['ray']}, {summary['ray_connect_s']:.1f} s)")


@command()
@user_errors
def generate(params: Path = ParamsOpt,
             model: Optional[str] = typer.Option(None, help="family whose generator to use (default generate.default_model)"),
             models_dir: Path = typer.Option(Path("models"), help="trained models folder"),
             data: Path = typer.Option(Path("data/prepared"), help="prepared dataset folder"),
             out: Optional[Path] = typer.Option(None, help="output folder (default data/synthetic/<model>)"),
             address: Optional[str] = typer.Option(None, envvar="RAY_ADDRESS",
                                                   help="Ray cluster address; local Ray when absent"),
             use_gpu: bool = typer.Option(False, "--use-gpu", help="run the generators on GPUs (one per actor)")):
    """Generate a labelled, masked synthetic defect dataset with Ray Data."""
    from pipeline.config import load_params
    from pipeline.generation.ray_generate import run_generate, shortfall_advice

    cfg = load_params(params)
    name = model or cfg.generate.default_model
    out = out or Path("data/synthetic") / name
    with console.stage(console.stage_name(f"generate {name}"),
                       f"{cfg.generate.per_class} images per class from {models_dir / name}") as st:
        result = run_generate(cfg.generate, name, models_dir / name, data, out, address=address, use_gpu=use_gpu,
                              warn_shortfall=False)
        kept, short = sum(result["counts"].values()), sum(result["shortfall"].values())
        st.summary = (f"{kept} images kept of {result['generated']} generated ({result['dropped']} dropped by the "
                      f"quality filter, {result['rounds']} round(s)), {result['img_per_s']:.3g} img/s -> {out} "
                      f"(Ray: {result['ray']}, {result['ray_connect_s']:.1f} s)")
        if short:
            st.summary += f"; {short} short of generate.per_class={cfg.generate.per_class}: {shortfall_advice()}"


@command()
@user_errors
def evaluate(params: Path = ParamsOpt,
             data: Path = typer.Option(Path("data/prepared"), help="prepared (real) dataset folder"),
             synthetic: Path = typer.Option(Path("data/synthetic"), help="folder of synthetic sets, one per model"),
             out: Path = typer.Option(Path("reports/evaluate"), help="folder for the metrics table and report"),
             headline_dir: Optional[Path] = HeadlineDirOpt):
    """Offline metrics (SWD, domain KID/FID, MMD, diversity, placement) per model and class."""
    from pipeline import tracking
    from pipeline.config import load_params
    from pipeline.metrics.evaluate import run_evaluate

    cfg = load_params(params)
    models = cfg.generate.models
    with console.stage(console.stage_name("evaluate"), f"{len(models)} synthetic set(s) in {synthetic}") as st, \
            tracking.stage_tags(tracking.lineage_for_synthetic(synthetic, models)):
        metrics = run_evaluate(cfg.evaluate, data, synthetic, out, models=models)
        if headline_dir is not None:
            from pipeline.headline import write_evaluate

            write_evaluate(headline_dir, metrics)
        st.summary = f"{len(metrics['models'])} model(s) scored -> {out / 'table.md'}" + _notes_there(metrics["notes"])


@command()
@user_errors
def downstream(params: Path = ParamsOpt,
               data: Path = typer.Option(Path("data/prepared"), help="prepared (real) dataset folder"),
               synthetic: Path = typer.Option(Path("data/synthetic"), help="folder of synthetic sets, one per model"),
               out: Path = typer.Option(Path("reports"), help="folder for the summary and per-run results"),
               headline_dir: Optional[Path] = HeadlineDirOpt,
               plot_data: Optional[Path] = typer.Option(None, "--plot-data",
                                                         help="also write scores vs shots as a TSV (DVC plot) here")):
    """Train a defect classifier on real / +classical / +copy-paste / +synthetic and compare (paired CIs)."""
    from pipeline import headline as hl
    from pipeline import tracking
    from pipeline.config import load_params
    from pipeline.downstream.run import run_downstream

    cfg = load_params(params)
    models = cfg.generate.models
    with console.stage(console.stage_name("downstream"), f"defect classifiers with and without {len(models)} "
                                                           "synthetic set(s)") as st, \
            tracking.stage_tags(tracking.lineage_for_synthetic(synthetic, models)):
        flat = run_downstream(cfg.downstream, data, synthetic, out, models=models)
        if headline_dir is not None:
            hl.write_downstream(headline_dir, flat)
        if plot_data is not None:
            hl.write_scores_vs_shots(plot_data, flat, models)
        import json

        notes = json.loads((out / "downstream_runs.json").read_text()).get("notes", [])
        st.summary = f"-> {out / 'summary.md'}" + _notes_there(notes)


@command()
@user_errors
def ui(port: int = typer.Option(5000, help="port to serve the UI on"),
       host: str = typer.Option("127.0.0.1", help="bind address; keep loopback unless behind an auth proxy"),
       verbose: bool = typer.Option(False, "--verbose", "-v",
                                    help="also show the server's access log and warnings (as `pipeline -v ui`)")):
    """Start the MLflow UI against the pipeline's tracking store; prints one line with its URL."""
    from pipeline.tracking import serve_ui

    serve_ui(host=host, port=port, verbose=verbose or console.verbose())


@cluster_command("up")
@user_errors
def cluster_up(nodes: int = typer.Option(2, help="head + workers"),
               cpus_per_node: float = typer.Option(1, help="CPUs each node offers"),
               object_store_mb: int = typer.Option(512, help="object store per node (MiB)")):
    """Start a head and worker Ray nodes on this machine."""
    from pipeline.cluster import cluster_up as up

    up(nodes=nodes, cpus_per_node=cpus_per_node, object_store_mb=object_store_mb)


@cluster_command("down")
@user_errors
def cluster_down():
    """Stop the nodes `cluster up` started (by PID, nothing else)."""
    from pipeline.cluster import cluster_down as down

    down()


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
