"""Release rules of PACZero and its accounting, in nats.

Threat model (PACZero, arXiv 2605.06505; PAC Privacy, Xiao and Devadas, CRYPTO 2023).
The pool of N examples and M candidate subsets of it are public. The secret is the index
S* of one subset, drawn uniformly. Each step computes, for every subset m, the mean
projected gradient ghat_m over its members and its sign s_m. Only s_{S*} may influence
what is released. A membership-inference adversary who has everything except S* starts
with prior 1/2 that any pool example is in the secret subset, because every example sits
in exactly M/2 of the M subsets.

Everything that is released (one sign per step) is therefore a channel from S* to the
adversary, and the quantity we account is the mutual information I(S*; Y_1..Y_T) in nats.
By the chain rule it is at most the sum over steps of I(S*; Y_t | Y_<t), and given the
transcript so far, S* enters step t only through the bit s_{S*}. That bit is +1 with
probability q+ = sum of the adversary's posterior over the subsets whose sign is +1.

Two generators carry the randomness:
- public (``--seed``): membership matrix, perturbation seeds, ZPL coin flips. An adversary
  may know all of it.
- secret (``--secret-seed``): the secret index and the PACZero-MI noise. Nothing derived
  from it is written to the release log except the releases themselves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

LN2 = math.log(2.0)

# A posterior mass this close to 0 or 1 is treated as certain: the sign is released with no
# noise and the step is charged H_b(q+) (at most about 3e-11 nats), the exact leak of a
# noiseless release at that q+.
CERTAINTY_TOLERANCE = 1e-12

# Gauss-Hermite nodes for I_bin. Measured against scipy's adaptive quadrature on a grid of
# q in [1e-4, 0.9] and sigma in [0.05, 1e4]: 60 nodes under-estimate by up to 6.2e-6
# (relative), 200 nodes by at most 1.4e-9. The charge is inflated by QUADRATURE_MARGIN so
# that it stays an upper bound on the true value.
QUADRATURE_NODES = 200
QUADRATURE_MARGIN = 1e-8

MODES = ("zpl", "mi", "mezo", "dpzero", "dpaggzo", "raw_full", "quant_full", "raw_half", "quant_half", "random_sign")


# ---------------------------------------------------------------------------------------
# Information-theoretic helpers (all in nats)
# ---------------------------------------------------------------------------------------


def binary_entropy(q: float) -> float:
    """H_b(q) in nats; 0 at q = 0 and q = 1."""
    if q <= 0.0 or q >= 1.0:
        return 0.0
    return -(q * math.log(q) + (1.0 - q) * math.log1p(-q))


@lru_cache(maxsize=None)
def _hermite_rule(nodes: int) -> tuple[np.ndarray, np.ndarray]:
    points, weights = np.polynomial.hermite.hermgauss(nodes)
    # Change of variable x = sqrt(2) t turns int e^{-t^2} f(sqrt(2) t) into E_{x~N(0,1)} f(x).
    return math.sqrt(2.0) * points, weights / math.sqrt(math.pi)


def binary_gaussian_mi(q_plus: float, sigma: float) -> float:
    """Mutual information in nats between B in {-1, +1}, P(B = +1) = q_plus, and B + N(0, sigma^2).

    I_bin = q KL(N(+1, s^2) || mix) + (1 - q) KL(N(-1, s^2) || mix), mix = q N(+1) + (1-q) N(-1).
    Writing y = +1 + s x with x ~ N(0, 1), the log density ratio of N(+1) to the mixture is
    -log(q + (1 - q) exp(-a)) with a = 2 / s^2 + 2 x / s, computed as -log1p((1-q) expm1(-a))
    so that it stays accurate when the signal is tiny (a -> 0) and the result is ~1e-9 nats.
    The -1 branch is the mirror image. The expectation over x uses Gauss-Hermite quadrature.
    """
    q = float(q_plus)
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q_plus must be a probability in [0, 1], got {q}")
    if not sigma > 0.0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    if q in (0.0, 1.0):
        return 0.0
    x, w = _hermite_rule(QUADRATURE_NODES)
    a_plus = 2.0 / sigma**2 + 2.0 * x / sigma
    a_minus = 2.0 / sigma**2 - 2.0 * x / sigma
    kl_plus = -np.log1p((1.0 - q) * np.expm1(-a_plus))
    kl_minus = -np.log1p(q * np.expm1(-a_minus))
    value = q * float(w @ kl_plus) + (1.0 - q) * float(w @ kl_minus)
    # The true value lies in [0, H_b(q)]; clamp the few-ulp quadrature noise at the ends.
    return min(max(value, 0.0), binary_entropy(q))


def charged_mi(q_plus: float, sigma: float) -> float:
    """Return the MI charged for one noisy release: I_bin inflated by the quadrature error bound."""
    return binary_gaussian_mi(q_plus, sigma) * (1.0 + QUADRATURE_MARGIN)


def calibrate_sigma(q_plus: float, beta: float) -> float:
    """Return the noise scale sigma whose charged MI at q_plus is at most beta nats, and close to it.

    I_bin falls monotonically as sigma grows. The Gaussian-input bound
    I_bin <= 1/2 log(1 + 4 q (1 - q) / s^2) <= 2 q (1 - q) / s^2 gives a sigma that is
    always safe, sqrt(2 q (1 - q) / beta). Bisection on log sigma then shrinks it while
    keeping the invariant charged_mi(q, hi) <= beta, and the safe end `hi` is returned,
    so the achieved MI never exceeds the target.
    """
    q = float(q_plus)
    if not 0.0 < q < 1.0:
        raise ValueError(f"q_plus must be strictly between 0 and 1 for a noisy release, got {q}")
    entropy = binary_entropy(q)
    if not 0.0 < beta < entropy:
        raise ValueError(
            f"beta must be in (0, H_b(q_plus) = {entropy:.6g}) nats, got {beta}: "
            "a budget of H_b(q_plus) or more allows a noiseless release"
        )
    hi = math.sqrt(2.0 * q * (1.0 - q) / beta) * (1.0 + 1e-9)
    while charged_mi(q, hi) > beta:  # only rounding can make the bound fail
        hi *= 1.01
    lo = hi / 2.0
    while charged_mi(q, lo) <= beta:
        hi, lo = lo, lo / 2.0
    for _ in range(200):
        if hi / lo - 1.0 < 1e-12:
            break
        mid = math.sqrt(lo * hi)
        if charged_mi(q, mid) <= beta:
            hi = mid
        else:
            lo = mid
    return hi


# ---------------------------------------------------------------------------------------
# Privacy report: MI -> membership-inference success bound -> matched epsilon
# ---------------------------------------------------------------------------------------


def mia_success_bound(mi_nats: float) -> float:
    """Largest membership-inference success probability p with ln 2 - H_b(p) <= I (prior 1/2).

    Membership of one example is a function of S*, so any attack's guess G about it obeys
    I(member; G) <= I(S*; Y_1..Y_T) = I (data processing). With prior 1/2, Fano's inequality
    gives I(member; G) >= ln 2 - H_b(p) for an attack that is right with probability p.
    I = 0 gives p = 1/2; I >= ln 2 gives p = 1.
    """
    if mi_nats <= 0.0:
        return 0.5
    if mi_nats >= LN2:
        return 1.0
    lo, hi = 0.5, 1.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if LN2 - binary_entropy(mid) <= mi_nats:
            lo = mid
        else:
            hi = mid
    return lo


def matched_epsilon(mia_bound: float) -> float:
    """Return the epsilon whose epsilon-DP MIA success bound e^eps / (1 + e^eps) equals the given one."""
    if mia_bound <= 0.5:
        return 0.0
    if mia_bound >= 1.0:
        return math.inf
    return math.log(mia_bound / (1.0 - mia_bound))


def epsilon_to_mi(epsilon: float) -> float:
    """MI budget (nats) whose MIA bound matches epsilon-DP: ln 2 - H_b(e^eps / (1 + e^eps))."""
    p = 1.0 / (1.0 + math.exp(-epsilon))
    return LN2 - binary_entropy(p)


def privacy_report(mi_nats: float) -> dict:
    """MI spent, the MIA posterior success bound and the matched DP epsilon."""
    bound = mia_success_bound(mi_nats)
    return {"mi_spent_nats": mi_nats, "mia_bound": bound, "matched_epsilon": matched_epsilon(bound)}


# ---------------------------------------------------------------------------------------
# Subsets and their signs
# ---------------------------------------------------------------------------------------


def membership_matrix(num_examples: int, num_subsets: int, rng: np.random.Generator) -> torch.Tensor:
    """Boolean (M, N) matrix: entry (m, i) is True when pool example i is in subset m.

    Each example joins exactly M/2 of the M subsets, chosen uniformly without replacement
    and independently per example, so the prior that it is in the secret subset is exactly 1/2.
    """
    if num_subsets < 2 or num_subsets % 2:
        raise ValueError(f"the number of subsets must be an even integer >= 2, got {num_subsets}")
    if num_examples < 1:
        raise ValueError(f"the pool must hold at least one example, got {num_examples}")
    # Ranking M uniform keys per example and keeping the first M/2 ranks is a uniform draw
    # of M/2 subsets without replacement.
    keys = rng.random((num_examples, num_subsets))
    ranks = keys.argsort(axis=1).argsort(axis=1)
    member = ranks < num_subsets // 2
    return torch.from_numpy(member.T.copy())


def draw_secret_index(secret_rng: np.random.Generator, num_subsets: int) -> int:
    """S*, the secret subset: the first draw of the secret generator, uniform over the M subsets.

    Every mode draws it, including those that never read it (ZPL), so that an audit can
    recover it from --secret-seed and compare members of S* with non-members.
    """
    return int(secret_rng.integers(num_subsets))


def subset_means(membership: torch.Tensor, per_example: torch.Tensor) -> torch.Tensor:
    """ghat_m = mean of g_i over the members of subset m, as one (M x N) @ (N) product in fp64."""
    weights = membership.to(torch.float64)
    counts = weights.sum(dim=1).clamp(min=1.0)
    return (weights @ per_example.to(torch.float64)) / counts


def subset_signs(means: torch.Tensor) -> torch.Tensor:
    """s_m = +1 where ghat_m >= 0, else -1 (a zero mean counts as +1)."""
    return torch.where(means >= 0, 1, -1).to(torch.int8)


# ---------------------------------------------------------------------------------------
# Release rules
# ---------------------------------------------------------------------------------------


@dataclass
class StepInput:
    """Inputs of one direction's release: the clipped g_i in fp32, the subset means and signs, the coin."""

    per_example: torch.Tensor
    means: torch.Tensor | None  # None for rules that do not use the subsets
    signs: torch.Tensor | None
    coin: int  # a fair +-1 coin from the public generator, drawn every step

    @classmethod
    def build(cls, per_example: torch.Tensor, coin: int, membership: torch.Tensor | None) -> "StepInput":
        """Compute the subset means and signs, or leave them None when `membership` is None."""
        if membership is None:
            return cls(per_example=per_example, means=None, signs=None, coin=coin)
        means = subset_means(membership, per_example)
        return cls(per_example=per_example, means=means, signs=subset_signs(means), coin=coin)

    @property
    def positive_subsets(self) -> int | None:
        return None if self.signs is None else int((self.signs > 0).sum())

    @property
    def unanimous(self) -> bool | None:
        return None if self.signs is None else bool((self.signs == self.signs[0]).all())


