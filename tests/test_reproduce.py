"""reproduce.TABLES on the tiny OPT: every row runs, the printed table, reuse of finished runs."""

from __future__ import annotations

import json
import os
import re

import pytest
from rich.console import Console
from typer.testing import CliRunner

import cli
import mechanisms
import paczero
import reproduce

SPEC = reproduce.TABLES["sst2"]
CPU = reproduce.SCALES_BY_NAME["cpu"]
ROW_LABELS = [row.label for row in SPEC.rows]
# One test metric in percent, or mean ± std over seeds.
SUMMARY = re.compile(r"\d+\.\d\d( ± \d+\.\d\d)?")


def tiny_overrides(model_dir: str, data_dir: str, **extra) -> dict:
    overrides = dict(model=model_dir, template="mezo", data_dir=data_dir, steps=2, pool_size=8, dev_size=4,
                     test_size=6, eval_every=2, num_subsets=4, device="cpu")
    overrides.update(extra)
    return overrides


def cli_overrides(model_dir: str, data_dir: str) -> list[str]:
    return ["--model", model_dir, "--template", "mezo", "--data-dir", data_dir, "--steps", "2", "--pool-size", "8",
            "--dev-size", "4", "--test-size", "6", "--eval-every", "2", "--num-subsets", "4", "--device", "cpu"]


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def result_mtime(run_dir: str) -> int:
    return os.stat(os.path.join(run_dir, "result.json")).st_mtime_ns


@pytest.fixture(scope="module")
def table(tmp_path_factory, tiny_model_dir, sst2_dir):
    """Run every row of the SST-2 table at the CPU scale's seeds, returning (cells, header, lines)."""
    out_root = str(tmp_path_factory.mktemp("sst2-table"))
    cells = reproduce.run_table(SPEC, CPU, out_root, tiny_overrides(tiny_model_dir, sst2_dir))
    header, lines = reproduce.table_rows(SPEC, CPU, cells)
    return cells, header, lines


@pytest.fixture
def wide_console(monkeypatch):
    # Rich wraps table cells at 80 columns when stdout is not a terminal, which would split
    # row labels across lines.
    monkeypatch.setattr(cli, "console", Console(width=300))


# ---------------------------------------------------------------------------------------
# run_table and table_rows
# ---------------------------------------------------------------------------------------


def test_run_table_every_row(table):
    cells, _, _ = table
    assert [cell.row.label for cell in cells] == ROW_LABELS
    assert {cell.column for cell in cells} == {"lora"}


def test_run_table_seeds_per_cell(table):
    cells, _, _ = table
    for cell in cells:
        expected = 1 if cell.row.mode is None else len(CPU.recipe("sst2", cell.row.mode, "lora")["seeds"])
        assert len(cell.values) == expected, cell.row.label
        assert len(cell.run_dirs) == expected, cell.row.label


def test_run_table_metrics_in_range(table):
    cells, _, _ = table
    for cell in cells:
        for value in cell.values:
            assert 0.0 <= value <= 1.0, cell.row.label


def test_run_table_row_options(table):
    cells, _, _ = table
    for cell in cells:
        if cell.row.mode is None:
            continue
        for seed, run_dir in enumerate(cell.run_dirs):
            options = read_json(os.path.join(run_dir, "config.json"))["options"]
            assert options["mode"] == cell.row.mode
            assert options["steps"] == 2
            assert options["pool_size"] == 8
            assert options["num_subsets"] == 4
            assert options["seed"] == seed
            for name, value in cell.row.options.items():
                assert options[name] == value, (cell.row.label, name)


def test_run_table_dp_cpu_sampling_rate(table):
    cells, _, _ = table
    dp_cells = [cell for cell in cells if cell.row.mode in ("dpzero", "dpaggzo")]
    assert len(dp_cells) == 2
    for cell in dp_cells:
        result = read_json(os.path.join(cell.run_dirs[0], "result.json"))
        assert result["dp_epsilon"] == 2.0
        assert read_json(os.path.join(cell.run_dirs[0], "config.json"))["options"]["sampling_rate"] == 0.5


def test_table_rows_header(table):
    _, header, _ = table
    assert header == ["method", "privacy", "LORA ours (accuracy %, cpu scale)", "LORA paper (OPT-1.3B)",
                      "FT paper (OPT-1.3B)", "seeds"]


