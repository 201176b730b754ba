"""Baselines and ablations: MeZO, DPZero / DP-AggZO, the mechanism decomposition, K directions.

The release rules are checked on hand-built projected gradients, the DP noise scale
against opacus, and whole runs of every baseline on the tiny OPT.
"""

from __future__ import annotations

import copy
import json
import math
import os

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

import mechanisms
import paczero
import zo
from mechanisms import (AblationRelease, DPZORelease, MeZORelease, MIRelease, StepInput, ZPLRelease,
                        epsilon_to_mi, matched_epsilon, mia_success_bound)
from paczero import ConfigError, TrainConfig

# Subsets of a 6-example pool, each example in exactly 2 of the 4.
MEMBERSHIP = torch.tensor([
    [True, True, True, False, False, False],
    [False, False, True, True, True, False],
    [True, False, False, True, False, True],
    [False, True, False, False, True, True],
])


def dp_rule(seed: int, directions: int = 1, clip: float = 5.0, pool_size: int = 200) -> DPZORelease:
    # DPZero's published SST-2 setting, q = 0.064 over 1000 steps, calibrates in about 0.1 s on
    # a 2-core CPU, where q = 0.5 takes 1 to 3 s.
    return DPZORelease(clip, 2.0, 1e-5, 0.064, 1000, pool_size, np.random.default_rng(seed), directions=directions)


def random_split_signs(rng: np.random.Generator, count: int) -> np.ndarray:
    """Random +-1 signs with both values present, so that no release is free."""
    signs = np.where(rng.random(count) < 0.5, 1, -1)
    signs[0], signs[1] = 1, -1
    return signs


def sign_input(signs: np.ndarray, coin: int = 1) -> StepInput:
    signs = torch.tensor(signs, dtype=torch.int8)
    return StepInput(per_example=torch.zeros(1), means=signs.double(), signs=signs, coin=coin)


# ---------------------------------------------------------------------------------------
# MeZO
# ---------------------------------------------------------------------------------------


def test_mezo_release_unclipped_mean():
    grads = torch.tensor([[1000.0, -3.0, 5.5, -2000.0]])
    rule = MeZORelease(4)
    clipped = rule.clip(grads)
    assert torch.equal(clipped, grads)

    release = rule.release(StepInput.build(clipped[0], coin=1, membership=None))
    assert release.value == pytest.approx((1000.0 - 3.0 + 5.5 - 2000.0) / 4, rel=1e-12)
    assert release.kind == "raw"


def test_mezo_sample_rows_minibatch():
    rule = MeZORelease(4, batch_size=5, batch_rng=np.random.default_rng(3))
    again = MeZORelease(4, batch_size=5, batch_rng=np.random.default_rng(3))
    other = MeZORelease(4, batch_size=5, batch_rng=np.random.default_rng(4))
    draws = [rule.sample_rows(16) for _ in range(20)]
    for rows in draws:
        assert len(rows) == 5
        assert len(np.unique(rows)) == 5
        assert np.array_equal(rows, np.sort(rows))
        assert rows.min() >= 0
        assert rows.max() < 16
    assert all(np.array_equal(rows, again.sample_rows(16)) for rows in draws)
    assert not all(np.array_equal(rows, other.sample_rows(16)) for rows in draws)


@pytest.mark.parametrize("batch_size", [None, 16, 40])
def test_mezo_sample_rows_whole_pool(batch_size):
    rule = MeZORelease(4, batch_size=batch_size, batch_rng=np.random.default_rng(0))
    assert rule.sample_rows(16) is None


# ---------------------------------------------------------------------------------------
# Ablations
# ---------------------------------------------------------------------------------------


def ablation_step(kind: str, secret_seed: int, values: list[float], coin: int = -1, clip: float = 2.0):
    """Clip `values` with a new ablation rule and release them, returning the rule, clipped values and release."""
    rule = AblationRelease(kind, 4, clip, np.random.default_rng(secret_seed))
    clipped = rule.clip(torch.tensor([values]))[0]
    release = rule.release(StepInput.build(clipped, coin, MEMBERSHIP))
    return rule, clipped, release


