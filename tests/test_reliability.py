"""Crash safety, rejected input and privacy audits of whole runs on the tiny OPT.

- Kill and resume: a `cli.py train` subprocess is killed with SIGKILL at chosen points and
  continued with `train --resume`. The result must be byte-identical to an uninterrupted run.
- The MI ledger in steps.jsonl survives a kill and is not charged twice on resume.
- A non-finite loss stops the run before anything is released for that step.
- Bad input exits with code 2, one error line and no run folder.
- A Monte Carlo estimate of I(S*; Y_1..Y_T), recomputed from steps.jsonl alone, stays
  within the MI that PACZero-MI charges, and is exactly 0 for PACZero-ZPL.
- The membership-inference audit on finished runs.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import audit
import cli
import mechanisms
import paczero
import zo
from conftest import ROOT
from paczero import TrainConfig, TrainingError

# ---------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------

# The kill-and-resume runs: PACZero-MI, 12 steps, a checkpoint every 3 steps and a dev
# evaluation every 4, so that a kill between checkpoints can leave an evaluation that the
# checkpoint does not know about. One sequence per forward pass makes a step take about
# 0.1 s instead of 0.03 s (measured on two busy CPU cores), which leaves the poller time
# to kill inside one step.
KILL_OPTIONS = ["--pool-size", "32", "--dev-size", "16", "--test-size", "16", "--num-subsets", "8",
                "--steps", "12", "--eval-every", "4", "--save-every", "3", "--mode", "mi", "--mi-budget", "0.3",
                "--no-zero-shot", "--secret-seed", "5", "--seed", "0", "--device", "cpu", "--micro-batch-size", "1"]


def kill_config(model_dir: str, data_dir: str, output_dir: str) -> TrainConfig:
    """Build the TrainConfig that KILL_OPTIONS give on the command line."""
    return TrainConfig(model=model_dir, data_dir=data_dir, output_dir=output_dir, pool_size=32, dev_size=16,
                       test_size=16, num_subsets=8, steps=12, eval_every=4, save_every=3, mode="mi", mi_budget=0.3,
                       zero_shot=False, secret_seed=5, seed=0, device="cpu", micro_batch_size=1)


def train_arguments(model_dir: str, data_dir: str, output_dir: str) -> list[str]:
    return ["train", "--model", model_dir, "--data-dir", data_dir, "--output-dir", output_dir] + KILL_OPTIONS


def launch(arguments: list[str], log_path: str) -> subprocess.Popen:
    """Start `python cli.py ARGUMENTS` with one intra-op thread; stdout and stderr go to `log_path`."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with open(log_path, "wb") as log_file:
        return subprocess.Popen([sys.executable, os.path.join(ROOT, "cli.py"), *arguments], cwd=ROOT, env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)


def count_lines(path: str) -> int:
    """Count the complete lines in `path`, 0 if it is missing. A line still being written has no newline yet."""
    try:
        with open(path, "rb") as handle:
            return handle.read().count(b"\n")
    except FileNotFoundError:
        return 0


def kill_when(process: subprocess.Popen, run_dir: str, ready, timeout: float = 180.0) -> None:
    """Send SIGKILL to `process` as soon as `ready(lines in steps.jsonl, checkpoint exists)` is true.

    The files are polled every millisecond, so the kill usually lands a few milliseconds
    after the condition, well inside the 0.1 s a step takes with KILL_OPTIONS.
    test_kill_point_reached checks where it landed.
    """
    steps_path = os.path.join(run_dir, "steps.jsonl")
    checkpoint_path = os.path.join(run_dir, paczero.CHECKPOINT)
    deadline = time.monotonic() + timeout
    while not ready(count_lines(steps_path), os.path.exists(checkpoint_path)):
        if process.poll() is not None:
            pytest.fail(f"the run exited with {process.returncode} before the kill point")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"the kill point was not reached within {timeout} s")
        time.sleep(0.001)
    process.send_signal(signal.SIGKILL)
    process.wait()


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as handle:
        return handle.read()


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def read_steps(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "steps.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def load_checkpoint_payload(run_dir: str) -> dict:
    # The checkpoint contains numpy generator states, so it needs a full unpickle.
    return torch.load(os.path.join(run_dir, paczero.CHECKPOINT), weights_only=False)


def without_timing(result: dict) -> dict:
    """Return result.json without its wall-clock figure, which differs between any two runs."""
    return {key: value for key, value in result.items() if key != "seconds_per_step"}


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_line_error(outcome, code: int = 2) -> str:
    """Check that a command was rejected with exit `code`, one error line at the end of stderr and no traceback.

    Returns the error line.
    """
    assert outcome.exit_code == code, outcome.output
    # CliRunner turns an uncaught exception into exit code 1 and keeps it here.
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit), repr(outcome.exception)
    assert "Traceback" not in outcome.output
    errors = error_lines(outcome.stderr)
    assert len(errors) == 1, outcome.stderr
    assert outcome.stderr.rstrip("\n").splitlines()[-1] == errors[0]
    return errors[0]


def assert_no_run_folder(path: str) -> None:
    assert not os.path.exists(path) or not os.listdir(path), os.listdir(path)


