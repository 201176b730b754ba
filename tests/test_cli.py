"""The command line: a tiny `train` run, `eval --run-dir` on it, and rejected input."""

from __future__ import annotations

import json
import os

import pytest
from typer.testing import CliRunner

import cli

STEP_KEYS = {"step", "seed", "unanimous", "positive_subsets", "release", "release_kind", "sigma", "mi_step",
             "mi_spent", "lr", "loss"}
RESULT_KEYS = {"test_metric", "zero_shot_test_metric", "best_dev_metric", "best_step", "steps_run", "mi_spent_nats",
               "mia_bound", "matched_epsilon", "unanimous_steps", "trainable_params", "final_params_sha256",
               "seconds_per_step"}


def train_arguments(model_dir: str, data_dir: str, output_dir: str) -> list[str]:
    return ["train", "--model", model_dir, "--data-dir", data_dir, "--output-dir", output_dir,
            "--pool-size", "32", "--dev-size", "16", "--test-size", "16", "--num-subsets", "8",
            "--steps", "6", "--eval-every", "3", "--secret-seed", "1", "--device", "cpu"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir, sst2_dir):
    output_dir = str(tmp_path_factory.mktemp("cli") / "run")
    outcome = CliRunner().invoke(cli.app, train_arguments(tiny_model_dir, sst2_dir, output_dir))
    assert outcome.exit_code == 0, outcome.output
    return output_dir


def read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def test_train_writes_config(run_dir):
    config = read_json(os.path.join(run_dir, "config.json"))
    assert config["options"]["num_subsets"] == 8
    assert config["options"]["secret_seed"] == 1
    assert config["split_sizes"] == {"pool": 32, "dev": 16, "test": 16}


