"""Command line of paczero: `train` a model privately, `eval` a model or a finished run.

    python cli.py train --model smollm2-135m --template instruct --data-dir ../data/sst2 --mode zpl
    python cli.py eval --run-dir runs/sst2-zpl-lora-seed0
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
import types
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

import audit as audit_lib
import bench as bench_lib
import plots as plots_lib
import data as data_lib
import mechanisms
import paczero
import reproduce as reproduce_lib
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


def fail(error: Exception, code: int = 2) -> None:
    # soft_wrap keeps the message on one line, because rich otherwise breaks it at the
    # console width (80 columns when stderr is not a terminal).
    error_console.print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
    raise typer.Exit(code=code)


# Options that only some runs read, with the runs that read them. One of these given on the
# command line of a run that does not read it would otherwise be dropped without a word.
# (--mi-budget, --dp-epsilon, --batch-size, --data, and --clip with mezo, are stricter:
# TrainConfig refuses them.)
_DP_MODES = ("dpzero", "dpaggzo")
OPTION_SCOPE = {
    "lora_rank": (lambda c: c.tuning == "lora", "--tuning lora"),
    "lora_alpha": (lambda c: c.tuning == "lora", "--tuning lora"),
    "lora_targets": (lambda c: c.tuning == "lora", "--tuning lora"),
    "dp_delta": (lambda c: c.mode in _DP_MODES, "--mode dpzero or dpaggzo"),
    "sampling_rate": (lambda c: c.mode in _DP_MODES, "--mode dpzero or dpaggzo"),
    "clip": (lambda c: c.mode != "random_sign", "every mode but random_sign and mezo"),
    "data_dir": (lambda c: c.task in ("sst2", "squad"), "--task sst2 or squad"),
    "label_words": (lambda c: c.task == "classification", "--task classification"),
    "text_column": (lambda c: c.task == "classification", "--task classification"),
    "label_column": (lambda c: c.task == "classification", "--task classification"),
    "prompt_column": (lambda c: c.task == "generation", "--task generation"),
    "answers_column": (lambda c: c.task == "generation", "--task generation"),
    "max_new_tokens": (lambda c: c.task in ("squad", "generation"), "--task squad or generation"),
}


def given_options(ctx: typer.Context, names) -> set[str]:
    """Return the options among `names` that were typed on the command line, not left at their default."""
    return {name for name in names if ctx.get_parameter_source(name).name == "COMMANDLINE"}


def warn_unused_options(cfg, given: set[str]) -> None:
    """Warn about each typed option that `cfg` (anything with task, tuning and mode) does not read."""
    for name in sorted(given & OPTION_SCOPE.keys()):
        applies, scope = OPTION_SCOPE[name]
        if not applies(cfg):
            error_console.print(f"[yellow]warning:[/] --{name.replace('_', '-')} has no effect here "
                                f"(it applies to {scope}); ignored", highlight=False, soft_wrap=True)


# Options a resumed run may change: neither privacy nor the trajectory depends on them.
RESUMABLE_OPTIONS = {"save_every", "eval_every"}


def resumed_options(run_dir: str, options: dict, given: set[str]) -> dict:
    """Return the saved options of the run in `run_dir`, after checking what the command line changes."""
    config_path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(config_path):
        raise paczero.ConfigError(f"no config.json in {run_dir}; --resume needs a folder written by train")
    try:
        with open(config_path, encoding="utf-8") as handle:
            saved = json.load(handle)["options"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise paczero.ConfigError(f"{config_path} is not a run configuration written by train ({error})") from error
    if "output_dir" in given and os.path.normpath(options["output_dir"]) != os.path.normpath(run_dir):
        raise paczero.ConfigError(f"--output-dir {options['output_dir']} differs from --resume {run_dir}; "
                                  "a resumed run writes into its own folder, so drop --output-dir")
    for name in sorted(given - {"output_dir"}):
        if name not in RESUMABLE_OPTIONS and options[name] != saved.get(name):
            flag = "--" + name.replace("_", "-")
            raise paczero.ConfigError(
                f"{flag} {options[name]} differs from the run's {saved.get(name)}: a resumed run keeps every "
                f"option that affects privacy or the trajectory; drop {flag} or start a new run"
            )
    return {**saved, **{name: options[name] for name in given & RESUMABLE_OPTIONS}, "output_dir": run_dir}


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
        ("MIA success bound (membership in S*, prior 1/2)", result["mia_bound"]),
        ("MIA-matched epsilon (same bound as eps-DP; not a DP guarantee)", result["matched_epsilon"]),
        ("seconds per step", result["seconds_per_step"]),
        ("trainable parameters", f"{result['trainable_params']:,}"),
    ]
    for label, value in rows:
        table.add_row(label, format_number(value))
    return table


@app.command()
def train(
    ctx: typer.Context,
    model: Annotated[str, option("model")] = DEFAULTS.model,
    task: Annotated[str, option("task")] = DEFAULTS.task,
    data: Annotated[Optional[str], option("data")] = DEFAULTS.data,
    label_words: Annotated[Optional[str], option("label_words")] = DEFAULTS.label_words,
    text_column: Annotated[str, option("text_column")] = DEFAULTS.text_column,
    label_column: Annotated[str, option("label_column")] = DEFAULTS.label_column,
    prompt_column: Annotated[str, option("prompt_column")] = DEFAULTS.prompt_column,
    answers_column: Annotated[str, option("answers_column")] = DEFAULTS.answers_column,
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
    device_map: Annotated[Optional[str], option("device_map")] = DEFAULTS.device_map,
    template: Annotated[Optional[str], option("template")] = DEFAULTS.template,
    max_new_tokens: Annotated[int, option("max_new_tokens")] = DEFAULTS.max_new_tokens,
    micro_batch_size: Annotated[Optional[int], option("micro_batch_size")] = DEFAULTS.micro_batch_size,
    zero_shot: Annotated[bool, option("zero_shot")] = DEFAULTS.zero_shot,
    save_every: Annotated[int, option("save_every")] = DEFAULTS.save_every,
    resume: Annotated[Optional[str], typer.Option(help="continue the unfinished run in this folder from its last checkpoint, with its saved options")] = None,
    verbose: Annotated[bool, typer.Option(help="log debug messages")] = False,
) -> None:
    """Fine-tune a causal LM with PACZero (zpl, mi) or a baseline and write a run folder.

    Under `torchrun --nproc-per-node K` the pool's forward passes are split over K
    processes; the run is the same as with one process and only rank 0 prints and writes.
    """
    if int(os.environ.get("RANK", "0")) != 0:
        console.quiet = error_console.quiet = True
    configure_logging(verbose)
    options = {k: v for k, v in locals().items() if k in HELP}
    try:
        typed = given_options(ctx, options)
        if resume is not None:
            options = resumed_options(resume, options, typed)
        cfg = paczero.resolve_defaults(paczero.TrainConfig(**options))
        warn_unused_options(cfg, typed)
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
        # The bar starts with the first step, so that errors found while loading the data
        # and the model print alone.
        if not progress.live.is_started:
            progress.start()
        mi = "n/a" if record["mi_spent"] is None else f"{record['mi_spent']:.4f} nats"
        rate = 100 * record["unanimous_steps"] / record["releases"]
        loss = "-" if record["loss"] is None else f"{record['loss']:.4f}"
        progress.update(bar, completed=record["steps_run"], mi=mi, unanimity=f"{rate:.0f} %", loss=loss)
        if "dev_metric" in record:
            progress.console.log(f"step {record['step'] + 1}: dev {cfg.task} metric {record['dev_metric']:.4f}")

    started = time.perf_counter()
    try:
        try:
            result = paczero.train(cfg, on_step=on_step, resume=resume is not None)
        except KeyboardInterrupt:
            error_console.print(f"interrupted; continue from the last checkpoint with: python cli.py train --resume {cfg.output_dir}")
            raise typer.Exit(code=130)
        finally:
            if progress.live.is_started:
                progress.stop()
    except USER_ERRORS as error:
        fail(error)
    except paczero.TrainingError as error:
        fail(error, code=1)
    console.print(result_table(result))
    console.print(f"run folder: {cfg.output_dir} (wall time {time.perf_counter() - started:.0f} s)")


# Options that `eval --run-dir` may change in a saved run: where and how it runs, not what it measures.
EVAL_RUN_OPTIONS = {"run_dir", "data_dir", "dtype", "device", "micro_batch_size"}


@app.command("eval")
def evaluate_command(
    ctx: typer.Context,
    run_dir: Annotated[Optional[str], typer.Option(help="a finished run folder: evaluate its dev-best weights on its test split")] = None,
    model: Annotated[str, option("model")] = DEFAULTS.model,
    task: Annotated[str, option("task")] = DEFAULTS.task,
    template: Annotated[Optional[str], option("template")] = DEFAULTS.template,
    max_new_tokens: Annotated[int, option("max_new_tokens")] = DEFAULTS.max_new_tokens,
    data_dir: Annotated[Optional[str], option("data_dir")] = DEFAULTS.data_dir,
    data: Annotated[Optional[str], option("data")] = DEFAULTS.data,
    label_words: Annotated[Optional[str], option("label_words")] = DEFAULTS.label_words,
    text_column: Annotated[str, option("text_column")] = DEFAULTS.text_column,
    label_column: Annotated[str, option("label_column")] = DEFAULTS.label_column,
    prompt_column: Annotated[str, option("prompt_column")] = DEFAULTS.prompt_column,
    answers_column: Annotated[str, option("answers_column")] = DEFAULTS.answers_column,
    test_size: Annotated[int, option("test_size")] = DEFAULTS.test_size,
    data_seed: Annotated[int, typer.Option(help="seed of the test-set draw (when the validation split is larger than --test-size)")] = 0,
    dtype: Annotated[str, option("dtype")] = DEFAULTS.dtype,
    device: Annotated[str, option("device")] = DEFAULTS.device,
    micro_batch_size: Annotated[Optional[int], option("micro_batch_size")] = DEFAULTS.micro_batch_size,
) -> None:
    """Evaluate a model zero-shot, or a finished run's dev-best weights, on the test split."""
    configure_logging(False)
    try:
        if run_dir is not None:
            # The run's model, task, prompt and test split are fixed by its config.json.
            # A different value typed here would be replaced by the saved one without a word.
            clashing = sorted(given_options(ctx, ctx.params) - EVAL_RUN_OPTIONS)
            if clashing:
                raise paczero.ConfigError(
                    f"{', '.join('--' + n.replace('_', '-') for n in clashing)} cannot be combined with --run-dir: "
                    f"the run's saved options are used; drop them, or evaluate a model without --run-dir")
            config_path = os.path.join(run_dir, "config.json")
            if not os.path.isfile(config_path):
                raise paczero.ConfigError(f"no config.json in {run_dir}; --run-dir must be a folder written by train")
            with open(config_path, encoding="utf-8") as handle:
                cfg = paczero.TrainConfig(**json.load(handle)["options"])
            cfg.device, cfg.micro_batch_size = device, micro_batch_size
            if "dtype" in given_options(ctx, ["dtype"]):
                cfg.dtype = dtype
            if data_dir is not None:
                cfg.data_dir = data_dir
        else:
            cfg = paczero.TrainConfig(model=model, task=task, template=template, data_dir=data_dir, data=data,
                                      label_words=label_words, text_column=text_column, label_column=label_column,
                                      prompt_column=prompt_column, answers_column=answers_column,
                                      max_new_tokens=max_new_tokens,
                                      test_size=test_size, data_seed=data_seed, dtype=dtype, device=device,
                                      micro_batch_size=micro_batch_size)
            warn_unused_options(cfg, given_options(ctx, ctx.params))
        outcome = paczero.evaluate_model(cfg, run_dir=run_dir)
    except USER_ERRORS as error:
        fail(error)
    table = Table(title=f"{outcome['task']} test, " + (f"dev-best weights of run {run_dir}" if run_dir else f"model {outcome['model']}"))
    metrics = {k: v for k, v in outcome["metrics"].items() if k != "metric"}
    table.add_column("examples", justify="right")
    for name in metrics:
        table.add_column(name.replace("_", " "), justify="right")
    table.add_column("seconds", justify="right")
    table.add_row(str(outcome["examples"]), *(f"{v:.4f}" for v in metrics.values()), f"{outcome['seconds']:.1f}")
    console.print(table)