def invoke(arguments: list[str]):
    return CliRunner().invoke(cli.app, arguments)


# ---------------------------------------------------------------------------------------
# Kill and resume
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory, tiny_model_dir, sst2_dir) -> str:
    """Run the kill configuration uninterrupted in a subprocess and return its folder."""
    folder = tmp_path_factory.mktemp("reference")
    run_dir = str(folder / "run")
    log_path = str(folder / "log.txt")
    process = launch(train_arguments(tiny_model_dir, sst2_dir, run_dir), log_path)
    assert process.wait(timeout=300) == 0, read_bytes(log_path).decode(errors="replace")
    return run_dir


# Each kill point: when to kill (lines in steps.jsonl, whether a checkpoint exists), the
# options the resume adds, and whether the resume runs in a subprocess too (the others
# run in this process, which is faster). --save-every may change on resume, so one case
# changes it.
KILL_POINTS = {
    "before_checkpoint": (lambda lines, checkpoint: lines >= 1, [], False),
    "at_checkpoint": (lambda lines, checkpoint: checkpoint, [], False),
    "between_checkpoints": (lambda lines, checkpoint: lines >= 5, ["--save-every", "2"], True),
}


@pytest.fixture(scope="module", params=list(KILL_POINTS))
def killed(request, tmp_path_factory, tiny_model_dir, sst2_dir) -> dict:
    """Kill a subprocess run at one point, record what is on disk, then resume it."""
    ready, resume_options, resume_in_subprocess = KILL_POINTS[request.param]
    folder = tmp_path_factory.mktemp(request.param)
    run_dir = str(folder / "run")
    process = launch(train_arguments(tiny_model_dir, sst2_dir, run_dir), str(folder / "log.txt"))
    kill_when(process, run_dir, ready)

    has_checkpoint = os.path.exists(os.path.join(run_dir, paczero.CHECKPOINT))
    state = {
        "point": request.param,
        "run_dir": run_dir,
        "returncode": process.returncode,
        "steps": read_steps(run_dir),
        "evals": read_bytes(os.path.join(run_dir, "evals.jsonl")).decode().splitlines(),
        "checkpoint": load_checkpoint_payload(run_dir) if has_checkpoint else None,
    }
    arguments = ["train", "--resume", run_dir, *resume_options]
    if resume_in_subprocess:
        log_path = str(folder / "resume-log.txt")
        state["resume_exit_code"] = launch(arguments, log_path).wait(timeout=300)
        state["resume_output"] = read_bytes(log_path).decode(errors="replace")
    else:
        outcome = invoke(arguments)
        state["resume_exit_code"] = outcome.exit_code
        state["resume_output"] = outcome.output
    return state


def test_kill_point_reached(killed):
    # A kill that lands elsewhere would test another case than the one named.
    assert killed["returncode"] == -signal.SIGKILL
    lines = len(killed["steps"])
    if killed["point"] == "before_checkpoint":
        assert killed["checkpoint"] is None
        assert 1 <= lines < 3
    elif killed["point"] == "at_checkpoint":
        assert killed["checkpoint"]["loop"]["next_step"] == 3
        assert lines == 3
    else:
        assert killed["checkpoint"]["loop"]["next_step"] == 3
        assert lines >= 5
        # The evaluation at step 4 is on disk but not in the checkpoint, so the resume
        # must cut evals.jsonl back as well as steps.jsonl.
        assert json.loads(killed["evals"][0])["step"] == 4


def test_resume_exits_zero(killed):
    assert killed["resume_exit_code"] == 0, killed["resume_output"]


def test_resume_matches_uninterrupted(killed, reference):
    run_dir = killed["run_dir"]
    resumed = read_json(os.path.join(run_dir, "result.json"))
    expected = read_json(os.path.join(reference, "result.json"))
    assert resumed["final_params_sha256"] == expected["final_params_sha256"]
    assert read_bytes(os.path.join(run_dir, "steps.jsonl")) == read_bytes(os.path.join(reference, "steps.jsonl"))
    assert read_bytes(os.path.join(run_dir, "evals.jsonl")) == read_bytes(os.path.join(reference, "evals.jsonl"))
    assert without_timing(resumed) == without_timing(expected)


def test_ledger_after_kill(killed, reference):
    # Every release reaches steps.jsonl before the weights move, so the last line on disk
    # after a kill is the uninterrupted run's line for that step, MI spent included.
    expected = read_steps(reference)
    last = killed["steps"][-1]
    assert last == expected[last["step"]]
    assert last["mi_spent"] == expected[last["step"]]["mi_spent"]
    if killed["checkpoint"] is not None:
        # The checkpoint's ledger is the MI spent after exactly the steps it covers.
        covered = killed["checkpoint"]["loop"]["next_step"]
        assert killed["checkpoint"]["rule"]["mi_spent"] == expected[covered - 1]["mi_spent"]


def test_ledger_not_double_counted(killed, reference):
    run_dir = killed["run_dir"]
    resumed = read_json(os.path.join(run_dir, "result.json"))
    records = read_steps(run_dir)
    assert resumed["mi_spent_nats"] == read_json(os.path.join(reference, "result.json"))["mi_spent_nats"]
    assert [r["step"] for r in records] == list(range(12))
    assert sum(r["mi_step"] for r in records) == pytest.approx(resumed["mi_spent_nats"], rel=1e-12)


