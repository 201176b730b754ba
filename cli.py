"""Command line of paczero: `train` a model privately, `eval` a model or a finished run.

    python cli.py train --model smollm2-135m --template instruct --data-dir ../data/sst2 --mode zpl
    python cli.py eval --run-dir runs/sst2-zpl-lora-seed0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
import time
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import data as data_lib
import paczero
from evaluate import LabelWordError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="PACZero: PAC-private zeroth-order fine-tuning of language models.")
console = Console()
error_console = Console(stderr=True)

DEFAULTS = paczero.TrainConfig()
HELP = {f.name: f.metadata["help"] for f in dataclasses.fields(paczero.TrainConfig)}
USER_ERRORS = (paczero.ConfigError, data_lib.DataError, LabelWordError)


def option(name: str):
    return typer.Option(help=HELP[name])


def configure_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=error_console, show_path=False)])
    for noisy in ("transformers", "peft", "datasets", "httpx", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def fail(error: Exception) -> None:
    # soft_wrap keeps the message on one line, because rich otherwise breaks it at the
    # console width (80 columns when stderr is not a terminal).
    error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=2)


def format_number(value, digits: int = 4) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1e-3 and value != 0 else f"{value:.{digits}f}"
    return str(value)


def result_table(result: dict) -> Table:
    table = Table(title=f"{result['task']} / {result['mode']} / {result['tuning']} / {result['model']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    name = result["metric_name"]
    rows = [
        (f"zero-shot test {name}", result["zero_shot_test_metric"]),
        (f"fine-tuned test {name} (dev-best)", result["test_metric"]),
    ]
    if "exact_match" in result["test_metrics"]:
        rows += [("zero-shot test exact match", (result["zero_shot_test_metrics"] or {}).get("exact_match")),
                 ("fine-tuned test exact match", result["test_metrics"]["exact_match"])]
    rows += [
        (f"best dev {name}", result["best_dev_metric"]),
        ("best step", result["best_step"]),
        ("steps run", result["steps_run"]),
        ("unanimous steps", f"{result['unanimous_steps']} ({100 * result['unanimity_rate']:.1f} %)"),
        ("zero-difference rate (g_i = 0)", result["zero_difference_rate"]),
        ("MI spent (nats)", result["mi_spent_nats"]),
        ("MIA success bound", result["mia_bound"]),
        ("matched DP epsilon", result["matched_epsilon"]),
        ("seconds per step", result["seconds_per_step"]),
        ("trainable parameters", f"{result['trainable_params']:,}"),
    ]
    for label, value in rows:
        table.add_row(label, format_number(value))
    return table


@app.command()
def train(
    model: Annotated[str, option("model")] = DEFAULTS.model,
    task: Annotated[str, option("task")] = DEFAULTS.task,
    mode: Annotated[str, option("mode")] = DEFAULTS.mode,
    mi_budget: Annotated[Optional[float], option("mi_budget")] = DEFAULTS.mi_budget,
    directions: Annotated[int, option("directions")] = DEFAULTS.directions,
    batch_size: Annotated[Optional[int], option("batch_size")] = DEFAULTS.batch_size,
    dp_epsilon: Annotated[Optional[float], option("dp_epsilon")] = DEFAULTS.dp_epsilon,
    dp_delta: Annotated[float, option("dp_delta")] = DEFAULTS.dp_delta,
    sampling_rate: Annotated[float, option("sampling_rate")] = DEFAULTS.sampling_rate,
    tuning: Annotated[str, option("tuning")] = DEFAULTS.tuning,
    lora_rank: Annotated[int, option("lora_rank")] = DEFAULTS.lora_rank,
    lora_alpha: Annotated[float, option("lora_alpha")] = DEFAULTS.lora_alpha,
    lora_targets: Annotated[Optional[str], option("lora_targets")] = DEFAULTS.lora_targets,
    lr: Annotated[Optional[float], option("lr")] = DEFAULTS.lr,
    zo_eps: Annotated[float, option("zo_eps")] = DEFAULTS.zo_eps,
    clip: Annotated[Optional[float], option("clip")] = DEFAULTS.clip,
    steps: Annotated[int, option("steps")] = DEFAULTS.steps,
    pool_size: Annotated[int, option("pool_size")] = DEFAULTS.pool_size,
    num_subsets: Annotated[Optional[int], option("num_subsets")] = DEFAULTS.num_subsets,
    dev_size: Annotated[int, option("dev_size")] = DEFAULTS.dev_size,
    test_size: Annotated[int, option("test_size")] = DEFAULTS.test_size,
    eval_every: Annotated[int, option("eval_every")] = DEFAULTS.eval_every,
    seed: Annotated[int, option("seed")] = DEFAULTS.seed,
    secret_seed: Annotated[Optional[int], option("secret_seed")] = DEFAULTS.secret_seed,
    data_seed: Annotated[Optional[int], option("data_seed")] = DEFAULTS.data_seed,
    data_dir: Annotated[Optional[str], option("data_dir")] = DEFAULTS.data_dir,
    output_dir: Annotated[Optional[str], option("output_dir")] = DEFAULTS.output_dir,
    dtype: Annotated[str, option("dtype")] = DEFAULTS.dtype,
    device: Annotated[str, option("device")] = DEFAULTS.device,
    template: Annotated[Optional[str], option("template")] = DEFAULTS.template,
    max_new_tokens: Annotated[int, option("max_new_tokens")] = DEFAULTS.max_new_tokens,
    micro_batch_size: Annotated[int, option("micro_batch_size")] = DEFAULTS.micro_batch_size,
    zero_shot: Annotated[bool, option("zero_shot")] = DEFAULTS.zero_shot,
    verbose: Annotated[bool, typer.Option(help="log debug messages")] = False,
) -> None:
    """Fine-tune a causal LM with PACZero (zpl, mi) or non-private MeZO and write a run folder."""
    configure_logging(verbose)
    options = {k: v for k, v in locals().items() if k in HELP}
    try:
        cfg = paczero.resolve_defaults(paczero.TrainConfig(**options))
    except USER_ERRORS as error:
        fail(error)

    progress = Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
        TextColumn("MI {task.fields[mi]}"), TextColumn("unanimous {task.fields[unanimity]}"),
        TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(), TimeRemainingColumn(),
        console=error_console, transient=False,
    )
    bar = progress.add_task(f"{cfg.mode} steps", total=cfg.steps, mi="-", unanimity="-", loss="-")

    def on_step(record: dict) -> None:
        mi = "n/a" if record["mi_spent"] is None else f"{record['mi_spent']:.4f} nats"
        rate = 100 * record["unanimous_steps"] / record["releases"]
        progress.update(bar, completed=record["steps_run"], mi=mi, unanimity=f"{rate:.0f} %",
                        loss=f"{record['loss']:.4f}")
        if "dev_metric" in record:
            progress.console.log(f"step {record['step'] + 1}: dev {cfg.task} metric {record['dev_metric']:.4f}")

    started = time.perf_counter()
    try:
        with progress:
            result = paczero.train(cfg, on_step=on_step)
    except USER_ERRORS as error:
        fail(error)
    console.print(result_table(result))
    console.print(f"run folder: {cfg.output_dir} (wall time {time.perf_counter() - started:.0f} s)")


@app.command("eval")
def evaluate_command(
    run_dir: Annotated[Optional[str], typer.Option(help="a finished run folder: evaluate its dev-best weights on its test split")] = None,
    model: Annotated[str, option("model")] = DEFAULTS.model,
    task: Annotated[str, option("task")] = DEFAULTS.task,
    template: Annotated[Optional[str], option("template")] = DEFAULTS.template,
    max_new_tokens: Annotated[int, option("max_new_tokens")] = DEFAULTS.max_new_tokens,
    data_dir: Annotated[Optional[str], option("data_dir")] = DEFAULTS.data_dir,
    test_size: Annotated[int, option("test_size")] = DEFAULTS.test_size,
    data_seed: Annotated[int, typer.Option(help="seed of the test-set draw (when the validation split is larger than --test-size)")] = 0,
    dtype: Annotated[str, option("dtype")] = DEFAULTS.dtype,
    device: Annotated[str, option("device")] = DEFAULTS.device,
    micro_batch_size: Annotated[int, option("micro_batch_size")] = DEFAULTS.micro_batch_size,
) -> None:
    """Evaluate a model zero-shot, or a finished run's dev-best weights, on the test split."""
    configure_logging(False)
    try:
        if run_dir is not None:
            config_path = os.path.join(run_dir, "config.json")
            if not os.path.isfile(config_path):
                raise paczero.ConfigError(f"no config.json in {run_dir}; --run-dir must be a folder written by train")
            with open(config_path, encoding="utf-8") as handle:
                cfg = paczero.TrainConfig(**json.load(handle)["options"])
            cfg.device, cfg.micro_batch_size = device, micro_batch_size
            if data_dir is not None:
                cfg.data_dir = data_dir
        else:
            cfg = paczero.TrainConfig(model=model, task=task, template=template, data_dir=data_dir,
                                      max_new_tokens=max_new_tokens,
                                      test_size=test_size, data_seed=data_seed, dtype=dtype, device=device,
                                      micro_batch_size=micro_batch_size)
        outcome = paczero.evaluate_model(cfg, run_dir=run_dir)
    except USER_ERRORS as error:
        fail(error)
    table = Table(title=f"{outcome['task']} test, {outcome['model']}" + (f", run {run_dir}" if run_dir else ", zero-shot"))
    metrics = {k: v for k, v in outcome["metrics"].items() if k != "metric"}
    table.add_column("examples", justify="right")
    for name in metrics:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_column("seconds", justify="right")
    table.add_row(str(outcome["examples"]), *(f"{v:.4f}" for v in metrics.values()), f"{outcome['seconds']:.1f}")
    console.print(table)


if __name__ == "__main__":
    app()