@app.command()
def privacy(
    steps: Annotated[int, typer.Option(help="number of steps T over which each budget is spread")] = 1000,
) -> None:
    """Print the MI budgets with their MIA success bound, matched epsilon and noise scale."""
    if steps < 1:
        fail(paczero.ConfigError(f"--steps must be at least 1, got {steps}"))
    table = Table(title=f"PACZero-MI budgets over T = {steps} steps (prior membership probability 1/2)")
    for name in ("MI budget (nats)", "MIA success bound", "matched epsilon", "per-step budget (nats)",
                 "sigma at q+ = 0.5"):
        table.add_column(name, justify="right")
    for row in reproduce_lib.privacy_rows(steps):
        table.add_row(f"{row['budget_nats']:g}", f"{row['mia_bound']:.4f}", f"{row['matched_epsilon']:.3f}",
                      f"{row['per_step_nats']:.3g}", format_number(row["sigma_at_half"]))
    console.print(table)
    console.print("ZPL: 0 nats, MIA bound 0.5, epsilon 0. "
                  f"eps -> nats: 0.5 -> {mechanisms.epsilon_to_mi(0.5):.4f}, 1 -> {mechanisms.epsilon_to_mi(1):.4f}, "
                  f"2 -> {mechanisms.epsilon_to_mi(2):.4f}, 6 -> {mechanisms.epsilon_to_mi(6):.4f}")


