"""The paper's tables as named specs, run over seeds and printed beside the published numbers.

A table is a list of rows (a method at a privacy level) times columns (LoRA, full
fine-tuning). Each cell runs `paczero.train` once per seed into its own run folder and
reports mean +- std of the test metric. A cell whose run folder already holds a finished
run with the same options is read back instead of rerun, so an interrupted `reproduce`
continues where it stopped.

Published numbers come from the PACZero paper (arXiv 2605.06505) where known here and are
"n/a" otherwise. Entries marked with a dagger come from the DPZero paper's own table for
OPT-1.3B SST-2 (Zhang et al. 2024), not from the PACZero paper.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import statistics
from dataclasses import dataclass, field
from typing import Callable

import mechanisms
import models
import paczero

log = logging.getLogger("paczero.reproduce")

SCALES = ("paper", "cpu")
PAPER_COLUMNS = ("lora", "ft")


@dataclass(frozen=True)
class Row:
    """One method at one privacy level; `options` override the scale's recipe for its mode."""

    label: str
    mode: str | None  # None: zero-shot, no training
    privacy: str
    options: dict = field(default_factory=dict)
    paper: dict = field(default_factory=dict)  # column -> published value, as printed


@dataclass(frozen=True)
class TableSpec:
    name: str
    title: str
    task: str
    rows: tuple[Row, ...]


def _mi_privacy(budget: float) -> str:
    bound = mechanisms.mia_success_bound(budget)
    return f"I = {budget:g} nats (eps {mechanisms.matched_epsilon(bound):.2g})"


SST2_TABLE = TableSpec(
    name="sst2", task="sst2",
    title="SST-2 accuracy (%): PACZero against non-private and DP zeroth-order fine-tuning",
    rows=(
        Row("Zero-shot", None, "-"),
        Row("MeZO (non-private)", "mezo", "none", paper={"ft": "91.1"}),
        Row("DPZero, eps = 2", "dpzero", "(2, 1e-5)-DP", {"dp_epsilon": 2.0}, paper={"ft": "86.8 †"}),
        Row("DP-AggZO, eps = 2", "dpaggzo", "(2, 1e-5)-DP", {"dp_epsilon": 2.0}),
        Row("PACZero-MI 0.68", "mi", _mi_privacy(0.68), {"mi_budget": 0.68}),
        Row("PACZero-MI 0.33", "mi", _mi_privacy(0.33), {"mi_budget": 0.33}, paper={"ft": "89.51 ± 1.12"}),
        Row("PACZero-ZPL", "zpl", "I = 0", paper={"ft": "88.99 ± 0.91"}),
    ),
)

SQUAD_TABLE = TableSpec(
    name="squad", task="squad",
    title="SQuAD F1 (%): PACZero against non-private and DP zeroth-order fine-tuning",
    rows=(
        Row("Zero-shot", None, "-"),
        Row("MeZO (non-private)", "mezo", "none", paper={"ft": "73.5 †"}),
        Row("DPZero, eps = 2", "dpzero", "(2, 1e-5)-DP", {"dp_epsilon": 2.0}, paper={"ft": "70.1 †"}),
        Row("PACZero-MI 0.33", "mi", _mi_privacy(0.33), {"mi_budget": 0.33}),
        Row("PACZero-ZPL", "zpl", "I = 0"),
    ),
)

MI_SWEEP_TABLE = TableSpec(
    name="mi-sweep", task="sst2",
    title="SST-2 accuracy (%) against the MI budget (PACZero-MI)",
    rows=tuple(Row(f"PACZero-MI {b:g}", "mi", _mi_privacy(b), {"mi_budget": b},
                   paper={"ft": "89.51 ± 1.12"} if b == 0.33 else {})
               for b in (1e-4, 1e-3, 1e-2, 0.0303, 0.1109, 0.33, 0.68)),
)

DP_CLIFF_TABLE = TableSpec(
    name="dp-cliff", task="sst2",
    title="SST-2 accuracy (%) as the privacy level tightens: DPZero against PACZero at matched MIA bounds",
    rows=tuple(
        row for eps, mi in ((6.0, 0.6758), (2.0, 0.3278), (1.0, 0.1109), (0.5, 0.0303))
        for row in (
            Row(f"DPZero, eps = {eps:g}", "dpzero", f"({eps:g}, 1e-5)-DP", {"dp_epsilon": eps},
                paper={"ft": {6.0: "88.2 †", 2.0: "86.8 †"}.get(eps, "n/a")}),
            Row(f"PACZero-MI {mi:g}", "mi", _mi_privacy(mi), {"mi_budget": mi}),
        )
    ) + (Row("PACZero-ZPL", "zpl", "I = 0", paper={"ft": "88.99 ± 0.91"}),),
)