@dataclass
class Release:
    """One step's release: `value` multiplies z in the update theta <- theta - lr * value * z."""

    value: float
    kind: str  # unanimous, coin, noisy, certain, raw
    sigma: float | None = None
    mi_nats: float = 0.0
    raw: float | None = None  # the real-valued release r_t of PACZero-MI


class ReleaseRule:
    """Common shape of every release rule, and the defaults most of them use.

    A step hands the rule the per-example projected gradients of each of its K directions.
    The rule may choose which pool rows enter the step (`sample_rows`), clips the
    gradients (`clip`) and returns one release per direction (`release_step`).
    """

    name = ""
    uses_subsets = True   # the step must compute subset means and signs for this rule
    private = True

    def __init__(self, clip: float | None):
        self.clip_bound = clip
        self.mi_spent: float | None = 0.0

    def sample_rows(self, pool_size: int) -> np.ndarray | None:
        """Indices of the pool rows that enter this step; None means the whole pool."""
        return None

    def clip(self, grads: torch.Tensor) -> torch.Tensor:
        """Clip every g_i of every direction to [-clip, clip]; grads has shape (K, n)."""
        if self.clip_bound is None:
            return grads
        return grads.clamp(-self.clip_bound, self.clip_bound)

    def release(self, step: StepInput) -> Release:
        raise NotImplementedError

    def release_step(self, inputs: list[StepInput]) -> list[Release]:
        """One release per direction, in order (a stateful rule receives them one after another)."""
        return [self.release(direction) for direction in inputs]

    def exhausted(self) -> bool:
        return False

    def privacy(self) -> dict:
        """Return the run's privacy figures for result.json; None where a figure does not apply."""
        return {"mi_spent_nats": None, "mia_bound": None, "matched_epsilon": None}

    def state_dict(self) -> dict:
        return {"mi_spent": self.mi_spent}

    def load_state_dict(self, state: dict) -> None:
        self.mi_spent = state["mi_spent"]