@app.command()
def reproduce(
    table_name: Annotated[str, typer.Argument(metavar="TABLE", help=f"table to run: {', '.join(reproduce_lib.TABLES)}")],
    scale: Annotated[str, typer.Option(help="paper: OPT-1.3B with the paper's recipes (GPU); cpu: SmolLM2-135M, small pool and step count")] = "paper",
    data_dir: Annotated[Optional[str], option("data_dir")] = None,
    output_dir: Annotated[Optional[str], typer.Option(help="folder for the runs and the Markdown table [default: runs/reproduce/<table>-<scale>]")] = None,
    seeds: Annotated[Optional[str], typer.Option(help="comma-separated seeds for every cell [default: the recipe's]")] = None,
    rows: Annotated[Optional[str], typer.Option(help="semicolon-separated row labels to run [default: all]")] = None,
    model: Annotated[Optional[str], typer.Option(help="override the scale's model")] = None,
    template: Annotated[Optional[str], typer.Option(help="override the scale's prompt template")] = None,
    steps: Annotated[Optional[int], typer.Option(help="override the recipe's step count")] = None,
    pool_size: Annotated[Optional[int], typer.Option(help="override the scale's pool size")] = None,
    num_subsets: Annotated[Optional[int], typer.Option(help="override the recipe's number of subsets")] = None,
    dev_size: Annotated[Optional[int], typer.Option(help="override the scale's dev size")] = None,
    test_size: Annotated[Optional[int], typer.Option(help="override the scale's test size")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="override the scale's dev evaluation interval")] = None,
    micro_batch_size: Annotated[Optional[int], option("micro_batch_size")] = None,
    device: Annotated[str, option("device")] = DEFAULTS.device,
) -> None:
    """Run one of the paper's tables over its seeds and print it beside the published numbers."""
    configure_logging(False)
    if table_name not in reproduce_lib.TABLES:
        fail(paczero.ConfigError(f"unknown table {table_name!r}; choose one of {', '.join(reproduce_lib.TABLES)}"))
    if scale not in reproduce_lib.SCALES_BY_NAME:
        fail(paczero.ConfigError(f"unknown --scale {scale!r}; choose one of {', '.join(reproduce_lib.SCALES_BY_NAME)}"))
    spec = reproduce_lib.TABLES[table_name]
    chosen = reproduce_lib.SCALES_BY_NAME[scale]
    if template is None and chosen.name == "cpu" and spec.task == "sst2" and model is None:
        template = "instruct"  # SmolLM2 is instruction-tuned: 71 % zero-shot with it, 52 % with MeZO's prompt
    try:
        seed_list = tuple(int(s) for s in seeds.split(",")) if seeds is not None else None
        if seed_list is not None and any(s < 0 for s in seed_list):
            raise ValueError
    except ValueError:
        fail(paczero.ConfigError(f"--seeds must be comma-separated non-negative integers, got {seeds!r}"))
    row_labels = [r.strip() for r in rows.split(";")] if rows else None
    known = {r.label for r in spec.rows}
    for label in row_labels or []:
        if label not in known:
            fail(paczero.ConfigError(f"unknown row {label!r} in table {table_name}; rows: {'; '.join(sorted(known))}"))
    out_root = output_dir or os.path.join("runs", "reproduce", f"{table_name}-{scale}")
    overrides = {"model": model, "template": template, "steps": steps, "pool_size": pool_size,
                 "num_subsets": num_subsets, "dev_size": dev_size, "test_size": test_size, "eval_every": eval_every,
                 "micro_batch_size": micro_batch_size, "data_dir": data_dir, "device": device}
    started = time.perf_counter()
    try:
        cells = reproduce_lib.run_table(spec, chosen, out_root, overrides, seed_list, row_labels,
                                        on_progress=lambda text: error_console.log(f"running {text}"))
    except USER_ERRORS as error:
        fail(error)
    header, lines = reproduce_lib.table_rows(spec, chosen, cells)
    notes = reproduce_lib.table_notes(spec, chosen, cells)
    title = f"{spec.title} [{chosen.name} scale: {chosen.description}]"
    table = Table(title=title)
    for name in header:
        table.add_column(name)
    for line in lines:
        table.add_row(*line)
    console.print(table)
    for note in notes:
        console.print(f"- {note}", highlight=False)
    os.makedirs(out_root, exist_ok=True)
    markdown_path = os.path.join(out_root, f"{table_name}.md")
    with open(markdown_path, "w", encoding="utf-8") as handle:
        handle.write(reproduce_lib.markdown_table(title, header, lines, notes))
    console.print(f"Markdown table: {markdown_path} (wall time {time.perf_counter() - started:.0f} s)")


