"""Empirical membership-inference audit of a finished run.

The privacy claim of a run is a bound p on the success of any membership-inference attack
against the released model (prior 1/2). This module runs one concrete attack and reports
how well it does next to that bound:

- score each pool example by its loss at the run's final weights (a lower loss suggests
  the example was trained on, the classic loss-threshold attack);
- members are the examples of the secret subset S*, non-members the rest of the pool;
  S* and the subsets are rebuilt from the run's --seed and --secret-seed;
- report the ROC AUC of the score (0.5 = no signal) with a bootstrap interval, and the
  success rate of a threshold attack whose threshold is chosen on one half of the pool
  and applied to the other (two-fold cross-fitting, so the rate is not inflated by
  choosing the threshold on the examples it is scored on).

Two baselines keep the figures honest, because with a small pool the loss of a fixed set of
examples can separate them by chance, before any training:
- the same attack at the initial weights (the model before its first step);
- the same attack against each of the M public candidate subsets. Before training every
  subset is equally likely to be S*, so these M AUCs are the attack's null distribution.
  The rank of S* among them is what an attacker who bets on the most member-like subset
  would learn; for ZPL it is uniform on 1..M.

For ZPL the released model is a function of public randomness only, so S* must look like
any other candidate subset. A non-private run that trains on the secret half (raw_half)
can push S* to the top, which shows the attack has power. For MeZO and the DP modes every
pool example is trained on, so membership in S* is not what they protect.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import torch

import mechanisms
import paczero


def roc_auc(scores: np.ndarray, members: np.ndarray) -> float:
    """P(score of a random member > score of a random non-member), ties counted 1/2 (Mann-Whitney U)."""
    positive, negative = scores[members], scores[~members]
    if len(positive) == 0 or len(negative) == 0:
        raise ValueError("the AUC needs at least one member and one non-member")
    order = np.argsort(np.concatenate([positive, negative]), kind="mergesort")
    ranks = np.empty(len(order))
    combined = np.concatenate([positive, negative])[order]
    # Average ranks over ties, so tied scores contribute 1/2.
    start = 0
    while start < len(combined):
        end = start
        while end + 1 < len(combined) and combined[end + 1] == combined[start]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    rank_sum = ranks[:len(positive)].sum()
    u = rank_sum - len(positive) * (len(positive) + 1) / 2
    return float(u / (len(positive) * len(negative)))


def best_threshold(scores: np.ndarray, members: np.ndarray) -> tuple[float, float]:
    """The threshold t maximising balanced accuracy of 'member iff score >= t', and that accuracy."""
    best_t, best_acc = -np.inf, 0.5
    for t in np.unique(scores):
        predicted = scores >= t
        acc = 0.5 * (predicted[members].mean() + (~predicted[~members]).mean())
        if acc > best_acc:
            best_t, best_acc = float(t), float(acc)
    return best_t, best_acc


def cross_fitted_success(scores: np.ndarray, members: np.ndarray, rng: np.random.Generator) -> float:
    """Balanced accuracy of the threshold attack, thresholds fitted on the other half (2 folds)."""
    fold = rng.permutation(len(scores)) % 2 == 0
    rates = []
    for fit, test in ((fold, ~fold), (~fold, fold)):
        threshold, _ = best_threshold(scores[fit], members[fit])
        predicted = scores[test] >= threshold
        test_members = members[test]
        rates.append(0.5 * (predicted[test_members].mean() + (~predicted[~test_members]).mean()))
    return float(np.mean(rates))


def bootstrap_auc(scores: np.ndarray, members: np.ndarray, rng: np.random.Generator,
                  resamples: int = 1000) -> tuple[float, float]:
    """95 % percentile interval of the AUC, resampling members and non-members separately."""
    member_idx, other_idx = np.flatnonzero(members), np.flatnonzero(~members)
    values = []
    for _ in range(resamples):
        idx = np.concatenate([rng.choice(member_idx, len(member_idx)), rng.choice(other_idx, len(other_idx))])
        values.append(roc_auc(scores[idx], members[idx]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def candidate_subsets(cfg: paczero.TrainConfig, pool_size: int) -> tuple[np.ndarray, int]:
    """The (M, N) public membership matrix of this run and the index of its secret subset S*."""
    membership = mechanisms.membership_matrix(pool_size, cfg.num_subsets, np.random.default_rng(cfg.seed))
    secret = mechanisms.draw_secret_index(np.random.default_rng(cfg.secret_seed), cfg.num_subsets)
    return membership.numpy().astype(bool), secret


def secret_members(cfg: paczero.TrainConfig, pool_size: int) -> np.ndarray:
    """Boolean mask over the pool: which examples are in the secret subset S* of this run."""
    membership, secret = candidate_subsets(cfg, pool_size)
    return membership[secret]


def audit_run(run_dir: str, resamples: int = 1000, seed: int = 0, weights: str = "final") -> dict:
    """Attack the final (or dev-best) weights of the run in `run_dir`; return the figures (also in audit.json)."""
    config_path = os.path.join(run_dir, "config.json")
    result_path = os.path.join(run_dir, "result.json")
    for path in (config_path, result_path):
        if not os.path.isfile(path):
            raise paczero.ConfigError(f"{path} not found; audit needs a finished run folder written by train")
    with open(config_path, encoding="utf-8") as handle:
        cfg = paczero.TrainConfig(**json.load(handle)["options"])
    with open(result_path, encoding="utf-8") as handle:
        result = json.load(handle)
    cfg = paczero.resolve_defaults(dataclasses.replace(cfg, dev_size=1, test_size=1))
    prepared = paczero.prepare(cfg)  # theta_0: the base model, with LoRA initialised from --seed
    with torch.inference_mode():
        initial_losses = prepared.scorer.losses(prepared.model, prepared.pool).double().numpy()
    paczero.load_run_weights(prepared.model, cfg, run_dir, which=weights)
    with torch.inference_mode():
        losses = prepared.scorer.losses(prepared.model, prepared.pool).double().numpy()
    membership, secret = candidate_subsets(cfg, len(prepared.pool))
    members = membership[secret]
    scores = -losses
    candidate_aucs = np.array([roc_auc(scores, row) for row in membership])
    rng = np.random.default_rng(seed)
    low, high = bootstrap_auc(scores, members, rng, resamples)
    figures = {
        "run_dir": run_dir, "mode": cfg.mode, "weights": weights, "pool_size": len(scores), "members": int(members.sum()),
        "auc": roc_auc(scores, members), "auc_ci95": [low, high],
        "auc_initial_weights": roc_auc(-initial_losses, members),
        "secret_rank_among_subsets": int(1 + (candidate_aucs > candidate_aucs[secret]).sum()),
        "num_subsets": int(len(candidate_aucs)),
        "candidate_auc_median": float(np.median(candidate_aucs)),
        "candidate_auc_range95": [float(np.percentile(candidate_aucs, 2.5)), float(np.percentile(candidate_aucs, 97.5))],
        "protects_membership_in_secret_subset": cfg.mode in ("zpl", "mi"),
        "attack_success_cross_fitted": cross_fitted_success(scores, members, rng),
        "attack_success_in_sample": best_threshold(scores, members)[1],
        "mia_bound": result.get("mia_bound"), "mi_spent_nats": result.get("mi_spent_nats"),
        "mean_loss_members": float(losses[members].mean()), "mean_loss_non_members": float(losses[~members].mean()),
    }
    paczero.write_json(os.path.join(run_dir, "audit.json"), figures)
    return figures