TABLES = {t.name: t for t in (SST2_TABLE, SQUAD_TABLE, MI_SWEEP_TABLE, DP_CLIFF_TABLE)}


# ---------------------------------------------------------------------------------------
# Scales: the paper's recipes (GPU) and a CPU-sized version of them
# ---------------------------------------------------------------------------------------


def paper_recipe(task: str, mode: str, tuning: str) -> dict | None:
    """The paper's OPT-1.3B recipe for one cell (learning rate, clip, steps, subsets, seeds), or None if it has none."""
    if mode in ("dpzero", "dpaggzo") and tuning != "ft":
        return None  # the paper ran the DP baselines with full fine-tuning only
    private = mode in ("zpl", "mi")
    subsets = 126 if mode == "zpl" else 128
    if task == "squad":
        recipe = {"lr": 1e-3 if tuning == "lora" else 1e-4, "clip": 25.0 if tuning == "lora" else 1000.0,
                  "steps": 1000, "num_subsets": subsets, "seeds": (0, 1, 2) if (mode == "zpl" and tuning == "ft") else (0,)}
    elif tuning == "lora":
        if mode == "zpl":
            recipe = {"lr": 1e-3, "clip": 25.0, "steps": 1000, "num_subsets": 126, "seeds": (1, 2, 3)}
        else:
            recipe = {"lr": 5e-4, "clip": 25.0, "steps": 2000, "num_subsets": 128, "seeds": (0, 1, 2, 3)}
    else:
        recipe = {"lr": 1e-4, "clip": 1000.0, "steps": 1000, "num_subsets": subsets,
                  "seeds": (0, 1, 2) if mode == "zpl" else (0, 1, 2, 3)}
    if mode in ("dpzero", "dpaggzo"):
        # DPZero / DP-AggZO as the paper ran them: SST-2 OPT-1.3B FT, lr 5e-6, C = 25, q = 0.064.
        recipe.update({"lr": 5e-6, "clip": 25.0, "sampling_rate": 0.064,
                       "steps": 20000 if mode == "dpzero" else 1000})
        if mode == "dpaggzo":
            recipe["directions"] = 64
    if mode == "mezo":
        recipe.update({"lr": 1e-6 if tuning == "ft" else 1e-4})
    if not private:
        recipe["seeds"] = (0, 1, 2)
    return recipe


@dataclass(frozen=True)
class Scale:
    name: str
    description: str
    columns: tuple[str, ...]
    base: dict  # TrainConfig options common to every run
    recipe: Callable[[str, str, str], dict]


def cpu_recipe(task: str, mode: str, tuning: str) -> dict:
    """A recipe that fits 2 CPU cores: SmolLM2-135M, LoRA, 32 pool examples, 60 steps, 2 seeds.

    The learning rates are larger than the paper's because there are 17x fewer steps;
    they come from the SmolLM2 SST-2 runs recorded in RESULTS.md.
    """
    recipe = {"clip": 25.0, "steps": 60, "num_subsets": 8, "seeds": (0, 1), "lr": 2e-3}
    if mode in ("mezo", "dpzero", "dpaggzo", "raw_full", "raw_half"):
        recipe["lr"] = 1e-3
    if mode in ("dpzero", "dpaggzo"):
        # With 32 examples the paper's q = 0.064 would sample two examples per step.
        recipe["sampling_rate"] = 0.5
    if mode == "dpaggzo":
        recipe["directions"] = 4
    if task == "squad":
        recipe.update({"steps": 20, "max_new_tokens": 20})
    return recipe


SCALES_BY_NAME = {
    "paper": Scale(
        name="paper", description="OPT-1.3B, N = 1000, the paper's recipes (GPU)", columns=("lora", "ft"),
        base={"model": "facebook/opt-1.3b", "pool_size": 1000, "dev_size": 500, "test_size": 1000,
              "eval_every": 100, "dtype": "auto"},
        recipe=paper_recipe,
    ),
    "cpu": Scale(
        name="cpu", description="SmolLM2-135M, N = 32, M = 8, 60 steps, LoRA only (CPU)", columns=("lora",),
        base={"model": models.SMOLLM2_NAME, "pool_size": 32, "dev_size": 100, "test_size": 1000,
              "eval_every": 30, "dtype": "fp32"},
        recipe=cpu_recipe,
    ),
}