class ZPLRelease(ReleaseRule):
    """PACZero-ZPL: the unanimous sign, or else a fair coin. I(S*; Y_1..Y_T) = 0 exactly.

    If all M subsets agree, s_{S*} equals that common sign whichever subset is secret.
    If they disagree, the released coin is drawn from the public generator, which no data
    touches. In both cases the release has the same distribution for every value of S*,
    so the secret is never read here at all.
    """

    name = "zpl"

    def __init__(self, num_subsets: int, clip: float | None = None):
        super().__init__(clip)
        self.num_subsets = num_subsets

    def release(self, step: StepInput) -> Release:
        if step.unanimous:
            return Release(value=float(step.signs[0]), kind="unanimous")
        return Release(value=float(step.coin), kind="coin")

    def privacy(self) -> dict:
        return privacy_report(self.mi_spent)


class MIRelease(ReleaseRule):
    """PACZero-MI: the secret subset's sign plus Gaussian noise calibrated to an MI budget.

    The adversary's posterior p over the M subset indices starts uniform. Per step:
    - q+ = sum of p_m over subsets with s_m = +1, the chance that s_{S*} = +1 given the past.
    - q+ in {0, 1}: every subset the adversary still believes in has the same sign, so
      releasing s_{S*} exactly gives it no new information. The step is free.
    - otherwise: the step budget beta_t = (B - spent) / (steps left), capped below H_b(q+)
      (unused budget rolls forward), sigma_t solves I_bin(q+, sigma_t) = beta_t on the safe
      side, r_t = s_{S*} + N(0, sigma_t^2) is released and the posterior becomes
      p_m * exp(-(s_m - r_t)^2 / (2 sigma_t^2)), normalised. The update uses sign(r_t).
    The MI charged is the one achieved by the sigma used, never more than beta_t.
    """

    name = "mi"

    def __init__(self, num_subsets: int, budget: float, total_steps: int, secret_rng: np.random.Generator,
                 clip: float | None = None, directions: int = 1, secret_index: int | None = None):
        super().__init__(clip)
        if not budget > 0.0 or not math.isfinite(budget):
            raise ValueError(f"the MI budget must be a positive number of nats, got {budget}")
        self.num_subsets = num_subsets
        self.budget = float(budget)
        # With K directions per step every direction is one release, so the budget is
        # spread over T * K releases: beta_t / K each.
        self.total_steps = int(total_steps) * int(directions)
        self.secret_rng = secret_rng
        self.secret_index = draw_secret_index(secret_rng, num_subsets) if secret_index is None else secret_index
        self.log_posterior = np.full(num_subsets, -math.log(num_subsets))
        self.mi_spent = 0.0
        self.steps_done = 0

    def posterior(self) -> np.ndarray:
        shifted = self.log_posterior - self.log_posterior.max()
        p = np.exp(shifted)
        return p / p.sum()

    def posterior_entropy(self) -> float:
        p = self.posterior()
        p = p[p > 0]
        return float(-(p * np.log(p)).sum())

    def q_plus(self, signs: np.ndarray) -> float:
        p = self.posterior()
        positive = p[signs > 0].sum()
        negative = p[signs <= 0].sum()
        # Dividing by positive + negative, not by an assumed total of 1, makes q+ exactly 0
        # or 1 when one side has no mass. A plain sum of M posteriors 1/M can round to
        # 1 - 1e-16, which would charge a unanimous step about 4e-15 nats.
        return float(positive / (positive + negative))

    def step_budget(self, q_plus: float) -> float:
        """beta_t = remaining budget / steps left, capped at 0.999 H_b(q+)."""
        steps_left = max(self.total_steps - self.steps_done, 1)
        remaining = max(self.budget - self.mi_spent, 0.0)
        return min(remaining / steps_left, 0.999 * binary_entropy(q_plus))

    def release(self, step: StepInput) -> Release:
        signs = step.signs.numpy().astype(np.float64)
        secret_sign = float(signs[self.secret_index])
        q_plus = self.q_plus(signs)
        beta = self.step_budget(q_plus)
        self.steps_done += 1

        if min(q_plus, 1.0 - q_plus) < CERTAINTY_TOLERANCE:
            # Noiseless release. At q+ exactly 0 or 1 this leaks nothing; within the
            # tolerance it leaks H_b(q+) nats, which is charged.
            cost = binary_entropy(q_plus)
            self.mi_spent += cost
            self._condition_on_sign(signs, secret_sign)
            kind = "unanimous" if step.unanimous else "certain"
            return Release(value=secret_sign, kind=kind, mi_nats=cost, raw=secret_sign)

        if beta <= 0.0:
            raise RuntimeError("the MI budget is exhausted; the loop must stop before this step")
        sigma = calibrate_sigma(q_plus, beta)
        cost = charged_mi(q_plus, sigma)
        # The ledger is updated before the noisy value is drawn or used.
        self.mi_spent += cost
        raw = secret_sign + sigma * float(self.secret_rng.standard_normal())
        self.log_posterior += -((signs - raw) ** 2) / (2.0 * sigma**2)
        self.log_posterior -= np.logaddexp.reduce(self.log_posterior)
        value = 1.0 if raw >= 0 else -1.0
        return Release(value=value, kind="noisy", sigma=sigma, mi_nats=cost, raw=raw)

    def _condition_on_sign(self, signs: np.ndarray, released: float) -> None:
        with np.errstate(divide="ignore"):
            self.log_posterior = self.log_posterior + np.where(signs == released, 0.0, -np.inf)
        self.log_posterior -= np.logaddexp.reduce(self.log_posterior)

    def privacy(self) -> dict:
        return privacy_report(self.mi_spent)

    def exhausted(self) -> bool:
        """True once the budget is spent up to a relative 1e-9 (rounding of the per-step split)."""
        return self.mi_spent >= self.budget * (1.0 - 1e-9)

    def state_dict(self) -> dict:
        return {
            "mi_spent": self.mi_spent,
            "steps_done": self.steps_done,
            "log_posterior": self.log_posterior.tolist(),
            "secret_index": self.secret_index,
        }

    def load_state_dict(self, state: dict) -> None:
        self.mi_spent = state["mi_spent"]
        self.steps_done = state["steps_done"]
        self.log_posterior = np.asarray(state["log_posterior"], dtype=np.float64)
        self.secret_index = state["secret_index"]