def hand_subset_means(values: np.ndarray) -> np.ndarray:
    return np.array([values[row].mean() for row in MEMBERSHIP.numpy()])


# Beyond the clip of 2 on both sides, so that an unclipped mean would differ.
VALUES = [5.0, -0.5, 1.0, -7.0, 0.25, 1.5]
CLIPPED = np.array([2.0, -0.5, 1.0, -2.0, 0.25, 1.5])


def test_ablation_clips_each_value():
    _, clipped, _ = ablation_step("raw_full", 0, VALUES)
    np.testing.assert_array_equal(clipped.numpy(), CLIPPED)


def test_ablation_raw_full_clipped_mean():
    _, _, release = ablation_step("raw_full", 0, VALUES)
    assert release.value == pytest.approx(CLIPPED.mean(), rel=1e-12)


@pytest.mark.parametrize("values, expected", [
    (VALUES, 1.0),                     # clipped mean 0.375
    ([-5.0, 1.0, 0.5, -1.0, 0.0, 0.0], -1.0),
    ([1.0, -1.0, 2.0, -2.0, 0.0, 0.0], 1.0),  # a mean of exactly 0 counts as +1
])
def test_ablation_quant_full_sign(values, expected):
    _, _, release = ablation_step("quant_full", 0, values)
    assert release.value == expected


@pytest.mark.parametrize("secret_seed", range(6))
def test_ablation_raw_half_secret_mean(secret_seed):
    rule, _, release = ablation_step("raw_half", secret_seed, VALUES)
    assert release.value == pytest.approx(hand_subset_means(CLIPPED)[rule.secret_index], rel=1e-12)


@pytest.mark.parametrize("secret_seed", range(6))
def test_ablation_quant_half_secret_sign(secret_seed):
    rule, _, release = ablation_step("quant_half", secret_seed, VALUES)
    mean = hand_subset_means(CLIPPED)[rule.secret_index]
    assert release.value == (1.0 if mean >= 0 else -1.0)


def test_ablation_half_sees_both_signs():
    # The subset means of VALUES have both signs, so a release that ignored the secret
    # index would fail one of the quant_half cases above.
    means = hand_subset_means(CLIPPED)
    assert means.max() > 0
    assert means.min() < 0


@pytest.mark.parametrize("coin", [1, -1])
def test_ablation_random_sign_coin(coin):
    _, _, release = ablation_step("random_sign", 0, VALUES, coin=coin)
    assert release.value == coin
    assert release.kind == "coin"


def test_ablation_secret_index_from_generator():
    indices = []
    for seed in range(8):
        expected = int(np.random.default_rng(seed).integers(4))
        rule = AblationRelease("quant_half", 4, 2.0, np.random.default_rng(seed))
        assert rule.secret_index == expected
        indices.append(rule.secret_index)
    assert len(set(indices)) > 1


def test_ablation_unknown_kind():
    with pytest.raises(ValueError, match="unknown ablation"):
        AblationRelease("raw_quarter", 4, 2.0, np.random.default_rng(0))


# ---------------------------------------------------------------------------------------
# K directions: ZPL and MI
# ---------------------------------------------------------------------------------------


def test_zpl_release_step_per_direction():
    rule = ZPLRelease(4)
    inputs = [sign_input(np.array([-1, -1, -1, -1]), coin=1),
              sign_input(np.array([1, -1, 1, 1]), coin=-1),
              sign_input(np.array([1, 1, 1, 1]), coin=-1)]
    releases = rule.release_step(inputs)
    assert [r.value for r in releases] == [-1.0, -1.0, 1.0]
    assert [r.kind for r in releases] == ["unanimous", "coin", "unanimous"]