def test_table_rows_every_column(table):
    _, header, lines = table
    assert [line[0] for line in lines] == ROW_LABELS
    for row, line in zip(SPEC.rows, lines):
        assert len(line) == len(header)
        assert line[1] == row.privacy
        assert SUMMARY.fullmatch(line[2]), line
        assert line[3] == row.paper.get("lora", "n/a")
        assert line[4] == row.paper.get("ft", "n/a")
        assert line[5] == ("1" if row.mode is None else "2")


def test_table_rows_paper_numbers(table):
    _, _, lines = table
    ft_paper = {line[0]: line[4] for line in lines}
    assert ft_paper["MeZO (non-private)"] == "91.1"
    assert ft_paper["DPZero, eps = 2"] == "86.8 †"
    assert ft_paper["PACZero-MI 0.33"] == "89.51 ± 1.12"
    assert ft_paper["PACZero-ZPL"] == "88.99 ± 0.91"
    assert ft_paper["DP-AggZO, eps = 2"] == "n/a"
    assert all(line[3] == "n/a" for line in lines)


# ---------------------------------------------------------------------------------------
# Reuse of finished runs
# ---------------------------------------------------------------------------------------


def test_run_table_validates_every_row_first(tmp_path, tiny_model_dir, sst2_dir):
    # Two directions suit the zero-shot row but not DPZero (K = 1): the table must stop
    # before the zero-shot row has run, naming the row that cannot take the option.
    overrides = tiny_overrides(tiny_model_dir, sst2_dir, directions=2)
    with pytest.raises(paczero.ConfigError, match="row 'DPZero, eps = 2'.*dpzero uses one direction"):
        reproduce.run_table(SPEC, CPU, str(tmp_path), overrides, rows=["Zero-shot", "DPZero, eps = 2"])
    assert os.listdir(tmp_path) == []


def test_run_table_reuses_zero_shot(tmp_path, tiny_model_dir, sst2_dir):
    overrides = tiny_overrides(tiny_model_dir, sst2_dir)
    first = reproduce.run_table(SPEC, CPU, str(tmp_path), overrides, rows=["Zero-shot"])
    run_dir = first[0].run_dirs[0]
    written = result_mtime(run_dir)
    again = reproduce.run_table(SPEC, CPU, str(tmp_path), overrides, rows=["Zero-shot"])
    assert result_mtime(run_dir) == written
    assert again[0].values == first[0].values


def test_run_table_reuses_training_run(tmp_path, tiny_model_dir, sst2_dir):
    overrides = tiny_overrides(tiny_model_dir, sst2_dir)
    first = reproduce.run_table(SPEC, CPU, str(tmp_path), overrides, seeds=(0,), rows=["MeZO (non-private)"])
    run_dir = first[0].run_dirs[0]
    written = result_mtime(run_dir)
    reproduce.run_table(SPEC, CPU, str(tmp_path), overrides, seeds=(0,), rows=["MeZO (non-private)"])
    assert result_mtime(run_dir) == written


def test_run_table_reruns_changed_steps(tmp_path, tiny_model_dir, sst2_dir):
    rows = ["PACZero-ZPL"]
    first = reproduce.run_table(SPEC, CPU, str(tmp_path), tiny_overrides(tiny_model_dir, sst2_dir), seeds=(0,),
                                rows=rows)
    run_dir = first[0].run_dirs[0]
    written = result_mtime(run_dir)
    again = reproduce.run_table(SPEC, CPU, str(tmp_path), tiny_overrides(tiny_model_dir, sst2_dir, steps=3),
                                seeds=(0,), rows=rows)
    assert again[0].run_dirs == [run_dir]
    assert result_mtime(run_dir) != written
    assert read_json(os.path.join(run_dir, "result.json"))["steps_run"] == 3
    assert read_json(os.path.join(run_dir, "config.json"))["options"]["steps"] == 3


def test_run_table_replaces_partial_run(tmp_path, tiny_model_dir, sst2_dir):
    rows = ["PACZero-ZPL"]
    overrides = tiny_overrides(tiny_model_dir, sst2_dir)
    first = reproduce.run_table(SPEC, CPU, str(tmp_path), overrides, seeds=(0,), rows=rows)
    run_dir = first[0].run_dirs[0]

    # What an interrupted run leaves: config.json and a partial log, no result.json.
    os.remove(os.path.join(run_dir, "result.json"))
    with open(os.path.join(run_dir, "steps.jsonl"), "w", encoding="utf-8") as handle:
        handle.write('{"step": 0}\n')
    assert os.path.isfile(os.path.join(run_dir, "config.json"))

    again = reproduce.run_table(SPEC, CPU, str(tmp_path), overrides, seeds=(0,), rows=rows)
    assert read_json(os.path.join(run_dir, "result.json"))["steps_run"] == 2
    with open(os.path.join(run_dir, "steps.jsonl"), encoding="utf-8") as handle:
        assert len(handle.readlines()) == 2
    assert again[0].values == first[0].values