class MeZORelease(ReleaseRule):
    """Non-private MeZO: the raw mean projected gradient of the pool or of a minibatch, unclipped.

    With `batch_size` below the pool size, each step draws a minibatch uniformly without
    replacement from `batch_rng`, a generator kept apart from the public stream so that
    the perturbation seeds stay the same as in the other modes.
    """

    name = "mezo"
    uses_subsets = False
    private = False

    def __init__(self, num_subsets: int, batch_size: int | None = None, batch_rng: np.random.Generator | None = None):
        super().__init__(clip=None)
        self.num_subsets = num_subsets
        self.batch_size = batch_size
        self.batch_rng = batch_rng if batch_rng is not None else np.random.default_rng()
        self.mi_spent = None  # no privacy accounting applies

    def sample_rows(self, pool_size: int) -> np.ndarray | None:
        if self.batch_size is None or self.batch_size >= pool_size:
            return None
        return np.sort(self.batch_rng.choice(pool_size, size=self.batch_size, replace=False))

    def release(self, step: StepInput) -> Release:
        return Release(value=float(step.per_example.to(torch.float64).mean()), kind="raw")


class DPZORelease(ReleaseRule):
    """DPZero (K = 1) and DP-AggZO (K directions): (epsilon, delta)-DP zeroth-order steps.

    Per step, each pool example enters the minibatch independently with probability q
    (Poisson sampling, from the secret generator). Example i's vector of K projected
    gradients is clipped to L2 norm C, the vectors are summed, Gaussian noise
    N(0, (sigma C)^2 I_K) is added, and the result is divided by the expected batch size
    q N. Adding or removing one example moves the sum by at most C in L2 norm, so this is
    the subsampled Gaussian mechanism, and sigma (the noise multiplier) comes from opacus'
    RDP accountant for the target (epsilon, delta) over T steps at sampling rate q.
    For K = 1 the L2 clip is the scalar clip of g_i to [-C, C].
    """

    name = "dpzero"
    uses_subsets = False

    def __init__(self, clip: float, epsilon: float, delta: float, sampling_rate: float, total_steps: int,
                 pool_size: int, secret_rng: np.random.Generator, directions: int = 1):
        from opacus.accountants.utils import get_noise_multiplier

        super().__init__(clip)
        if not (0.0 < epsilon and math.isfinite(epsilon)):
            raise ValueError(f"DP epsilon must be a positive number, got {epsilon}")
        if not 0.0 < delta < 1.0:
            raise ValueError(f"DP delta must be in (0, 1), got {delta}")
        if not 0.0 < sampling_rate <= 1.0:
            raise ValueError(f"the sampling rate must be in (0, 1], got {sampling_rate}")
        self.name = "dpzero" if directions == 1 else "dpaggzo"
        self.epsilon, self.delta = float(epsilon), float(delta)
        self.sampling_rate = float(sampling_rate)
        self.pool_size = pool_size
        self.secret_rng = secret_rng
        self.noise_multiplier = float(get_noise_multiplier(
            target_epsilon=epsilon, target_delta=delta, sample_rate=sampling_rate, steps=total_steps,
            accountant="rdp"))
        self.mi_spent = None

    def sample_rows(self, pool_size: int) -> np.ndarray:
        return np.flatnonzero(self.secret_rng.random(pool_size) < self.sampling_rate)

    def clip(self, grads: torch.Tensor) -> torch.Tensor:
        norms = grads.double().norm(dim=0)
        scale = (self.clip_bound / norms.clamp(min=1e-300)).clamp(max=1.0)
        return (grads.double() * scale).float()

    def release_step(self, inputs: list[StepInput]) -> list[Release]:
        directions = len(inputs)
        if inputs[0].per_example.numel():
            total = torch.stack([i.per_example for i in inputs]).double().sum(dim=1).numpy()
        else:
            total = np.zeros(directions)
        noise = self.secret_rng.normal(0.0, self.noise_multiplier * self.clip_bound, size=directions)
        values = (total + noise) / (self.sampling_rate * self.pool_size)
        return [Release(value=float(v), kind="dp_noisy", sigma=self.noise_multiplier * self.clip_bound)
                for v in values]

    def privacy(self) -> dict:
        # Matching epsilon-DP's membership-inference bound e^eps / (1 + e^eps); delta is
        # reported beside it and not folded in.
        return {"mi_spent_nats": None, "mia_bound": 1.0 / (1.0 + math.exp(-self.epsilon)),
                "matched_epsilon": self.epsilon, "dp_epsilon": self.epsilon, "dp_delta": self.delta,
                "noise_multiplier": self.noise_multiplier}