@pytest.mark.parametrize("directions", [2, 4])
def test_mi_directions_share_budget(directions):
    budget, total_steps = 0.2, 24  # T divisible by K, so that some step ends after release T
    sign_rng = np.random.default_rng(directions)
    rule = MIRelease(16, budget, total_steps, np.random.default_rng(7), directions=directions)
    spent_after_first_t = None
    for step in range(total_steps):
        releases = rule.release_step([sign_input(random_split_signs(sign_rng, 16)) for _ in range(directions)])
        assert len(releases) == directions
        assert rule.mi_spent <= budget
        if (step + 1) * directions == total_steps:
            spent_after_first_t = rule.mi_spent

    # Spread over T * K releases, the first T of them get at most a 1/K share.
    assert spent_after_first_t <= budget / directions * (1 + 1e-9)
    assert rule.mi_spent >= budget - 1e-6
    assert rule.exhausted()


# ---------------------------------------------------------------------------------------
# DPZero and DP-AggZO
# ---------------------------------------------------------------------------------------


def test_dp_sample_rows_poisson_rate():
    rule = dp_rule(0)
    sizes = [len(rule.sample_rows(200)) for _ in range(500)]
    # The mean rate over 100000 Bernoulli(0.064) draws has a standard deviation of 7.7e-4.
    assert abs(np.mean(sizes) / 200 - 0.064) < 0.005
    # Poisson sampling gives varying batch sizes, unlike a fixed-size minibatch.
    assert len(set(sizes)) > 5


def test_dp_sample_rows_secret_generator():
    rule = dp_rule(11)
    generator = np.random.default_rng(11)
    for _ in range(10):
        rows = rule.sample_rows(200)
        assert np.array_equal(rows, np.flatnonzero(generator.random(200) < 0.064))


def test_dp_sample_rows_deterministic():
    first = dp_rule(3).sample_rows(200)
    again = dp_rule(3).sample_rows(200)
    other = dp_rule(4).sample_rows(200)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_dp_clip_long_vectors():
    rule = dp_rule(0, directions=3, clip=5.0)
    grads = torch.tensor([[30.0, 0.0, -4.0, 100.0],
                          [40.0, 8.0, 3.0, -100.0],
                          [0.0, -6.0, 0.0, 100.0]])
    clipped = rule.clip(grads)
    for column in (0, 1, 3):
        norm = float(grads[:, column].double().norm())
        assert float(clipped[:, column].double().norm()) == pytest.approx(5.0, rel=1e-6)
        torch.testing.assert_close(clipped[:, column], grads[:, column] * (5.0 / norm))


def test_dp_clip_short_vectors_unchanged():
    rule = dp_rule(0, directions=3, clip=5.0)
    grads = torch.tensor([[3.0, 0.0, 0.1],
                          [4.0, 0.0, -0.2],
                          [0.0, 0.0, 0.3]])
    assert torch.equal(rule.clip(grads), grads)


def test_dp_clip_one_direction_is_scalar_clip():
    rule = dp_rule(0, clip=5.0)
    grads = torch.tensor([[7.0, -9.0, 2.0, -5.0]])
    assert torch.equal(rule.clip(grads), grads.clamp(-5.0, 5.0))


def test_dp_release_step_noisy_sum():
    directions = 3
    rule = dp_rule(5, directions=directions, clip=5.0, pool_size=40)
    per_example = [torch.tensor([1.0, -2.0, 0.5]), torch.tensor([3.0, 0.0, -1.0]), torch.tensor([-4.0, 1.0, 1.0])]
    generator = copy.deepcopy(rule.secret_rng)
    releases = rule.release_step([StepInput.build(g, coin=1, membership=None) for g in per_example])

    sigma = rule.noise_multiplier * 5.0
    noise = generator.normal(0.0, sigma, size=directions)
    expected = [(float(g.double().sum()) + n) / (0.064 * 40) for g, n in zip(per_example, noise)]
    assert len(releases) == directions
    for release, value in zip(releases, expected):
        assert release.value == pytest.approx(value, rel=1e-12)
        assert release.sigma == sigma