def test_resume_after_last_checkpoint(tmp_path, reference):
    # This is a kill after the last step's checkpoint but before result.json, so the
    # resume runs no step and only finishes the run.
    run_dir = str(tmp_path / "run")
    shutil.copytree(reference, run_dir)
    os.remove(os.path.join(run_dir, "result.json"))
    outcome = invoke(["train", "--resume", run_dir])
    assert outcome.exit_code == 0, outcome.output
    assert without_timing(read_json(os.path.join(run_dir, "result.json"))) == \
        without_timing(read_json(os.path.join(reference, "result.json")))
    assert read_bytes(os.path.join(run_dir, "steps.jsonl")) == read_bytes(os.path.join(reference, "steps.jsonl"))


class Crash(Exception):
    """Exception raised from on_step in place of a crash of the training process."""


def crash_after(steps_run: int):
    def on_step(record: dict) -> None:
        if record["steps_run"] == steps_run:
            raise Crash()
    return on_step


def crashed_run_folder(parent, model_dir: str, data_dir: str) -> str:
    """Run the kill configuration in this process, stop it after step 7 (checkpoint at 6) and return its folder."""
    run_dir = str(parent / "run")
    with pytest.raises(Crash):
        paczero.train(kill_config(model_dir, data_dir, run_dir), on_step=crash_after(7))
    return run_dir


@pytest.fixture
def crashed_run(tmp_path, tiny_model_dir, sst2_dir) -> str:
    return crashed_run_folder(tmp_path, tiny_model_dir, sst2_dir)


@pytest.fixture(scope="module")
def unfinished_run(tmp_path_factory, tiny_model_dir, sst2_dir) -> str:
    """A crashed run shared by tests that must leave it unchanged."""
    return crashed_run_folder(tmp_path_factory.mktemp("unfinished"), tiny_model_dir, sst2_dir)


def test_resume_new_eval_every(crashed_run, reference):
    outcome = invoke(["train", "--resume", crashed_run, "--eval-every", "2"])
    assert outcome.exit_code == 0, outcome.output
    result = read_json(os.path.join(crashed_run, "result.json"))
    assert result["final_params_sha256"] == read_json(os.path.join(reference, "result.json"))["final_params_sha256"]
    assert read_bytes(os.path.join(crashed_run, "steps.jsonl")) == read_bytes(os.path.join(reference, "steps.jsonl"))
    # Step 4 was evaluated before the checkpoint at 6, under the old schedule.
    assert [entry["step"] for entry in result["dev_history"]] == [4, 8, 10, 12]


# ---------------------------------------------------------------------------------------
# Rejected resumes
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("option, value", [
    ("--lr", "0.01"),
    ("--mi-budget", "0.5"),
    ("--secret-seed", "6"),
    ("--seed", "1"),
    ("--steps", "20"),
    ("--num-subsets", "4"),
    ("--mode", "zpl"),
])
def test_resume_rejects_changed_option(unfinished_run, option, value):
    before = read_bytes(os.path.join(unfinished_run, "steps.jsonl"))
    line = assert_one_line_error(invoke(["train", "--resume", unfinished_run, option, value]))
    assert line.startswith(f"error: {option} ")
    assert read_bytes(os.path.join(unfinished_run, "steps.jsonl")) == before


def test_resume_rejects_finished_run(reference):
    before = read_bytes(os.path.join(reference, "result.json"))
    line = assert_one_line_error(invoke(["train", "--resume", reference]))
    assert "already finished" in line
    assert read_bytes(os.path.join(reference, "result.json")) == before


def test_resume_rejects_folder_without_config(tmp_path):
    (tmp_path / "steps.jsonl").write_text("")
    line = assert_one_line_error(invoke(["train", "--resume", str(tmp_path)]))
    assert "no config.json" in line


def test_resume_rejects_missing_folder(tmp_path):
    line = assert_one_line_error(invoke(["train", "--resume", str(tmp_path / "absent")]))
    assert "no config.json" in line


@pytest.mark.parametrize("content", ["{not json", '{"version": 1}'])
def test_resume_rejects_broken_config(tmp_path, content):
    (tmp_path / "config.json").write_text(content)
    line = assert_one_line_error(invoke(["train", "--resume", str(tmp_path)]))
    assert "config.json" in line


def test_resume_rejects_broken_checkpoint(tmp_path, unfinished_run):
    run_dir = str(tmp_path / "run")
    shutil.copytree(unfinished_run, run_dir)
    with open(os.path.join(run_dir, paczero.CHECKPOINT), "wb") as handle:
        handle.write(b"truncated")
    outcome = invoke(["train", "--resume", run_dir])
    # Exit code 1 (TrainingError) or 2 (ConfigError) would both do, with one error line.
    assert outcome.exception is None or isinstance(outcome.exception, SystemExit), repr(outcome.exception)
    assert outcome.exit_code in (1, 2)
    assert len(error_lines(outcome.stderr)) == 1
    assert "checkpoint.pt" in error_lines(outcome.stderr)[0]