@app.command()
def audit(
    run_dir: Annotated[str, typer.Argument(help="a finished run folder")],
    resamples: Annotated[int, typer.Option(help="bootstrap resamples for the AUC interval")] = 1000,
    weights: Annotated[str, typer.Option(help="which weights to attack: final (after the last step) or best (dev-best)")] = "final",
) -> None:
    """Run a loss-threshold membership-inference attack on a finished run and compare it with its bound."""
    configure_logging(False)
    if resamples < 10:
        fail(paczero.ConfigError(f"--resamples must be at least 10, got {resamples}"))
    try:
        if weights not in ("final", "best"):
            raise paczero.ConfigError(f"--weights must be final or best, got {weights!r}")
        figures = audit_lib.audit_run(run_dir, resamples=resamples, weights=weights)
    except USER_ERRORS as error:
        fail(error)
    table = Table(title=f"Membership-inference audit of {run_dir} ({figures['mode']}, {weights} weights): "
                        f"{figures['members']} members of S* among {figures['pool_size']} pool examples")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    low, high = figures["auc_ci95"]
    null_low, null_high = figures["candidate_auc_range95"]
    table.add_row("ROC AUC of -loss for S* (0.5 = chance)",
                  f"{figures['auc']:.3f} [{low:.3f}, {high:.3f}] 95 % bootstrap over examples")
    table.add_row("same AUC at the initial weights", f"{figures['auc_initial_weights']:.3f}")
    table.add_row(f"AUC over all {figures['num_subsets']} candidate subsets (null)",
                  f"median {figures['candidate_auc_median']:.3f}, 95 % range [{null_low:.3f}, {null_high:.3f}]")
    table.add_row("rank of S* among the candidate subsets (1 = most member-like)",
                  f"{figures['secret_rank_among_subsets']} of {figures['num_subsets']}")
    table.add_row("attack success, threshold fitted on the other half", f"{figures['attack_success_cross_fitted']:.3f}")
    table.add_row("attack success, threshold fitted in sample (optimistic)", f"{figures['attack_success_in_sample']:.3f}")
    table.add_row("mean loss, members / non-members",
                  f"{figures['mean_loss_members']:.4f} / {figures['mean_loss_non_members']:.4f}")
    table.add_row("run's MIA success bound", format_number(figures["mia_bound"]))
    table.add_row("run's MI spent (nats)", format_number(figures["mi_spent_nats"]))
    console.print(table)
    mode = figures["mode"]
    if mode in ("raw_half", "quant_half"):
        console.print(f"note: --mode {mode} trains on S* alone with no privacy mechanism, so this attack is "
                      "expected to find S*; these figures measure the attack's power.")
    elif mode == "random_sign":
        console.print("note: --mode random_sign releases public coin flips only; no data reaches the model.")
    elif not figures["protects_membership_in_secret_subset"]:
        console.print(f"note: --mode {mode} trains on the whole pool (or samples of it), so membership in S* is not "
                      "what it protects; these figures are a reference, not a test of its guarantee.")
    console.print(f"figures written to {os.path.join(run_dir, 'audit.json')}")