def test_dp_release_step_empty_sample():
    rule = dp_rule(6, directions=2, pool_size=40)
    generator = copy.deepcopy(rule.secret_rng)
    empty = [StepInput.build(torch.empty(0), coin=1, membership=None) for _ in range(2)]
    releases = rule.release_step(empty)
    noise = generator.normal(0.0, rule.noise_multiplier * 5.0, size=2)
    for release, value in zip(releases, noise / (0.064 * 40)):
        assert release.value == pytest.approx(value, rel=1e-12)
        assert release.value != 0.0


def test_dp_noise_depends_on_secret():
    per_example = torch.tensor([1.0, 2.0])
    first = dp_rule(0).release_step([StepInput.build(per_example, coin=1, membership=None)])
    other = dp_rule(1).release_step([StepInput.build(per_example, coin=1, membership=None)])
    assert first[0].value != other[0].value


@pytest.mark.parametrize("epsilon, delta, rate, steps", [(2.0, 1e-5, 0.064, 1000), (6.0, 1e-5, 0.5, 60)])
def test_dp_noise_multiplier_opacus(epsilon, delta, rate, steps):
    rule = DPZORelease(25.0, epsilon, delta, rate, steps, 100, np.random.default_rng(0))
    expected = get_noise_multiplier(target_epsilon=epsilon, target_delta=delta, sample_rate=rate, steps=steps,
                                    accountant="rdp")
    assert rule.noise_multiplier == expected

    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=rule.noise_multiplier, sample_rate=rate)
    spent = accountant.get_epsilon(delta)
    assert spent <= epsilon
    assert spent >= epsilon - 0.05


def test_dp_privacy_report():
    report = dp_rule(0).privacy()
    assert report["dp_epsilon"] == 2.0
    assert report["dp_delta"] == 1e-5
    assert report["matched_epsilon"] == 2.0
    assert report["mia_bound"] == pytest.approx(math.exp(2.0) / (1 + math.exp(2.0)), rel=1e-12)
    assert report["mi_spent_nats"] is None


@pytest.mark.parametrize("options", [
    dict(epsilon=0.0), dict(epsilon=-1.0), dict(epsilon=math.inf),
    dict(delta=0.0), dict(delta=1.5), dict(sampling_rate=0.0), dict(sampling_rate=1.2),
    dict(sampling_rate=math.nan),
])
def test_dp_rule_bad_input(options):
    settings = dict(epsilon=2.0, delta=1e-5, sampling_rate=0.064)
    settings.update(options)
    with pytest.raises(ValueError):
        DPZORelease(5.0, settings["epsilon"], settings["delta"], settings["sampling_rate"], 100, 40,
                    np.random.default_rng(0))


# ---------------------------------------------------------------------------------------
# Privacy conversions
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon, expected", [(1.0, 0.110944), (2.0, 0.327813), (6.0, 0.675836)])
def test_epsilon_to_mi_reference_values(epsilon, expected):
    # The references have six decimals, so they pin the value to half a unit of the last one.
    assert abs(epsilon_to_mi(epsilon) - expected) <= 5e-7


@pytest.mark.parametrize("mi", [1e-4, 1e-2, 0.0303, 0.1109, 0.33, 0.68])
def test_mi_round_trip(mi):
    assert epsilon_to_mi(matched_epsilon(mia_success_bound(mi))) == pytest.approx(mi, rel=1e-9)


def test_mia_success_bound_zero():
    assert mia_success_bound(0.0) == 0.5


@pytest.mark.parametrize("mi", [math.log(2.0), 0.7, 5.0])
def test_mia_success_bound_above_ln2(mi):
    assert mia_success_bound(mi) == 1.0


# ---------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------


