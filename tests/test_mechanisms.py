"""Release rules and accounting: I_bin, sigma calibration, the MI ledger, posterior, subsets."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scipy import integrate

import mechanisms
from mechanisms import (MIRelease, StepInput, ZPLRelease, binary_entropy, binary_gaussian_mi, calibrate_sigma,
                        charged_mi, epsilon_to_mi, matched_epsilon, membership_matrix, mia_success_bound)


def step_input(signs, coin: int = 1) -> StepInput:
    signs = torch.tensor(signs, dtype=torch.int8)
    return StepInput(per_example=torch.zeros(1), means=signs.double(), signs=signs, coin=coin)


def scipy_binary_gaussian_mi(q: float, sigma: float) -> tuple[float, float]:
    """Compute I_bin by adaptive quadrature over x ~ N(0, 1), with y = b + sigma x.

    Returns the value and scipy's error estimate.

    For each branch b the log density ratio of N(b, sigma^2) to the mixture at y is
    -log((1 - w) + w e^{-a}), with w the other branch's weight and a = 2/sigma^2 + 2x/sigma.
    expm1 keeps it accurate when a is near 0; logaddexp avoids overflow when a is very negative.
    """

    def branch(other_weight: float) -> tuple[float, float]:
        def integrand(x: float) -> float:
            a = 2.0 / sigma**2 + 2.0 * x / sigma
            if a > -30.0:
                log_ratio = -math.log1p(other_weight * math.expm1(-a))
            else:
                log_ratio = -float(np.logaddexp(math.log1p(-other_weight), math.log(other_weight) - a))
            return math.exp(-x * x / 2.0) / math.sqrt(2.0 * math.pi) * log_ratio

        return integrate.quad(integrand, -40.0, 40.0, epsabs=0.0, epsrel=1e-12, limit=500, points=[0.0])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", integrate.IntegrationWarning)
        plus, plus_error = branch(1.0 - q)
        minus, minus_error = branch(q)
    return q * plus + (1.0 - q) * minus, q * plus_error + (1.0 - q) * minus_error


# ---------------------------------------------------------------------------------------
# I_bin
# ---------------------------------------------------------------------------------------

# (q, sigma, reference in nats, half a unit of the reference's last printed digit)
REFERENCE_MI = [
    (0.5, 1.0, 0.336831, 5e-7),
    (0.5, 0.5, 0.632720, 5e-7),
    (0.5, 2.0, 0.111421, 5e-7),
    (0.3, 1.0, 0.291858, 5e-7),
    (0.5, 55.0, 1.6526e-4, 5e-9),
]


@pytest.mark.parametrize("q, sigma, reference, rounding", REFERENCE_MI)
def test_binary_gaussian_mi_reference(q, sigma, reference, rounding):
    # The references are printed to 5 or 6 significant digits, so they only pin the value
    # to within their rounding (0.111421 stands for 0.1114215, 4e-6 away in relative terms).
    assert abs(binary_gaussian_mi(q, sigma) - reference) <= rounding


@pytest.mark.parametrize("q", [1e-4, 0.05, 0.3, 0.5, 0.9])
def test_binary_gaussian_mi_matches_scipy(q):
    for sigma in (0.05, 0.2, 0.5, 1.0, 2.0, 5.0, 30.0, 300.0, 1e4):
        expected, error = scipy_binary_gaussian_mi(q, sigma)
        value = binary_gaussian_mi(q, sigma)
        assert abs(value - expected) <= mechanisms.QUADRATURE_MARGIN * expected + error, (q, sigma)
        assert charged_mi(q, sigma) >= expected - error, (q, sigma)


def test_binary_gaussian_mi_symmetric_in_q():
    assert binary_gaussian_mi(0.3, 0.7) == pytest.approx(binary_gaussian_mi(0.7, 0.7), rel=1e-12)


def test_binary_gaussian_mi_decreases_in_sigma():
    # Below sigma ~ 0.1 the value equals H_b(q) to double precision, so start above that.
    values = [binary_gaussian_mi(0.4, sigma) for sigma in np.geomspace(0.15, 1e3, 40)]
    assert all(later < earlier for earlier, later in zip(values, values[1:]))


def test_binary_gaussian_mi_small_snr_limit():
    # At small signal-to-noise I_bin ~ 2 q (1 - q) / sigma^2.
    assert binary_gaussian_mi(0.3, 1e3) == pytest.approx(2 * 0.3 * 0.7 / 1e6, rel=1e-5)


def test_binary_gaussian_mi_certain_bit_is_zero():
    assert binary_gaussian_mi(1.0, 0.5) == 0.0
    assert binary_gaussian_mi(0.0, 0.5) == 0.0


@pytest.mark.parametrize("q, sigma", [(-0.1, 1.0), (1.5, 1.0), (0.5, 0.0), (0.5, -1.0), (0.5, math.nan)])
def test_binary_gaussian_mi_bad_input(q, sigma):
    with pytest.raises(ValueError):
        binary_gaussian_mi(q, sigma)


# ---------------------------------------------------------------------------------------
# Sigma calibration
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("q", [0.5, 0.3, 0.05, 0.9])
def test_calibrate_sigma_hits_beta(q):
    betas = [beta for beta in (1e-9, 1e-7, 1e-5, 1e-3, 0.05, 0.15, 0.3, 0.5) if beta < 0.999 * binary_entropy(q)]
    assert len(betas) >= 6
    for beta in betas:
        achieved = charged_mi(q, calibrate_sigma(q, beta))
        assert achieved <= beta, (q, beta)
        assert achieved >= beta * (1.0 - 1e-6), (q, beta)


@pytest.mark.parametrize("q, beta", [
    (0.0, 0.1),                            # q+ = 0 needs no noise
    (1.0, 0.1),                            # q+ = 1 likewise
    (0.5, 0.0),                            # a zero budget needs infinite noise
    (0.5, -0.1),
    (0.5, math.log(2.0)),                  # H_b(q+) or more allows a noiseless release
    (0.05, 0.5),                           # H_b(0.05) is 0.199 nats
])
def test_calibrate_sigma_bad_input(q, beta):
    with pytest.raises(ValueError):
        calibrate_sigma(q, beta)


# ---------------------------------------------------------------------------------------
# PACZero-MI ledger and posterior
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", [0.33, 1e-4])
@pytest.mark.parametrize("seed", [0, 1])
def test_mi_release_spends_budget(budget, seed):
    sign_rng = np.random.default_rng(seed)
    rule = MIRelease(16, budget, total_steps=200, secret_rng=np.random.default_rng(100 + seed))
    for _ in range(200):
        signs = np.where(sign_rng.random(16) < 0.5, 1, -1)
        spent_before = rule.mi_spent
        release = rule.release(step_input(signs))
        assert release.mi_nats >= 0.0
        assert rule.mi_spent == pytest.approx(spent_before + release.mi_nats, abs=1e-15)
        assert rule.mi_spent <= budget
    assert rule.mi_spent >= budget - 1e-6
    assert rule.exhausted()


def test_mi_release_charges_sigma_used():
    rule = MIRelease(8, 0.2, total_steps=10, secret_rng=np.random.default_rng(3))
    signs = [1, 1, 1, -1, -1, -1, -1, -1]
    release = rule.release(step_input(signs))
    assert release.kind == "noisy"
    assert release.mi_nats == charged_mi(3 / 8, release.sigma)
    assert release.mi_nats <= 0.2 / 10


def test_mi_release_posterior_by_hand():
    signs = np.array([1.0, -1.0, 1.0, -1.0])
    secret_rng_copy = np.random.default_rng(7)
    rule = MIRelease(4, 0.5, total_steps=5, secret_rng=np.random.default_rng(7))

    # The rule draws the secret index first, then one standard normal per noisy step.
    secret_index = int(secret_rng_copy.integers(4))
    assert rule.secret_index == secret_index

    expected = np.full(4, 0.25)
    for step_signs in (signs, np.array([1.0, 1.0, -1.0, -1.0])):
        release = rule.release(step_input(step_signs.astype(int)))
        raw = step_signs[secret_index] + release.sigma * secret_rng_copy.standard_normal()
        assert release.raw == pytest.approx(raw, rel=1e-12)
        assert release.value == (1.0 if raw >= 0 else -1.0)

        expected = expected * np.exp(-(step_signs - raw) ** 2 / (2.0 * release.sigma**2))
        expected = expected / expected.sum()
        np.testing.assert_allclose(rule.posterior(), expected, rtol=1e-10)


def test_mi_release_unanimous_step_free():
    rule = MIRelease(6, 0.3, total_steps=10, secret_rng=np.random.default_rng(0))
    for common in (1, -1):
        release = rule.release(step_input([common] * 6))
        assert release.value == common
        assert release.kind == "unanimous"
        assert release.mi_nats == 0.0
        assert release.sigma is None
    assert rule.mi_spent == 0.0
    np.testing.assert_allclose(rule.posterior(), np.full(6, 1 / 6), rtol=1e-12)


def test_mi_release_certain_step_free():
    # Once the posterior sits only on subsets that agree, q+ is 1 even though other
    # subsets disagree, so releasing the secret's sign exactly costs nothing.
    rule = MIRelease(4, 0.3, total_steps=10, secret_rng=np.random.default_rng(0))
    rule.secret_index = 1
    with np.errstate(divide="ignore"):
        rule.log_posterior = np.log(np.array([0.5, 0.5, 0.0, 0.0]))
    release = rule.release(step_input([-1, -1, 1, 1]))
    assert release.kind == "certain"
    assert release.value == -1.0
    assert release.mi_nats == 0.0
    assert rule.mi_spent == 0.0


def test_mi_release_budget_cap_below_entropy():
    # One step with a budget above H_b(q+) must still add noise, because beta is capped at 0.999 H_b(q+).
    rule = MIRelease(2, 5.0, total_steps=1, secret_rng=np.random.default_rng(0))
    release = rule.release(step_input([1, -1]))
    assert release.kind == "noisy"
    assert release.mi_nats <= 0.999 * math.log(2.0)


def test_mi_release_bad_budget():
    for budget in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError):
            MIRelease(4, budget, total_steps=10, secret_rng=np.random.default_rng(0))


def test_mi_release_state_round_trip():
    rule = MIRelease(4, 0.3, total_steps=10, secret_rng=np.random.default_rng(0))
    rule.release(step_input([1, -1, 1, 1]))
    copy = MIRelease(4, 0.3, total_steps=10, secret_rng=np.random.default_rng(99))
    copy.load_state_dict(rule.state_dict())
    assert copy.mi_spent == rule.mi_spent
    assert copy.steps_done == rule.steps_done
    assert copy.secret_index == rule.secret_index
    np.testing.assert_array_equal(copy.posterior(), rule.posterior())


# ---------------------------------------------------------------------------------------
# PACZero-ZPL and MeZO
# ---------------------------------------------------------------------------------------


def test_zpl_release_unanimous_sign():
    rule = ZPLRelease(4)
    for common, coin in ((1, -1), (-1, 1)):
        release = rule.release(step_input([common] * 4, coin=coin))
        assert release.value == common
        assert release.kind == "unanimous"


def test_zpl_release_coin_when_split():
    rule = ZPLRelease(4)
    for coin in (1, -1):
        release = rule.release(step_input([1, 1, 1, -1], coin=coin))
        assert release.value == coin
        assert release.kind == "coin"
    assert rule.mi_spent == 0.0
    assert not rule.exhausted()


def test_mezo_release_raw_mean():
    grads = torch.tensor([1.0, -3.0, 5.5])
    step = StepInput(per_example=grads, means=torch.zeros(2), signs=torch.ones(2, dtype=torch.int8), coin=1)
    release = mechanisms.MeZORelease(2).release(step)
    assert release.value == pytest.approx(3.5 / 3, rel=1e-12)
    assert release.kind == "raw"


def test_make_release_rule_bad_input():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        mechanisms.make_release_rule("mi", 4, 10, None, rng)
    with pytest.raises(ValueError):
        mechanisms.make_release_rule("dp", 4, 10, None, rng)


# ---------------------------------------------------------------------------------------
# Privacy report
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("epsilon, expected", [(1.0, 0.110944), (2.0, 0.327813), (6.0, 0.675836)])
def test_epsilon_to_mi_reference(epsilon, expected):
    assert abs(epsilon_to_mi(epsilon) - expected) <= 5e-7


def test_mia_success_bound_no_leak():
    assert mia_success_bound(0.0) == 0.5


def test_mia_success_bound_full_leak():
    assert mia_success_bound(math.log(2.0)) == 1.0


def test_matched_epsilon_round_trip():
    for epsilon in (0.5, 2.0, 6.0):
        assert matched_epsilon(mia_success_bound(epsilon_to_mi(epsilon))) == pytest.approx(epsilon, rel=1e-8)


def test_privacy_report_zero_mi():
    report = mechanisms.privacy_report(0.0)
    assert report["mia_bound"] == 0.5
    assert report["matched_epsilon"] == 0.0


# ---------------------------------------------------------------------------------------
# Membership matrix and subset signs
# ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_subsets", [2, 8, 126])
def test_membership_matrix_half_per_example(num_subsets):
    member = membership_matrix(300, num_subsets, np.random.default_rng(0))
    assert member.shape == (num_subsets, 300)
    assert member.dtype == torch.bool
    assert torch.all(member.sum(dim=0) == num_subsets // 2)


@pytest.mark.parametrize("num_subsets", [7, 1, 0, -2])
def test_membership_matrix_bad_subsets(num_subsets):
    with pytest.raises(ValueError):
        membership_matrix(10, num_subsets, np.random.default_rng(0))


def test_membership_matrix_empty_pool():
    with pytest.raises(ValueError):
        membership_matrix(0, 4, np.random.default_rng(0))


def test_membership_matrix_deterministic():
    first = membership_matrix(100, 8, np.random.default_rng(5))
    again = membership_matrix(100, 8, np.random.default_rng(5))
    other = membership_matrix(100, 8, np.random.default_rng(6))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_membership_matrix_balanced_sizes():
    # Each subset size is Binomial(2000, 1/2): mean 1000, standard deviation 22.4.
    sizes = membership_matrix(2000, 8, np.random.default_rng(1)).sum(dim=1)
    assert int(sizes.min()) >= 1000 - 150
    assert int(sizes.max()) <= 1000 + 150


def test_subset_means_and_signs():
    member = torch.tensor([[True, True, False], [False, True, True]])
    grads = torch.tensor([1.0, -4.0, 2.0])
    means = mechanisms.subset_means(member, grads)
    np.testing.assert_allclose(means.numpy(), [-1.5, -1.0])
    signs = mechanisms.subset_signs(torch.tensor([-1.5, 0.0, 2.0], dtype=torch.float64))
    assert signs.tolist() == [-1, 1, 1]