# ---------------------------------------------------------------------------------------
# Non-finite guard
# ---------------------------------------------------------------------------------------


def test_nan_stops_before_release(tmp_path, monkeypatch, tiny_model_dir, sst2_dir, reference):
    # Capture the model that train loads, so that on_step can poison one of its weights
    # right after the checkpoint at step 6 has been written.
    prepared = []
    real_prepare = paczero.prepare

    def capturing_prepare(*args, **kwargs):
        prepared.append(real_prepare(*args, **kwargs))
        return prepared[-1]

    def poison(record: dict) -> None:
        if record["steps_run"] == 6:
            with torch.no_grad():
                zo.trainable_parameters(prepared[0].model)[0][1].view(-1)[0] = float("nan")

    monkeypatch.setattr(paczero, "prepare", capturing_prepare)
    cfg = kill_config(tiny_model_dir, sst2_dir, str(tmp_path / "run"))
    with pytest.raises(TrainingError, match=r"at step 6 \("):
        paczero.train(cfg, on_step=poison)

    records = read_steps(cfg.output_dir)
    assert [r["step"] for r in records] == list(range(6))
    payload = load_checkpoint_payload(cfg.output_dir)
    assert payload["loop"]["next_step"] == 6
    assert all(bool(torch.isfinite(t).all()) for t in payload["params"].values())
    assert not os.path.exists(os.path.join(cfg.output_dir, "result.json"))

    # The checkpoint contains the last good state, so resuming from it (the NaN was put
    # into the live model only) ends exactly as the uninterrupted run.
    monkeypatch.setattr(paczero, "prepare", real_prepare)
    result = paczero.train(cfg, resume=True)
    assert result["final_params_sha256"] == read_json(os.path.join(reference, "result.json"))["final_params_sha256"]
    assert read_bytes(os.path.join(cfg.output_dir, "steps.jsonl")) == read_bytes(os.path.join(reference, "steps.jsonl"))


def test_nan_cli_exit_one(tmp_path, tiny_model_dir, sst2_dir):
    # A learning rate of 1e30 sends every weight to about 1e30 after step 0, so the
    # losses of step 1 are not finite.
    run_dir = str(tmp_path / "run")
    arguments = ["train", "--model", tiny_model_dir, "--data-dir", sst2_dir, "--output-dir", run_dir,
                 "--pool-size", "32", "--dev-size", "16", "--test-size", "16", "--num-subsets", "8", "--steps", "4",
                 "--no-zero-shot", "--secret-seed", "1", "--device", "cpu", "--tuning", "ft", "--lr", "1e30"]
    line = assert_one_line_error(invoke(arguments), code=1)
    assert "non-finite projected gradient at step 1 " in line
    assert [r["step"] for r in read_steps(run_dir)] == [0]


# ---------------------------------------------------------------------------------------
# --zo-eps below the weights' resolution
# ---------------------------------------------------------------------------------------


def weights_near_one(dtype: torch.dtype) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [(0.5 + torch.rand(4096, generator=generator)).to(dtype)]


def test_rounded_away_fp32_zero():
    assert zo.rounded_away_fraction(weights_near_one(torch.float32), 1e-5) == 0.0


def test_rounded_away_fp16_high():
    # fp16 spaces values in [0.5, 1.5] 2^-11 to 2^-10 apart, so a 1e-5 step rounds away.
    assert zo.rounded_away_fraction(weights_near_one(torch.float16), 1e-5) > 0.99


def test_rounded_away_fp16_large_eps():
    assert zo.rounded_away_fraction(weights_near_one(torch.float16), 1e-2) == 0.0


@pytest.mark.parametrize("eps", [1e-4, 1e-5])
def test_rounded_away_matches_rounding(eps):
    # Compare the estimate with what fp16 rounding does to weights spread over three
    # decades. The estimate takes the spacing as finfo.eps * |w|, up to twice the true
    # spacing within a binade, so it may count too many weights but not many more.
    generator = torch.Generator().manual_seed(1)
    weights = torch.exp(torch.empty(100_000).uniform_(math.log(1e-3), math.log(1.0), generator=generator)).half()
    unchanged = float(((weights.float() + eps).half() == weights).float().mean())
    estimate = zo.rounded_away_fraction([weights], eps)
    assert abs(estimate - unchanged) < 0.1, (estimate, unchanged)


def test_warn_if_rounded_away(caplog):
    with caplog.at_level(logging.WARNING, logger="paczero"):
        zo.warn_if_rounded_away(weights_near_one(torch.float16), 1e-5)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "--zo-eps 1e-05" in warnings[0].getMessage()


def test_no_warning_fp32(caplog):
    with caplog.at_level(logging.WARNING, logger="paczero"):
        zo.warn_if_rounded_away(weights_near_one(torch.float32), 1e-5)
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


# ---------------------------------------------------------------------------------------
# Bad input: exit code 2, one line, no traceback, no run folder
# ---------------------------------------------------------------------------------------