def test_make_release_rule_dp_without_epsilon():
    for mode in ("dpzero", "dpaggzo"):
        with pytest.raises(ValueError, match="--dp-epsilon"):
            mechanisms.make_release_rule(mode, 4, 10, None, np.random.default_rng(0), clip=5.0, pool_size=40,
                                         sampling_rate=0.5)


def test_make_release_rule_unknown_mode():
    with pytest.raises(ValueError, match="unknown mode 'dpsgd'"):
        mechanisms.make_release_rule("dpsgd", 4, 10, None, np.random.default_rng(0))


@pytest.mark.parametrize("mode, extra, expected", [
    ("dpzero", dict(dp_epsilon=2.0, clip=5.0, pool_size=40, sampling_rate=0.064), "dpzero"),
    ("dpaggzo", dict(dp_epsilon=2.0, clip=5.0, pool_size=40, sampling_rate=0.064, directions=3), "dpaggzo"),
    ("mezo", dict(batch_size=4, batch_rng=np.random.default_rng(0)), "mezo"),
    ("quant_half", dict(clip=5.0), "quant_half"),
])
def test_make_release_rule_builds(mode, extra, expected):
    rule = mechanisms.make_release_rule(mode, 4, 1000, None, np.random.default_rng(0), **extra)
    assert rule.name == expected


@pytest.mark.parametrize("options", [
    dict(mode="zpl", batch_size=4),
    dict(mode="dpzero", dp_epsilon=2.0, batch_size=4),
    dict(mode="mezo", batch_size=0),
    dict(mode="zpl", dp_epsilon=2.0),
    dict(mode="mezo", dp_epsilon=2.0),
    dict(mode="mi", mi_budget=0.3, dp_epsilon=2.0),
    dict(mode="raw_full", dp_epsilon=2.0),
    dict(mode="dpzero", dp_epsilon=2.0, directions=2),
    dict(mode="dpzero"),
    dict(mode="dpaggzo", dp_epsilon=0.0),
    dict(mode="dpzero", dp_epsilon=math.inf),
    dict(mode="dpzero", dp_epsilon=2.0, sampling_rate=0.0),
    dict(mode="dpzero", dp_epsilon=2.0, sampling_rate=-0.1),
    dict(mode="dpzero", dp_epsilon=2.0, sampling_rate=1.5),
    dict(mode="dpaggzo", dp_epsilon=2.0, sampling_rate=math.nan),
    dict(mode="dpzero", dp_epsilon=2.0, dp_delta=0.0),
    dict(mode="dpzero", dp_epsilon=2.0, dp_delta=1.0),
])
def test_resolve_defaults_rejects_baseline(options):
    with pytest.raises(ConfigError):
        paczero.resolve_defaults(TrainConfig(**options))


@pytest.mark.parametrize("options", [
    dict(mode="mezo", batch_size=4),
    dict(mode="dpzero", dp_epsilon=2.0, sampling_rate=1.0),
    dict(mode="dpaggzo", dp_epsilon=2.0, directions=3),
    dict(mode="zpl", directions=2),
])
def test_resolve_defaults_accepts_baseline(options):
    cfg = paczero.resolve_defaults(TrainConfig(**options))
    assert cfg.mode == options["mode"]


# ---------------------------------------------------------------------------------------
# Whole runs on the tiny OPT
# ---------------------------------------------------------------------------------------