# ---------------------------------------------------------------------------------------
# Privacy table
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("total_steps", [1000, 2000])
def test_privacy_rows_sigma_within_budget(total_steps):
    rows = reproduce.privacy_rows(total_steps)
    assert [row["budget_nats"] for row in rows] == [1e-4, 1e-3, 1e-2, 0.0303, 0.1109, 0.33, 0.68]
    for row in rows:
        per_step = row["budget_nats"] / total_steps
        assert row["per_step_nats"] == per_step
        assert mechanisms.binary_gaussian_mi(0.5, row["sigma_at_half"]) <= per_step
        # Calibration returns the smallest safe sigma, so the MI is close to the budget.
        assert mechanisms.binary_gaussian_mi(0.5, row["sigma_at_half"]) >= per_step * (1 - 1e-6)


def test_privacy_rows_matched_epsilon():
    by_budget = {row["budget_nats"]: row for row in reproduce.privacy_rows(1000)}
    assert by_budget[0.1109]["matched_epsilon"] == pytest.approx(1.0, abs=1e-3)
    assert by_budget[0.0303]["matched_epsilon"] == pytest.approx(0.5, abs=1e-3)
    assert by_budget[0.33]["matched_epsilon"] == pytest.approx(2.0, abs=0.02)


def test_privacy_rows_noiseless_budget():
    # MI caps a step's budget at 0.999 H_b(q+), which is 0.999 ln 2 at q+ = 1/2, so a larger
    # per-step budget has no sigma to report.
    row = reproduce.privacy_rows(1, budgets=(0.7,))[0]
    assert row["sigma_at_half"] is None
    assert row["mia_bound"] == 1.0


# ---------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------


def test_cli_reproduce_table(tmp_path, tiny_model_dir, sst2_dir, wide_console):
    out_root = str(tmp_path / "table")
    arguments = ["reproduce", "sst2", "--scale", "cpu", "--output-dir", out_root, "--seeds", "0"]
    outcome = CliRunner().invoke(cli.app, arguments + cli_overrides(tiny_model_dir, sst2_dir))
    assert outcome.exit_code == 0, outcome.output
    for label in ROW_LABELS:
        assert label in outcome.stdout, label

    with open(os.path.join(out_root, "sst2.md"), encoding="utf-8") as handle:
        markdown = handle.read()
    header, _ = reproduce.table_rows(SPEC, CPU, [])
    assert "| " + " | ".join(header) + " |" in markdown
    for label in ROW_LABELS:
        assert f"| {label} |" in markdown, label


def test_cli_privacy_budgets(wide_console):
    outcome = CliRunner().invoke(cli.app, ["privacy", "--steps", "2000"])
    assert outcome.exit_code == 0, outcome.output
    assert "T = 2000" in outcome.stdout
    for budget in ("0.0001", "0.001", "0.01", "0.0303", "0.1109", "0.33", "0.68"):
        assert re.search(rf"│\s+{re.escape(budget)}\s+│", outcome.stdout), budget


def one_line_error(outcome) -> str:
    lines = outcome.stderr.rstrip("\n").splitlines()
    assert len(lines) == 1, outcome.stderr
    return lines[0]


def test_cli_reproduce_unknown_table():
    outcome = CliRunner().invoke(cli.app, ["reproduce", "nosuchtable"])
    assert outcome.exit_code == 2
    assert one_line_error(outcome).startswith("error: unknown table 'nosuchtable'; choose one of sst2")


def test_cli_reproduce_unknown_row():
    outcome = CliRunner().invoke(cli.app, ["reproduce", "sst2", "--rows", "no such row"])
    assert outcome.exit_code == 2
    assert one_line_error(outcome).startswith("error: unknown row 'no such row' in table sst2")


def test_cli_reproduce_unknown_scale():
    outcome = CliRunner().invoke(cli.app, ["reproduce", "sst2", "--scale", "gpu"])
    assert outcome.exit_code == 2
    assert one_line_error(outcome).startswith("error: unknown --scale 'gpu'")