@app.command()
def plot(
    run_dirs: Annotated[list[str], typer.Argument(metavar="RUN_DIR...", help="one or more run folders")],
    output_dir: Annotated[str, typer.Option(help="folder for the PNG files")] = "plots",
    window: Annotated[int, typer.Option(help="steps in the unanimity moving average")] = 20,
) -> None:
    """Draw dev metric, MI spent and unanimity over steps, and test metric against privacy (PNG)."""
    if window < 1:
        fail(paczero.ConfigError(f"--window must be at least 1, got {window}"))
    try:
        paths = plots_lib.plot_runs(run_dirs, output_dir, window)
    except FileNotFoundError as error:
        fail(error)
    for path in paths:
        console.print(path)


def format_bytes(value: int) -> str:
    return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.0f} MiB"


@app.command()
def bench(
    ctx: typer.Context,
    model: Annotated[str, typer.Option(help="model id or path, smollm2-135m, or a random OPT shape (random-opt-125m, random-opt-1.3b, ...)")] = "random-opt-125m",
    task: Annotated[str, option("task")] = "sst2",
    tuning: Annotated[str, option("tuning")] = "lora",
    dtype: Annotated[str, option("dtype")] = "auto",
    device: Annotated[str, option("device")] = "auto",
    pool_size: Annotated[int, typer.Option(help="pool examples per step")] = 256,
    micro_batch_size: Annotated[Optional[int], option("micro_batch_size")] = None,
    steps: Annotated[int, typer.Option(help="timed steps after warm-up (the median is reported)")] = 5,
    warmup: Annotated[int, typer.Option(help="untimed steps first")] = 1,
    baseline: Annotated[bool, typer.Option(help="also time the per-step work of the paper's public release")] = False,
    drift_cycles: Annotated[int, typer.Option(help="also measure weight drift after this many +eps/-2eps/+eps cycles in fp32, fp16, bf16 (0: skip)")] = 0,
    data_dir: Annotated[Optional[str], option("data_dir")] = None,
    data: Annotated[Optional[str], option("data")] = DEFAULTS.data,
    label_words: Annotated[Optional[str], option("label_words")] = DEFAULTS.label_words,
    text_column: Annotated[str, option("text_column")] = DEFAULTS.text_column,
    label_column: Annotated[str, option("label_column")] = DEFAULTS.label_column,
    prompt_column: Annotated[str, option("prompt_column")] = DEFAULTS.prompt_column,
    answers_column: Annotated[str, option("answers_column")] = DEFAULTS.answers_column,
    template: Annotated[Optional[str], option("template")] = None,
    max_new_tokens: Annotated[int, option("max_new_tokens")] = DEFAULTS.max_new_tokens,
    json_path: Annotated[Optional[str], typer.Option("--json", help="write the figures to this JSON file")] = None,
) -> None:
    """Time PACZero steps against their floor (two forward passes plus one draw of z)."""
    configure_logging(False)
    cfg = bench_lib.BenchConfig(model=model, task=task, tuning=tuning, dtype=dtype, device=device, pool_size=pool_size,
                                micro_batch_size=micro_batch_size, steps=steps, warmup=warmup, baseline=baseline,
                                data_dir=data_dir, data=data, label_words=label_words, text_column=text_column,
                                label_column=label_column, prompt_column=prompt_column, answers_column=answers_column,
                                template=template, max_new_tokens=max_new_tokens)
    # bench times the zpl step.
    warn_unused_options(types.SimpleNamespace(task=task, tuning=tuning, mode="zpl"), given_options(ctx, ctx.params))
    for name, value, low in (("--steps", steps, 1), ("--warmup", warmup, 0), ("--drift-cycles", drift_cycles, 0)):
        if value < low:
            fail(paczero.ConfigError(f"{name} must be at least {low}, got {value}"))
    if json_path is not None and (os.path.isdir(json_path) or not os.path.isdir(os.path.dirname(os.path.abspath(json_path)))):
        fail(paczero.ConfigError(f"--json {json_path} is not a file path in an existing folder"))
    try:
        figures = bench_lib.run_bench(cfg)
        drift = bench_lib.weight_drift(cfg, drift_cycles) if drift_cycles else None
    except USER_ERRORS as error:
        fail(error)
    table = Table(title=f"PACZero step: {model}, {task}, {tuning}, {figures['dtype']}, pool {figures['pool_size']}, "
                        f"micro-batch {figures['micro_batch_size']}, {figures['device']}")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_row("seconds per step (median)", f"{figures['seconds_per_step']:.3f}")
    for name, seconds in figures["phases_seconds"].items():
        table.add_row(f"  {name}", f"{seconds:.3f}")
    table.add_row("floor: 2 forward passes + 1 draw of z", f"{figures['floor_seconds']:.3f}")
    table.add_row("step / floor", f"{figures['step_over_floor']:.3f}")
    table.add_row("tokens per second (2 passes)", f"{figures['tokens_per_second']:.0f}")
    table.add_row("peak memory (" + ("max allocated" if "cuda" in str(figures['device']).lower() or figures['mfu'] is not None else "RSS") + ")",
                  format_bytes(figures["peak_memory_bytes"]))
    table.add_row("model FLOP utilisation", "n/a" if figures["mfu"] is None else f"{100 * figures['mfu']:.1f} %")
    table.add_row("zero-difference rate (g_i = 0)", f"{figures['zero_difference_rate']:.3f}")
    if baseline:
        table.add_row("paper-release baseline, seconds per step", f"{figures['baseline_seconds_per_step']:.3f}")
        table.add_row("speedup over the baseline", f"{figures['speedup_over_baseline']:.2f}x")
    console.print(table)
    if drift:
        drift_table = Table(title=f"Weight drift after {drift_cycles} cycles of +eps, -2 eps, +eps (no update)")
        for name in ("dtype", "elements", "max |drift|", "relative L2 drift", "fraction changed", "seconds"):
            drift_table.add_column(name, justify="right")
        for row in drift:
            drift_table.add_row(row["dtype"], f"{row['elements']:,}", f"{row['max_abs_drift']:.3g}",
                                f"{row['relative_l2_drift']:.3g}", f"{row['fraction_changed']:.3f}", f"{row['seconds']:.1f}")
        console.print(drift_table)
        figures["drift"] = drift
    if json_path:
        with open(json_path, "w", encoding="utf-8") as handle:
            json.dump(figures, handle, indent=2)
        console.print(f"figures written to {json_path}")


if __name__ == "__main__":
    app()