# ---------------------------------------------------------------------------------------
# Running a table
# ---------------------------------------------------------------------------------------


@dataclass
class Cell:
    row: Row
    column: str
    values: list = field(default_factory=list)  # test metric per seed, in [0, 1]
    seconds: list = field(default_factory=list)
    run_dirs: list = field(default_factory=list)

    def summary(self) -> str:
        if not self.values:
            return "n/a"
        percent = [100 * v for v in self.values]
        if len(percent) == 1:
            return f"{percent[0]:.2f}"
        return f"{statistics.mean(percent):.2f} ± {statistics.stdev(percent):.2f}"


def cell_config(spec: TableSpec, row: Row, column: str, seed: int, scale: Scale, overrides: dict,
                out_root: str) -> paczero.TrainConfig:
    recipe = dict(scale.recipe(spec.task, row.mode or "zpl", column))
    recipe.pop("seeds")
    options = {**scale.base, **recipe, **row.options, **overrides}
    if row.mode is None:
        options.update(mode="zpl", steps=1)
    else:
        options["mode"] = row.mode
    slug = "".join(ch if ch.isalnum() or ch in ".-" else "-" for ch in row.label.lower()).strip("-")
    options.update(task=spec.task, tuning=column, seed=seed, secret_seed=10_000 + seed,
                   output_dir=os.path.join(out_root, f"{slug}-{column}-seed{seed}"), zero_shot=False)
    if options["mode"] == "mezo":
        options.pop("clip", None)  # MeZO uses the raw projected gradients
    elif "batch_size" in options:
        options.pop("batch_size")
    if options["mode"] not in ("dpzero", "dpaggzo"):
        options.pop("sampling_rate", None)
    if options["mode"] not in ("mi",):
        options.pop("mi_budget", None)
    fields = {f.name for f in dataclasses.fields(paczero.TrainConfig)}
    return paczero.TrainConfig(**{k: v for k, v in options.items() if k in fields})


def finished_result(cfg: paczero.TrainConfig) -> dict | None:
    """The result of an earlier run with exactly these options, or None."""
    config_path = os.path.join(cfg.output_dir, "config.json")
    result_path = os.path.join(cfg.output_dir, "result.json")
    if not (os.path.isfile(config_path) and os.path.isfile(result_path)):
        return None
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle)["options"]
    # Training cells run without their own zero-shot evaluation (the table has a zero-shot row).
    wanted = dataclasses.asdict(paczero.resolve_defaults(dataclasses.replace(cfg, zero_shot=False)))
    if saved != wanted:
        changed = sorted(k for k in wanted if saved.get(k) != wanted[k])
        log.info("%s: options changed (%s), running again", cfg.output_dir, ", ".join(changed))
        return None
    with open(result_path, encoding="utf-8") as handle:
        return json.load(handle)


def run_cell_seed(cfg: paczero.TrainConfig, zero_shot_only: bool) -> dict:
    """Run one seed of one cell, or read back its finished run."""
    done = finished_result(cfg)
    if done is not None:
        log.info("reusing finished run %s", cfg.output_dir)
        return done
    if os.path.isdir(cfg.output_dir):
        # An interrupted run: its partial folder is replaced by a full run.
        shutil.rmtree(cfg.output_dir)
    if zero_shot_only:
        os.makedirs(cfg.output_dir, exist_ok=True)
        outcome = paczero.evaluate_model(cfg)
        result = {"test_metric": outcome["metric"], "test_metrics": outcome["metrics"], "seconds": outcome["seconds"]}
        paczero.write_json(os.path.join(cfg.output_dir, "config.json"),
                           {"options": dataclasses.asdict(paczero.resolve_defaults(cfg))})
        paczero.write_json(os.path.join(cfg.output_dir, "result.json"), result)
        return result
    return paczero.train(cfg)