BAD_OPTIONS = {
    "pool-larger-than-data": (["--pool-size", "400"], "exceeds the 300 training examples"),
    "pool-plus-dev-too-large": (["--pool-size", "290", "--dev-size", "16"], "pool size 290 + dev size 16"),
    "odd-num-subsets": (["--num-subsets", "7"], "--num-subsets must be an even integer >= 2"),
    "zero-num-subsets": (["--num-subsets", "0"], "--num-subsets must be an even integer >= 2"),
    "negative-num-subsets": (["--num-subsets", "-2"], "--num-subsets must be an even integer >= 2"),
    "zero-mi-budget": (["--mode", "mi", "--mi-budget", "0"], "--mode mi needs --mi-budget"),
    "negative-mi-budget": (["--mode", "mi", "--mi-budget", "-0.3"], "--mode mi needs --mi-budget"),
    "infinite-mi-budget": (["--mode", "mi", "--mi-budget", "inf"], "--mode mi needs --mi-budget"),
    "zero-lr": (["--lr", "0"], "--lr must be a positive number"),
    "negative-lr": (["--lr", "-1e-3"], "--lr must be a positive number"),
    "nan-zo-eps": (["--zo-eps", "nan"], "--zo-eps must be a positive number"),
    "zero-steps": (["--steps", "0"], "--steps must be a positive number"),
    "negative-save-every": (["--save-every", "-1"], "--save-every must be 0 (never) or positive"),
    "missing-model": (["--model", "/nonexistent/tiny-model"], "could not load model '/nonexistent/tiny-model'"),
    "unknown-template": (["--template", "nope"], "unknown template 'nope'"),
    "unknown-task": (["--task", "mnli"], "invalid --task 'mnli'"),
    "unknown-mode": (["--mode", "dp"], "invalid --mode 'dp'"),
    "missing-data-dir": (["--data-dir", "/nonexistent/sst2"], "SST-2 file not found: /nonexistent/sst2/train.tsv"),
    "unknown-lora-target": (["--lora-targets", "nope_proj"], "LoRA target modules ['nope_proj'] not found"),
    "unavailable-cuda": (["--device", "cuda"], "CUDA is not available"),
    "zpl-with-mi-budget": (["--mi-budget", "0.3"], "--mi-budget applies to --mode mi only"),
}


def small_train_arguments(model_dir: str, data_dir: str, output_dir: str) -> list[str]:
    return ["train", "--model", model_dir, "--data-dir", data_dir, "--output-dir", output_dir,
            "--pool-size", "32", "--dev-size", "16", "--test-size", "16", "--num-subsets", "8",
            "--steps", "4", "--no-zero-shot", "--secret-seed", "1", "--device", "cpu"]


@pytest.mark.parametrize("case", list(BAD_OPTIONS))
def test_train_rejects_option(tmp_path, tiny_model_dir, sst2_dir, case):
    extra, message = BAD_OPTIONS[case]
    run_dir = str(tmp_path / "run")
    outcome = invoke(small_train_arguments(tiny_model_dir, sst2_dir, run_dir) + extra)
    line = assert_one_line_error(outcome)
    assert message in line
    assert_no_run_folder(run_dir)


GOOD_ROW = "a warm film , quite warm \t1\n"

# train.tsv contents; dev.tsv stays valid.
BAD_TRAIN_FILES = {
    "wrong-columns": ("text\tlabel\n" + GOOD_ROW * 60, "expected a header with 'sentence' and 'label'"),
    "label-two": ("sentence\tlabel\n" + GOOD_ROW * 60 + "a dull plot \t2\n", "label '2' is not 0 or 1"),
    "label-word": ("sentence\tlabel\n" + GOOD_ROW * 60 + "a dull plot \tneg\n", "label 'neg' is not 0 or 1"),
    "missing-field": ("sentence\tlabel\n" + GOOD_ROW * 60 + "a dull plot with no label\n",
                      "expected 2 tab-separated fields, got 1"),
    "empty-file": ("", "SST-2 file is empty"),
    "header-only": ("sentence\tlabel\n", "has a header but no rows"),
}


@pytest.mark.parametrize("case", list(BAD_TRAIN_FILES))
def test_train_rejects_tsv(tmp_path, tiny_model_dir, sst2_dir, case):
    content, message = BAD_TRAIN_FILES[case]
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.tsv").write_text(content, encoding="utf-8")
    shutil.copy(os.path.join(sst2_dir, "dev.tsv"), data_dir / "dev.tsv")
    run_dir = str(tmp_path / "run")
    line = assert_one_line_error(invoke(small_train_arguments(tiny_model_dir, str(data_dir), run_dir)))
    assert message in line
    assert_no_run_folder(run_dir)