ABLATIONS = ("raw_full", "quant_full", "raw_half", "quant_half", "random_sign")


class AblationRelease(ReleaseRule):
    """The mechanism decomposition, none of it private; each isolates one ingredient of PACZero.

    - raw_full: the clipped full-pool mean of g_i (MeZO with clipping);
    - quant_full: its sign (what sign quantisation alone costs);
    - raw_half: the secret subset's mean (what training on half the pool costs);
    - quant_half: its sign, s_{S*}, which is PACZero-MI with infinite budget;
    - random_sign: a fair coin every step, a negative control that ignores the data.
    """

    private = False

    def __init__(self, kind: str, num_subsets: int, clip: float | None, secret_rng: np.random.Generator,
                 secret_index: int | None = None):
        if kind not in ABLATIONS:
            raise ValueError(f"unknown ablation {kind!r}; choose one of {', '.join(ABLATIONS)}")
        super().__init__(clip)
        self.name = kind
        self.num_subsets = num_subsets
        self.secret_index = draw_secret_index(secret_rng, num_subsets) if secret_index is None else secret_index
        self.mi_spent = None

    def release(self, step: StepInput) -> Release:
        if self.name == "raw_full":
            return Release(value=float(step.per_example.double().mean()), kind="raw")
        if self.name == "quant_full":
            return Release(value=1.0 if float(step.per_example.double().mean()) >= 0 else -1.0, kind="sign")
        if self.name == "raw_half":
            return Release(value=float(step.means[self.secret_index]), kind="raw")
        if self.name == "quant_half":
            return Release(value=float(step.signs[self.secret_index]), kind="sign")
        return Release(value=float(step.coin), kind="coin")

    def state_dict(self) -> dict:
        return {"mi_spent": None, "secret_index": self.secret_index}

    def load_state_dict(self, state: dict) -> None:
        self.secret_index = state["secret_index"]