def read_steps(run_dir: str) -> list[dict]:
    with open(os.path.join(run_dir, "steps.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture(scope="module")
def train_run(tmp_path_factory, tiny_model_dir, sst2_dir):
    """Train on the tiny OPT once per set of options and `repeat` number, returning (result, steps)."""
    finished = {}

    def run(repeat: int = 0, **options):
        key = (repeat, tuple(sorted(options.items())))
        if key not in finished:
            settings = dict(model=tiny_model_dir, data_dir=sst2_dir, pool_size=16, dev_size=8, test_size=10,
                            num_subsets=4, steps=3, eval_every=3, seed=0, secret_seed=1, device="cpu",
                            output_dir=str(tmp_path_factory.mktemp("run") / "out"))
            settings.update(options)
            result = paczero.train(TrainConfig(**settings))
            finished[key] = (result, read_steps(settings["output_dir"]))
        return finished[key]

    return run


DP_RUNS = {
    "dpzero": dict(mode="dpzero", sampling_rate=0.5, dp_epsilon=2.0),
    "dpaggzo": dict(mode="dpaggzo", sampling_rate=0.5, dp_epsilon=2.0, directions=3),
}

ABLATION_KINDS = {"raw_full": "raw", "quant_full": "sign", "raw_half": "raw", "quant_half": "sign",
                  "random_sign": "coin"}


@pytest.mark.parametrize("name", DP_RUNS)
def test_dp_run_result(train_run, name):
    result, steps = train_run(**DP_RUNS[name])
    assert result["steps_run"] == 3
    assert result["dp_epsilon"] == 2.0
    assert result["dp_delta"] == 1e-5
    assert result["matched_epsilon"] == result["dp_epsilon"]
    expected = get_noise_multiplier(target_epsilon=2.0, target_delta=1e-5, sample_rate=0.5, steps=3,
                                    accountant="rdp")
    assert result["noise_multiplier"] == expected
    assert result["mi_spent_nats"] is None
    for record in steps:
        assert 0 <= record["rows"] <= 16


def test_dpzero_run_scalar_steps(train_run):
    _, steps = train_run(**DP_RUNS["dpzero"])
    for record in steps:
        assert isinstance(record["seed"], int)
        assert isinstance(record["release"], float)
        assert record["release_kind"] == "dp_noisy"


def test_dpaggzo_run_list_steps(train_run):
    _, steps = train_run(**DP_RUNS["dpaggzo"])
    for record in steps:
        assert len(record["seed"]) == 3
        assert len(set(record["seed"])) == 3
        assert len(record["release"]) == 3
        assert record["release_kind"] == ["dp_noisy"] * 3


def test_zpl_run_two_directions(train_run):
    result, steps = train_run(mode="zpl", directions=2)
    assert result["steps_run"] == 3
    assert result["mi_spent_nats"] == 0.0
    for record in steps:
        assert len(record["seed"]) == 2
        assert len(record["release"]) == 2
        assert len(record["unanimous"]) == 2
        assert set(record["release"]) <= {-1.0, 1.0}


def test_mezo_run_minibatch(train_run):
    result, steps = train_run(mode="mezo", batch_size=4)
    assert result["steps_run"] == 3
    assert result["mi_spent_nats"] is None
    for record in steps:
        assert record["rows"] == 4
        assert record["release_kind"] == "raw"
        assert record["unanimous"] is None


@pytest.mark.parametrize("mode", ABLATION_KINDS)
def test_ablation_run(train_run, mode):
    result, steps = train_run(mode=mode)
    assert result["steps_run"] == 3
    assert result["mi_spent_nats"] is None
    assert result["matched_epsilon"] is None
    for record in steps:
        assert record["release_kind"] == ABLATION_KINDS[mode]
        assert record["rows"] is None


def test_random_sign_run_releases_coins(train_run):
    # A split ZPL step releases the public coin, and the coins are the same in every mode
    # with the same --seed, so random_sign must release the same value on those steps.
    _, zpl = train_run(mode="zpl")
    _, random_sign = train_run(mode="random_sign")
    split = [step for step, record in enumerate(zpl) if not record["unanimous"]]
    assert split
    for step in split:
        assert random_sign[step]["release"] == zpl[step]["release"]


def test_dp_run_same_secret_repeats(train_run):
    first, first_steps = train_run(**DP_RUNS["dpzero"])
    repeat, repeat_steps = train_run(repeat=1, **DP_RUNS["dpzero"])
    assert repeat["final_params_sha256"] == first["final_params_sha256"]
    assert [r["release"] for r in repeat_steps] == [r["release"] for r in first_steps]


def test_dp_run_other_secret_differs(train_run):
    first, first_steps = train_run(**DP_RUNS["dpzero"])
    other, other_steps = train_run(**DP_RUNS["dpzero"], secret_seed=2)
    assert other["final_params_sha256"] != first["final_params_sha256"]
    assert [r["release"] for r in other_steps] != [r["release"] for r in first_steps]


def test_public_seed_stream_shared(train_run):
    _, zpl = train_run(mode="zpl")
    seeds = [r["seed"] for r in zpl]
    for options in (dict(mode="mezo", batch_size=4), DP_RUNS["dpzero"], dict(mode="raw_half")):
        _, steps = train_run(**options)
        assert [r["seed"] for r in steps] == seeds, options


def test_public_seed_stream_by_seed(train_run):
    _, zpl = train_run(mode="zpl")
    _, other = train_run(mode="zpl", seed=1)
    assert [r["seed"] for r in other] != [r["seed"] for r in zpl]


# ---------------------------------------------------------------------------------------
# One step with K directions
# ---------------------------------------------------------------------------------------


class RecordingMeZO(MeZORelease):
    """MeZO that keeps the inputs of its last step, to read the per-direction g_i."""

    def release_step(self, inputs):
        self.inputs = inputs
        return super().release_step(inputs)


def test_step_directions_same_theta(tiny_model_dir, sst2_dir):
    # Full fine-tuning and eps = 1e-2 make theta - eps z_0 measurably different from
    # theta, so a step that forgot to restore between directions would fail.
    cfg = paczero.resolve_defaults(TrainConfig(
        model=tiny_model_dir, data_dir=sst2_dir, pool_size=16, dev_size=8, test_size=10, num_subsets=4, steps=3,
        mode="mezo", directions=2, tuning="ft", zo_eps=1e-2, lr=1e-2, secret_seed=1, device="cpu",
        output_dir="unused"))
    prepared = paczero.prepare(cfg)
    start = copy.deepcopy(prepared.model)
    rule = RecordingMeZO(4)
    run = paczero.Run(cfg=cfg, model=prepared.model, named_params=zo.trainable_parameters(prepared.model),
                      pool_losses=lambda rows: prepared.scorer.losses(prepared.model, prepared.pool),
                      pool_size=16, membership=mechanisms.membership_matrix(16, 4, np.random.default_rng(0)),
                      rule=rule, public_rng=np.random.default_rng(0))
    record = paczero.paczero_step(run, 0)

    def estimate_at(model, seed):
        params = [p for _, p in zo.trainable_parameters(model)]
        return zo.projected_gradients(params, seed, cfg.zo_eps, lambda: prepared.scorer.losses(model, prepared.pool))

    tolerance = 1e-3
    seeds = record["seed"]
    assert len(seeds) == 2
    for k, seed in enumerate(seeds):
        expected = estimate_at(copy.deepcopy(start), seed).grads
        measured = rule.inputs[k].per_example
        assert float((measured - expected).abs().max()) <= tolerance, k

    # The same estimate at theta - eps z_0 lies far outside the tolerance.
    shifted = copy.deepcopy(start)
    zo.perturb_([p for _, p in zo.trainable_parameters(shifted)], seeds[0], -cfg.zo_eps)
    wrong = estimate_at(shifted, seeds[1]).grads
    assert float((wrong - rule.inputs[1].per_example).abs().max()) > 100 * tolerance

    # The update averages the K directions: theta_1 = theta_0 - (lr / K) sum_k r_k z_k.
    expected_model = copy.deepcopy(start)
    expected_params = [p for _, p in zo.trainable_parameters(expected_model)]
    for seed, release in zip(seeds, record["release"]):
        zo.perturb_(expected_params, seed, -cfg.lr * release / 2)
    for (name, got), want in zip(zo.trainable_parameters(prepared.model), expected_params):
        assert torch.allclose(got, want, rtol=0.0, atol=1e-5), name
