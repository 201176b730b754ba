"""End-to-end runs of the training loop on the tiny OPT: privacy invariants and the run folder."""

from __future__ import annotations

import json
import os

import pytest

import mechanisms
import paczero
import zo
from paczero import ConfigError, TrainConfig


def tiny_config(tmp_path, model_dir: str, data_dir: str, name: str, **options) -> TrainConfig:
    settings = dict(model=model_dir, data_dir=data_dir, pool_size=32, dev_size=16, test_size=16, num_subsets=8,
                    steps=15, eval_every=5, seed=0, secret_seed=1, device="cpu", output_dir=str(tmp_path / name))
    settings.update(options)
    return TrainConfig(**settings)


def read_steps(result_dir: str) -> list[dict]:
    with open(os.path.join(result_dir, "steps.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def read_text(path: str) -> str:
    with open(path, encoding="utf-8") as handle:
        return handle.read()


# ---------------------------------------------------------------------------------------
# Privacy invariants of whole runs
# ---------------------------------------------------------------------------------------


def test_zpl_run_ignores_secret(tmp_path, tiny_model_dir, sst2_dir):
    results, logs = [], []
    for secret_seed in (1, 2, 12345):
        cfg = tiny_config(tmp_path, tiny_model_dir, sst2_dir, f"secret{secret_seed}", mode="zpl",
                          secret_seed=secret_seed)
        results.append(paczero.train(cfg))
        logs.append(read_text(os.path.join(cfg.output_dir, "steps.jsonl")))

    # The check is only meaningful if the subsets disagree somewhere, so that releasing
    # the secret subset's sign would make the runs differ.
    records = [json.loads(line) for line in logs[0].splitlines()]
    assert any(0 < r["positive_subsets"] < 8 for r in records)
    assert logs[1] == logs[0]
    assert logs[2] == logs[0]
    assert results[1]["final_params_sha256"] == results[0]["final_params_sha256"]
    assert results[2]["final_params_sha256"] == results[0]["final_params_sha256"]
    assert results[0]["mi_spent_nats"] == 0.0


def test_zpl_run_depends_on_seed(tmp_path, tiny_model_dir, sst2_dir):
    first = paczero.train(tiny_config(tmp_path, tiny_model_dir, sst2_dir, "seed0", seed=0))
    other = paczero.train(tiny_config(tmp_path, tiny_model_dir, sst2_dir, "seed1", seed=1))
    assert other["final_params_sha256"] != first["final_params_sha256"]


def test_mi_run_uses_secret(tmp_path, tiny_model_dir, sst2_dir):
    raw = {}
    hashes = {}
    for name, secret_seed in (("a", 1), ("b", 1), ("c", 2)):
        cfg = tiny_config(tmp_path, tiny_model_dir, sst2_dir, name, mode="mi", mi_budget=0.3,
                          secret_seed=secret_seed)
        hashes[name] = paczero.train(cfg)["final_params_sha256"]
        raw[name] = [r["raw_release"] for r in read_steps(cfg.output_dir)]
    assert raw["b"] == raw["a"]
    assert hashes["b"] == hashes["a"]
    assert raw["c"] != raw["a"]


def test_mi_run_within_budget(tmp_path, tiny_model_dir, sst2_dir):
    budget = 0.3
    cfg = tiny_config(tmp_path, tiny_model_dir, sst2_dir, "mi", mode="mi", mi_budget=budget)
    result = paczero.train(cfg)
    records = read_steps(cfg.output_dir)
    assert all(r["mi_spent"] <= budget for r in records)
    assert sum(r["mi_step"] for r in records) == pytest.approx(result["mi_spent_nats"], rel=1e-12)
    assert result["mi_spent_nats"] <= budget
    assert result["mi_spent_nats"] >= budget - 1e-6
    assert result["mia_bound"] == mechanisms.mia_success_bound(result["mi_spent_nats"])
    assert result["matched_epsilon"] == mechanisms.matched_epsilon(result["mia_bound"])


# ---------------------------------------------------------------------------------------
# Run folder and reloading
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("tuning, mode", [("lora", "zpl"), ("ft", "mezo")])
def test_saved_weights_reload(tmp_path, tiny_model_dir, sst2_dir, tuning, mode):
    # With evaluation only at the last step, the dev-best weights are the final ones, so
    # the saved weights must hash to final_params_sha256 once loaded back.
    cfg = tiny_config(tmp_path, tiny_model_dir, sst2_dir, "run", tuning=tuning, mode=mode, steps=4, eval_every=0)
    result = paczero.train(cfg)
    assert result["best_step"] == 4

    saved = paczero.TrainConfig(**json.loads(read_text(os.path.join(cfg.output_dir, "config.json")))["options"])
    prepared = paczero.prepare(saved)
    before = paczero.params_sha256(zo.trainable_parameters(prepared.model))
    paczero.load_run_weights(prepared.model, saved, cfg.output_dir)
    after = paczero.params_sha256(zo.trainable_parameters(prepared.model))
    assert before != result["final_params_sha256"]
    assert after == result["final_params_sha256"]


def test_evaluate_model_run_dir(tmp_path, tiny_model_dir, sst2_dir):
    cfg = tiny_config(tmp_path, tiny_model_dir, sst2_dir, "run", steps=6, eval_every=3)
    result = paczero.train(cfg)
    saved = paczero.TrainConfig(**json.loads(read_text(os.path.join(cfg.output_dir, "config.json")))["options"])
    outcome = paczero.evaluate_model(saved, run_dir=cfg.output_dir)
    assert outcome["metric"] == result["test_metric"]
    assert outcome["examples"] == 16


def test_train_rejects_nonempty_output(tmp_path, tiny_model_dir, sst2_dir):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "old.txt").write_text("x")
    with pytest.raises(ConfigError, match="not empty"):
        paczero.train(tiny_config(tmp_path, tiny_model_dir, sst2_dir, "run"))


# ---------------------------------------------------------------------------------------
# Options and schedule
# ---------------------------------------------------------------------------------------


def test_resolve_defaults_paper_recipes():
    zpl = paczero.resolve_defaults(TrainConfig(mode="zpl", tuning="lora"))
    assert (zpl.lr, zpl.clip, zpl.num_subsets) == (1e-3, 25.0, 126)
    mi = paczero.resolve_defaults(TrainConfig(mode="mi", mi_budget=0.33, tuning="ft"))
    assert (mi.lr, mi.clip, mi.num_subsets) == (1e-4, 1000.0, 128)
    assert mi.data_seed == mi.seed
    assert mi.secret_seed is not None


@pytest.mark.parametrize("options", [
    dict(num_subsets=7),
    dict(num_subsets=0),
    dict(mode="mi"),
    dict(mode="mi", mi_budget=-1.0),
    dict(mode="zpl", mi_budget=0.3),
    dict(lr=0.0),
    dict(zo_eps=float("nan")),
    dict(steps=0),
    dict(eval_every=-1),
    dict(mode="dp"),
    dict(tuning="prefix"),
    dict(dtype="fp8"),
])
def test_resolve_defaults_rejects(options):
    with pytest.raises(ConfigError):
        paczero.resolve_defaults(TrainConfig(**options))


def test_learning_rate_linear_decay():
    assert paczero.learning_rate(1e-3, 0, 11) == 1e-3
    assert paczero.learning_rate(1e-3, 10, 11) == pytest.approx(paczero.LR_END, rel=1e-9)
    assert paczero.learning_rate(1e-3, 5, 11) == pytest.approx((1e-3 + paczero.LR_END) / 2, rel=1e-9)