def test_train_rejects_missing_dev_file(tmp_path, tiny_model_dir, sst2_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    shutil.copy(os.path.join(sst2_dir, "train.tsv"), data_dir / "train.tsv")
    run_dir = str(tmp_path / "run")
    line = assert_one_line_error(invoke(small_train_arguments(tiny_model_dir, str(data_dir), run_dir)))
    assert "dev.tsv" in line
    assert_no_run_folder(run_dir)


def test_train_rejects_non_utf8_tsv(tmp_path, tiny_model_dir, sst2_dir):
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "train.tsv").write_bytes(b"sentence\tlabel\n" + GOOD_ROW.encode() * 60 + b"caf\xe9 noir \t1\n")
    shutil.copy(os.path.join(sst2_dir, "dev.tsv"), data_dir / "dev.tsv")
    run_dir = str(tmp_path / "run")
    line = assert_one_line_error(invoke(small_train_arguments(tiny_model_dir, str(data_dir), run_dir)))
    assert "train.tsv" in line
    assert_no_run_folder(run_dir)


def test_train_rejects_output_file(tmp_path, tiny_model_dir, sst2_dir):
    path = tmp_path / "taken"
    path.write_text("not a folder")
    line = assert_one_line_error(invoke(small_train_arguments(tiny_model_dir, sst2_dir, str(path))))
    assert str(path) in line
    assert path.read_text() == "not a folder"


def test_train_rejects_empty_model_folder(tmp_path, sst2_dir):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    run_dir = str(tmp_path / "run")
    line = assert_one_line_error(invoke(small_train_arguments(str(model_dir), sst2_dir, run_dir)))
    assert "could not load model" in line
    assert_no_run_folder(run_dir)


def test_train_rejects_nonempty_output(tmp_path, tiny_model_dir, sst2_dir):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    line = assert_one_line_error(invoke(small_train_arguments(tiny_model_dir, sst2_dir, str(run_dir))))
    assert "is not empty" in line
    assert os.listdir(run_dir) == ["notes.txt"]


def test_output_lock_refuses_second_holder(tmp_path):
    first = paczero.lock_output_dir(str(tmp_path))
    try:
        with pytest.raises(paczero.ConfigError, match="in use by another paczero process"):
            paczero.lock_output_dir(str(tmp_path))
    finally:
        os.close(first)
    os.close(paczero.lock_output_dir(str(tmp_path)))  # free again once the holder closes it


def test_check_writable_names_the_folder(tmp_path):
    # The probe file's name taken by a folder makes the write fail as a read-only folder
    # would, without needing a user that file permissions apply to.
    (tmp_path / ".paczero-write-test").mkdir()
    with pytest.raises(paczero.ConfigError, match=f"output folder {tmp_path} is not writable"):
        paczero.check_writable(str(tmp_path))
    paczero.check_writable(str(tmp_path / ".paczero-write-test"))  # an ordinary folder passes


def test_train_refuses_locked_output(tmp_path, tiny_model_dir, sst2_dir):
    # Another process has locked the run folder. Here it is this process, through a second open file.
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    holder = paczero.lock_output_dir(str(run_dir))
    try:
        line = assert_one_line_error(invoke(small_train_arguments(tiny_model_dir, sst2_dir, str(run_dir))))
    finally:
        os.close(holder)
    assert "is in use by another paczero process" in line
    assert_no_run_folder(str(run_dir))


# ---------------------------------------------------------------------------------------
# Monte Carlo audit of the release mechanism
# ---------------------------------------------------------------------------------------

MC_SUBSETS = 4
MC_STEPS = 4
MC_BUDGET = 0.3
MC_RUNS = 60


def mc_posterior(records: list[dict], num_subsets: int) -> np.ndarray:
    """Compute the adversary's posterior over the subset indices from the logged releases.

    It is written from the definition, not from mechanisms.py. Under S* = m, a noisy
    release r_t has likelihood N(r_t; s_m, sigma_t^2), and a noiseless one (unanimous or
    certain) has likelihood 1 if s_m equals the released sign and 0 otherwise. A public
    coin has the same likelihood under every m. Log-likelihoods are summed and normalised
    once at the end, so a run that learns nothing yields exactly 1/M for every subset.
    """
    log_likelihood = np.zeros(num_subsets)
    for record in records:
        signs = np.asarray(record["subset_signs"], dtype=np.float64)
        kind = record["release_kind"]
        if kind == "noisy":
            log_likelihood += -((signs - record["raw_release"]) ** 2) / (2.0 * record["sigma"] ** 2)
        elif kind in ("unanimous", "certain"):
            log_likelihood += np.where(signs == record["release"], 0.0, -np.inf)
        elif kind != "coin":
            raise AssertionError(f"release kind {kind!r} has no likelihood here")
    weights = np.exp(log_likelihood - log_likelihood.max())
    return weights / weights.sum()


@pytest.fixture(scope="module")
def mc_setup(tiny_model_dir, sst2_dir):
    """The prepared tiny problem (pool 16, M = 4, T = 4), loaded once, and its initial weights."""
    cfg = paczero.resolve_defaults(TrainConfig(
        model=tiny_model_dir, data_dir=sst2_dir, pool_size=16, dev_size=4, test_size=4, num_subsets=MC_SUBSETS,
        steps=MC_STEPS, eval_every=0, save_every=0, zero_shot=False, mode="mi", mi_budget=MC_BUDGET,
        secret_seed=0, device="cpu", output_dir="-"))
    prepared = paczero.prepare(cfg)
    initial = paczero.snapshot(zo.trainable_parameters(prepared.model))
    return cfg, prepared, initial