def make_release_rule(mode: str, num_subsets: int, total_steps: int, mi_budget: float | None,
                      secret_rng: np.random.Generator, *, secret_index: int | None = None,
                      clip: float | None = None, directions: int = 1,
                      pool_size: int | None = None, batch_size: int | None = None,
                      batch_rng: np.random.Generator | None = None, dp_epsilon: float | None = None,
                      dp_delta: float = 1e-5, sampling_rate: float | None = None) -> ReleaseRule:
    """Build the release rule for `mode` (one of MODES)."""
    if mode == "zpl":
        return ZPLRelease(num_subsets, clip=clip)
    if mode == "mi":
        if mi_budget is None:
            raise ValueError("--mode mi needs --mi-budget, a positive number of nats (for example 0.33)")
        return MIRelease(num_subsets, mi_budget, total_steps, secret_rng, clip=clip, directions=directions,
                         secret_index=secret_index)
    if mode == "mezo":
        return MeZORelease(num_subsets, batch_size=batch_size, batch_rng=batch_rng)
    if mode in ("dpzero", "dpaggzo"):
        if dp_epsilon is None or sampling_rate is None or pool_size is None or clip is None:
            raise ValueError(f"--mode {mode} needs --dp-epsilon, --sampling-rate and --clip")
        return DPZORelease(clip, dp_epsilon, dp_delta, sampling_rate, total_steps, pool_size, secret_rng, directions)
    if mode in ABLATIONS:
        return AblationRelease(mode, num_subsets, clip, secret_rng, secret_index=secret_index)
    raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