def test_train_writes_steps(run_dir):
    with open(os.path.join(run_dir, "steps.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    assert [r["step"] for r in records] == list(range(6))
    for record in records:
        assert STEP_KEYS <= set(record), STEP_KEYS - set(record)
    with open(os.path.join(run_dir, "evals.jsonl"), encoding="utf-8") as handle:
        evals = [json.loads(line) for line in handle]
    assert [e["step"] for e in evals] == [3, 6]


def test_train_writes_result(run_dir):
    result = read_json(os.path.join(run_dir, "result.json"))
    assert RESULT_KEYS <= set(result), RESULT_KEYS - set(result)
    assert result["steps_run"] == 6
    assert result["mi_spent_nats"] == 0.0


def test_train_writes_best_weights(run_dir):
    result = read_json(os.path.join(run_dir, "result.json"))
    assert result["best_weights"] == "best_adapter"
    assert os.path.isfile(os.path.join(run_dir, "best_adapter", "adapter_model.safetensors"))


def test_eval_run_dir_accuracy(run_dir):
    outcome = CliRunner().invoke(cli.app, ["eval", "--run-dir", run_dir, "--device", "cpu"])
    assert outcome.exit_code == 0, outcome.output
    test_metric = read_json(os.path.join(run_dir, "result.json"))["test_metric"]
    assert f"{test_metric:.4f}" in outcome.stdout


@pytest.mark.parametrize("extra, named", [
    (["--test-size", "4"], "--test-size"),
    (["--model", "gpt2", "--template", "instruct"], "--model, --template"),
], ids=["test-size", "model-and-template"])
def test_eval_run_dir_refuses_run_options(run_dir, extra, named):
    # These are fixed by the run's config.json; accepting them would evaluate something else
    # than the user asked for without a word.
    outcome = CliRunner().invoke(cli.app, ["eval", "--run-dir", run_dir] + extra)
    assert outcome.exit_code == 2, outcome.output
    assert f"{named} cannot be combined with --run-dir" in outcome.stderr


def test_eval_run_dir_dtype(run_dir):
    # bf16 weights change the tiny model's scores, so the accuracy line need not match, but
    # the run must load and evaluate in the requested dtype without an error.
    outcome = CliRunner().invoke(cli.app, ["eval", "--run-dir", run_dir, "--device", "cpu", "--dtype", "bf16"])
    assert outcome.exit_code == 0, outcome.output
    assert "16" in outcome.stdout  # the test split's size


def test_train_warns_unused_options(tmp_path, tiny_model_dir, sst2_dir):
    # A later --steps or --eval-every overrides the earlier one: a one-step run is enough.
    arguments = train_arguments(tiny_model_dir, sst2_dir, str(tmp_path / "run")) + ["--steps", "1", "--eval-every", "1"]
    outcome = CliRunner().invoke(cli.app, arguments + ["--tuning", "ft", "--lora-rank", "4", "--max-new-tokens", "9"])
    assert outcome.exit_code == 0, outcome.output
    assert "--lora-rank has no effect here (it applies to --tuning lora)" in outcome.stderr
    assert "--max-new-tokens has no effect here (it applies to --task squad or generation)" in outcome.stderr
    assert "--pool-size has no effect" not in outcome.stderr


def test_train_rejects_data_for_sst2(tmp_path, tiny_model_dir, sst2_dir):
    arguments = train_arguments(tiny_model_dir, sst2_dir, str(tmp_path / "run")) + ["--data", "reviews.csv"]
    outcome = CliRunner().invoke(cli.app, arguments)
    assert outcome.exit_code == 2
    assert "error: --data applies to --task classification or generation; for sst2 use --data-dir" in outcome.stderr
    assert "warning" not in outcome.stderr
    assert not os.path.exists(tmp_path / "run")


def test_train_warns_clip_with_random_sign(tmp_path, tiny_model_dir, sst2_dir):
    arguments = train_arguments(tiny_model_dir, sst2_dir, str(tmp_path / "run")) + [
        "--steps", "1", "--eval-every", "1", "--mode", "random_sign", "--clip", "3"]
    outcome = CliRunner().invoke(cli.app, arguments)
    assert outcome.exit_code == 0, outcome.output
    assert "--clip has no effect here (it applies to every mode but random_sign and mezo)" in outcome.stderr


def test_eval_warns_unused_options(tiny_model_dir, sst2_dir):
    outcome = CliRunner().invoke(cli.app, ["eval", "--model", tiny_model_dir, "--data-dir", sst2_dir, "--device", "cpu",
                                           "--test-size", "8", "--label-words", "a,b"])
    assert outcome.exit_code == 0, outcome.output
    assert "--label-words has no effect here (it applies to --task classification)" in outcome.stderr


def test_resume_output_dir_trailing_slash(run_dir):
    # The same folder written two ways is not a different folder.
    options = read_json(os.path.join(run_dir, "config.json"))["options"]
    resumed = cli.resumed_options(run_dir, {**options, "output_dir": run_dir + "/"}, {"output_dir"})
    assert resumed["output_dir"] == run_dir


def test_eval_missing_run_dir(tmp_path):
    outcome = CliRunner().invoke(cli.app, ["eval", "--run-dir", str(tmp_path)])
    assert outcome.exit_code == 2
    assert "no config.json" in outcome.stderr


@pytest.mark.parametrize("extra, message", [
    (["--num-subsets", "7"], "--num-subsets must be an even integer >= 2 (each example joins exactly half), got 7"),
    (["--mode", "mi"], "--mode mi needs --mi-budget, a positive number of nats (for example 0.33), got None"),
    (["--lr", "0"], "--lr must be a positive number, got 0.0"),
    (["--template", "nope"], "unknown template 'nope' for task 'sst2'; choose one of mezo, instruct"),
], ids=["odd-subsets", "mi-without-budget", "zero-lr", "unknown-template"])
def test_train_bad_input(tmp_path, tiny_model_dir, sst2_dir, extra, message):
    arguments = train_arguments(tiny_model_dir, sst2_dir, str(tmp_path / "run")) + extra
    outcome = CliRunner().invoke(cli.app, arguments)
    assert outcome.exit_code == 2
    assert "Traceback" not in outcome.output
    # The whole message sits on the last line of stderr, even when it is wider than the
    # 80 columns rich assumes for a stream that is not a terminal.
    lines = outcome.stderr.rstrip("\n").splitlines()
    assert lines[-1] == f"error: {message}"
    assert sum(line.startswith("error:") for line in lines) == 1