def mc_runs(tmp_path, monkeypatch, mc_setup, mode: str, count: int) -> list[dict]:
    """`count` runs of paczero.train on the prepared problem, each with fresh public and secret seeds.

    train reuses the loaded model through a wrapped prepare, which resets its weights
    first. Returns per run the secret index, the posterior from steps.jsonl and the
    charged MI.
    """
    cfg, prepared, initial = mc_setup
    named = zo.trainable_parameters(prepared.model)

    def reuse_prepared(*args, **kwargs):
        paczero.load_snapshot(named, initial)
        return prepared

    monkeypatch.setattr(paczero, "prepare", reuse_prepared)
    draws = np.random.default_rng(20240607)
    outcomes = []
    for n in range(count):
        seed, secret_seed = (int(x) for x in draws.integers(2**62, size=2))
        run_cfg = dataclasses.replace(cfg, mode=mode, mi_budget=MC_BUDGET if mode == "mi" else None, seed=seed,
                                      secret_seed=secret_seed, num_subsets=MC_SUBSETS, output_dir=str(tmp_path / f"run{n}"))
        result = paczero.train(run_cfg)
        records = read_steps(run_cfg.output_dir)
        outcomes.append({
            "secret": mechanisms.draw_secret_index(np.random.default_rng(secret_seed), MC_SUBSETS),
            "posterior": mc_posterior(records, MC_SUBSETS),
            "charged": result["mi_spent_nats"],
            "kinds": [r["release_kind"] for r in records],
        })
    return outcomes


def test_mi_estimate_within_charge(tmp_path, monkeypatch, mc_setup):
    # With a uniform prior, Bayes gives p_T(s) = p(Y | s) / (M p(Y)), so
    # log(M p_T(S*)) = log p(Y | S*) - log p(Y), whose mean over runs (S* drawn uniformly,
    # Y from the mechanism) is I(S*; Y_1..Y_T) by definition, and the mean over
    # independent runs is an unbiased estimate of it. PACZero-MI charges at least the MI
    # of every step given the past, and by the chain rule their sum bounds I(S*; Y_1..Y_T).
    outcomes = mc_runs(tmp_path, monkeypatch, mc_setup, "mi", MC_RUNS)
    samples = np.array([math.log(MC_SUBSETS * o["posterior"][o["secret"]]) for o in outcomes])
    estimate = samples.mean()
    standard_error = samples.std(ddof=1) / math.sqrt(len(samples))
    charged = np.array([o["charged"] for o in outcomes])
    assert np.all(charged <= MC_BUDGET + 1e-9)
    assert estimate <= charged.mean() + 3 * standard_error, (estimate, standard_error, charged.mean())

    # Given Y, S* is distributed as the posterior, so log M - H(p_T) has the same mean
    # with less variance. On this problem its standard error is about a third of the
    # other's, and the same bound must hold for it.
    entropies = np.array([-(p[p > 0] * np.log(p[p > 0])).sum() for p in (o["posterior"] for o in outcomes)])
    reduction = math.log(MC_SUBSETS) - entropies
    reduction_error = reduction.std(ddof=1) / math.sqrt(len(reduction))
    assert reduction.mean() <= charged.mean() + 3 * reduction_error, (reduction.mean(), charged.mean())

    # The two estimates agree only if the logged releases are centred on the sign of the
    # true S*. A log that pointed elsewhere would drag log(M p_T(S*)) down.
    gaps = samples - reduction
    assert abs(gaps.mean()) <= 3 * gaps.std(ddof=1) / math.sqrt(len(gaps)), (estimate, reduction.mean())

    # The bound has power only if the runs leak: noisy releases were made and the
    # posterior moved away from uniform.
    assert any("noisy" in o["kinds"] for o in outcomes)
    assert reduction.mean() > 3 * reduction_error, (reduction.mean(), reduction_error)


