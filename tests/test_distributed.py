"""Data parallelism: two gloo processes must reproduce a single-process run bit for bit."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT


def run_cli(args: list[str], processes: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if processes == 1:
        command = [sys.executable, "cli.py", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                   "--master-port", "29533", "cli.py", *args]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def read(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


@pytest.fixture(scope="module")
def paired_runs(tmp_path_factory, tiny_model_dir, sst2_dir):
    """The same MI run with one process and with two (gloo on CPU)."""
    root = tmp_path_factory.mktemp("distributed")
    common = ["train", "--model", tiny_model_dir, "--data-dir", sst2_dir, "--pool-size", "40", "--num-subsets", "8",
              "--steps", "5", "--eval-every", "5", "--dev-size", "16", "--test-size", "24", "--secret-seed", "3",
              "--mode", "mi", "--mi-budget", "0.2", "--micro-batch-size", "8", "--no-zero-shot"]
    single = run_cli(common + ["--output-dir", str(root / "one")], processes=1)
    double = run_cli(common + ["--output-dir", str(root / "two")], processes=2)
    return root, single, double


def test_two_processes_exit_zero(paired_runs):
    _, single, double = paired_runs
    assert single.returncode == 0, single.stderr[-2000:]
    assert double.returncode == 0, double.stderr[-2000:]


def test_two_processes_same_releases(paired_runs):
    root, _, _ = paired_runs
    assert read(root / "one" / "steps.jsonl") == read(root / "two" / "steps.jsonl")


def test_two_processes_same_weights(paired_runs):
    root, _, _ = paired_runs
    one = json.loads(read(root / "one" / "result.json"))
    two = json.loads(read(root / "two" / "result.json"))
    assert one["final_params_sha256"] == two["final_params_sha256"]
    assert one["test_metric"] == two["test_metric"]
    assert two["processes"] == 2