def run_table(spec: TableSpec, scale: Scale, out_root: str, overrides: dict | None = None,
              seeds: tuple[int, ...] | None = None, rows: list[str] | None = None,
              on_progress: Callable[[str], None] | None = None) -> list[Cell]:
    """Run (or read back) every cell of a table over its seeds.

    Every run's options are built and validated before the first run starts, so that an
    option a late row cannot take fails in seconds rather than after hours of earlier rows.
    """
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    plan: list[tuple[Cell, int, paczero.TrainConfig]] = []
    for row in spec.rows:
        if rows and row.label not in rows:
            continue
        for column in scale.columns:
            recipe = scale.recipe(spec.task, row.mode or "zpl", column)
            if recipe is None:
                continue
            cell = Cell(row=row, column=column)
            cell_seeds = seeds or recipe["seeds"]
            if row.mode is None:
                cell_seeds = cell_seeds[:1]  # zero-shot does not depend on the seed's training
            for seed in cell_seeds:
                cfg = cell_config(spec, row, column, seed, scale, overrides, out_root)
                try:
                    paczero.resolve_defaults(cfg)
                except paczero.ConfigError as error:
                    raise paczero.ConfigError(f"row {row.label!r} ({column}, seed {seed}): {error}") from None
                plan.append((cell, seed, cfg))
    cells = []
    for cell, seed, cfg in plan:
        if on_progress is not None:
            on_progress(f"{cell.row.label} / {cell.column} / seed {seed}")
        result = run_cell_seed(cfg, zero_shot_only=cell.row.mode is None)
        cell.values.append(result["test_metric"])
        cell.run_dirs.append(cfg.output_dir)
        if result.get("seconds_per_step") is not None:
            cell.seconds.append(result["seconds_per_step"])
        if not cells or cells[-1] is not cell:
            cells.append(cell)
    return cells


def table_rows(spec: TableSpec, scale: Scale, cells: list[Cell]) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the printed table: ours and the paper's numbers in separate columns."""
    metric = "accuracy" if spec.task == "sst2" else "F1"
    header = ["method", "privacy"]
    header += [f"{column.upper()} ours ({metric} %, {scale.name} scale)" for column in scale.columns]
    header += [f"{column.upper()} paper (OPT-1.3B)" for column in PAPER_COLUMNS]
    header.append("seeds")
    by_key = {(c.row.label, c.column): c for c in cells}
    lines = []
    for row in spec.rows:
        if not any((row.label, column) in by_key for column in scale.columns):
            continue
        ours = [by_key.get((row.label, column)) for column in scale.columns]
        line = [row.label, row.privacy]
        line += [cell.summary() if cell else "not run" for cell in ours]
        line += [row.paper.get(column, "n/a") for column in PAPER_COLUMNS]
        line.append(str(max(len(cell.values) if cell else 0 for cell in ours)))
        lines.append(line)
    return header, lines


def markdown_table(title: str, header: list[str], lines: list[list[str]], notes: list[str]) -> str:
    out = [f"### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    out += [""] + [f"- {note}" for note in notes]
    return "\n".join(out) + "\n"


def describe_runs(cells: list[Cell]) -> str:
    """Model, pool, subsets and steps of the runs actually made, read from their config files."""
    for cell in cells:
        for run_dir in cell.run_dirs:
            if cell.row.mode is None:
                continue
            with open(os.path.join(run_dir, "config.json"), encoding="utf-8") as handle:
                options = json.load(handle)["options"]
            return (f"{options['model']}, {options['template']} template, N = {options['pool_size']}, "
                    f"M = {options['num_subsets']}, T = {options['steps']} ({cell.row.label}), "
                    f"test = {options['test_size']} requested, {options['dtype']}")
    return "no training runs"


def table_notes(spec: TableSpec, scale: Scale, cells: list[Cell]) -> list[str]:
    notes = [
        f"Scale: {scale.description}. Runs: {describe_runs(cells)}.",
        f"Ours: mean ± sample std over seeds of the dev-best test {('accuracy' if spec.task == 'sst2' else 'F1')}.",
        "Paper: the PACZero paper (arXiv 2605.06505), OPT-1.3B; n/a where the number is not available here.",
    ]
    if any("†" in v for row in spec.rows for v in row.paper.values()):
        notes.append("†: from the DPZero paper's own table (OPT-1.3B), not from the PACZero paper.")
    if scale.name != "paper":
        notes.append("A smaller model, pool and step count than the paper's: compare rows within a column, not with the paper column.")
    return notes


def privacy_rows(total_steps: int, budgets: tuple[float, ...] = (1e-4, 1e-3, 1e-2, 0.0303, 0.1109, 0.33, 0.68)) -> list[dict]:
    """The privacy table: per budget, MIA bound, matched epsilon, per-step budget and sigma at q+ = 1/2."""
    rows = []
    for budget in budgets:
        bound = mechanisms.mia_success_bound(budget)
        per_step = budget / total_steps
        sigma = mechanisms.calibrate_sigma(0.5, per_step) if per_step < 0.999 * math.log(2) else None
        rows.append({"budget_nats": budget, "mia_bound": bound, "matched_epsilon": mechanisms.matched_epsilon(bound),
                     "per_step_nats": per_step, "sigma_at_half": sigma})
    return rows