def test_zpl_estimate_zero(tmp_path, monkeypatch, mc_setup):
    outcomes = mc_runs(tmp_path, monkeypatch, mc_setup, "zpl", MC_RUNS // 2)
    samples = [math.log(MC_SUBSETS * o["posterior"][o["secret"]]) for o in outcomes]
    assert all(s == 0.0 for s in samples), samples
    # Subsets that disagree make ZPL release a coin, and without such steps the check is empty.
    assert any("coin" in o["kinds"] for o in outcomes)


# ---------------------------------------------------------------------------------------
# Membership-inference audit
# ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=["zpl", "raw_half"])
def audited(request, tmp_path_factory, tiny_model_dir, sst2_dir) -> tuple[str, dict]:
    """A finished pool-64 run (ZPL with LoRA, or raw_half with full fine-tuning at lr 0.1) and its audit."""
    run_dir = str(tmp_path_factory.mktemp(request.param) / "run")
    options = dict(tuning="lora") if request.param == "zpl" else dict(tuning="ft", lr=0.1)
    cfg = TrainConfig(model=tiny_model_dir, data_dir=sst2_dir, output_dir=run_dir, pool_size=64, dev_size=16,
                      test_size=16, num_subsets=8, steps=6, eval_every=0, zero_shot=False, mode=request.param,
                      secret_seed=3, device="cpu", **options)
    paczero.train(cfg)
    return run_dir, audit.audit_run(run_dir, resamples=200)


@pytest.mark.parametrize("audited", ["zpl", "raw_half"], indirect=True)
def test_audit_cli_note(audited, tmp_path):
    # raw_half trains on S* alone, so the note expects the attack to find S*. ZPL protects
    # S* and gets no note. The audit runs on a copy because it rewrites audit.json, which
    # other tests read from the shared run.
    run_dir = shutil.copytree(audited[0], tmp_path / os.path.basename(os.path.dirname(audited[0])))
    run_dir = str(run_dir)
    outcome = invoke(["audit", run_dir, "--resamples", "20"])
    assert outcome.exit_code == 0, outcome.output
    text = " ".join(outcome.stdout.split())
    if "raw_half" in run_dir:
        assert "trains on S* alone with no privacy mechanism" in text
    else:
        assert "note:" not in text


def test_audit_auc_range(audited):
    _, figures = audited
    assert 0.0 <= figures["auc"] <= 1.0


def test_audit_ci_contains_auc(audited):
    _, figures = audited
    low, high = figures["auc_ci95"]
    assert low <= figures["auc"] <= high


def test_audit_writes_json(audited):
    run_dir, figures = audited
    assert read_json(os.path.join(run_dir, "audit.json")) == json.loads(json.dumps(figures))


def test_audit_members_are_secret_row(audited):
    run_dir, figures = audited
    cfg = TrainConfig(**read_json(os.path.join(run_dir, "config.json"))["options"])
    membership = mechanisms.membership_matrix(64, cfg.num_subsets, np.random.default_rng(cfg.seed))
    secret = mechanisms.draw_secret_index(np.random.default_rng(cfg.secret_seed), cfg.num_subsets)
    members = audit.secret_members(cfg, 64)
    assert members.dtype == bool
    assert np.array_equal(members, membership[secret].numpy())
    assert figures["members"] == int(members.sum())


@pytest.mark.parametrize("audited", ["raw_half"], indirect=True)
def test_audit_secret_matches_log(audited):
    # raw_half releases the secret subset's mean, so its sign is the logged sign of the
    # subset that secret_members picks. A wrong S* would disagree on some step.
    run_dir, _ = audited
    cfg = TrainConfig(**read_json(os.path.join(run_dir, "config.json"))["options"])
    membership = mechanisms.membership_matrix(64, cfg.num_subsets, np.random.default_rng(cfg.seed)).numpy()
    members = audit.secret_members(cfg, 64)
    secret = [m for m in range(cfg.num_subsets) if np.array_equal(membership[m], members)]
    assert len(secret) == 1
    records = read_steps(run_dir)
    released_signs = [1 if r["release"] >= 0 else -1 for r in records]
    assert released_signs == [r["subset_signs"][secret[0]] for r in records]
    # The check distinguishes subsets only if some other subset's signs differ.
    assert any(r["positive_subsets"] not in (0, cfg.num_subsets) for r in records)


def test_audit_finds_memorised_secret_subset(tmp_path, tiny_model_dir, sst2_dir):
    # The attack's power: raw_half trained hard on S* alone (16-example pool, 300 full
    # fine-tuning steps at lr 0.1) memorises its 8 members, and the attack must see it.
    # Measured when written: AUC 0.23 at the initial weights, 0.79 after training, member
    # loss 0.001 against 1.19 for non-members.
    run_dir = str(tmp_path / "run")
    paczero.train(TrainConfig(model=tiny_model_dir, data_dir=sst2_dir, output_dir=run_dir, pool_size=16, dev_size=16,
                              test_size=16, num_subsets=8, steps=300, eval_every=0, zero_shot=False, mode="raw_half",
                              secret_seed=3, device="cpu", tuning="ft", lr=0.1))
    figures = audit.audit_run(run_dir, resamples=200)
    assert figures["auc"] > figures["auc_initial_weights"] + 0.3, figures
    assert figures["mean_loss_members"] < 0.1 * figures["mean_loss_non_members"], figures


def test_audit_cli_unfinished_run(unfinished_run):
    line = assert_one_line_error(invoke(["audit", unfinished_run]))
    assert "result.json not found" in line


@pytest.mark.parametrize("scores, members, expected", [
    ([0.1, 0.2, 0.8, 0.9], [False, False, True, True], 1.0),
    ([0.1, 0.2, 0.8, 0.9], [True, True, False, False], 0.0),
    ([0.5, 0.5, 0.5, 0.5], [True, False, True, False], 0.5),
    ([1.0, 2.0, 3.0, 4.0], [True, False, True, False], 0.25),
    ([1.0, 1.0, 2.0], [True, False, False], 0.25),
], ids=["perfect", "reversed", "all-ties", "interleaved", "one-tie"])
def test_roc_auc_hand_cases(scores, members, expected):
    assert audit.roc_auc(np.array(scores), np.array(members)) == expected


def test_roc_auc_needs_both_classes():
    with pytest.raises(ValueError, match="at least one member and one non-member"):
        audit.roc_auc(np.array([0.1, 0.2]), np.array([True, True]))
