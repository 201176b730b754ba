"""Benchmark of one PACZero step against its floor, and of the weight drift of in-place SPSA.

A step cannot cost less than two forward passes over the pool plus one regeneration of z.
`run_bench` measures, in the same process and on the same pool:
- the step as `paczero.paczero_step` runs it (seconds per step, tokens per second);
- its phases: forward at +eps, forward at -eps, regenerating z and updating, the release
  mechanism, and the rest (bookkeeping);
- the floor: two bare forward passes plus one pass that only draws z;
- optionally (`baseline`) the per-step work of the paper's public release as described
  in its text: a third full-pool pass to log the loss, every label word scored as its own
  sequence with logits at every position, four regenerations of z, and fixed
  micro-batches of 64 in data order, padded to the longest in each.

`weight_drift` measures how far weights move from exact restoration after many
+eps, -2 eps, +eps cycles with no update, in fp32, fp16 and bf16.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import resource
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

import data as data_lib
import mechanisms
import models
import paczero
import zo
from evaluate import GenerationScorer, LabelWordScorer

log = logging.getLogger("paczero.bench")

# Dense fp16/bf16 tensor-core peaks in FLOP/s from the vendors' datasheets, used for the
# model FLOP utilisation. A device not listed gets "n/a".
PEAK_FLOPS = {"H200": 989.4e12, "H100": 989.4e12, "A100": 312e12, "L4": 121e12, "A10G": 125e12}


@dataclass
class BenchConfig:
    model: str = models.SMOLLM2_NAME
    task: str = "sst2"
    tuning: str = "lora"
    dtype: str = "auto"
    device: str = "auto"
    pool_size: int = 256
    micro_batch_size: int | None = None
    steps: int = 5
    warmup: int = 1
    baseline: bool = False
    data_dir: str | None = None
    data: str | None = None  # --task classification or generation: the user's file
    label_words: str | None = None
    text_column: str = "text"
    label_column: str = "label"
    prompt_column: str = "prompt"
    answers_column: str = "answers"
    template: str | None = None
    num_subsets: int = 16
    max_new_tokens: int = 50
    seed: int = 0


class PhaseTimer:
    """Wall-clock totals per named phase, synchronising CUDA so that each phase owns its kernels."""

    def __init__(self, device: torch.device):
        self.device = device
        self.totals: dict[str, float] = {}

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextmanager
    def phase(self, name: str):
        self.sync()
        started = time.perf_counter()
        yield
        self.sync()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - started


class PaperReleaseScorer(LabelWordScorer):
    """Label-word scoring as the paper's public release does it: each word as its own sequence."""

    sort_by_length = False
    keep_all_logits = True

    def __init__(self, tokenizer, template, max_length=None):
        super().__init__(tokenizer, template, max_length)
        self.single_token = False  # score " great" and " terrible" as two sequences


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)  # ru_maxrss is KiB on Linux


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def forward_flops(model, tokens: int) -> float:
    """About 2 FLOPs per parameter per token for a forward pass (the matmul count; attention's
    sequence-length term is left out, a few per cent at these lengths)."""
    params = sum(p.numel() for p in model.parameters())
    return 2.0 * params * tokens


def _prepare(cfg: BenchConfig):
    train_cfg = paczero.TrainConfig(
        model=cfg.model, task=cfg.task, tuning=cfg.tuning, dtype=cfg.dtype, device=cfg.device,
        pool_size=cfg.pool_size, dev_size=1, test_size=1, micro_batch_size=cfg.micro_batch_size,
        data_dir=cfg.data_dir, data=cfg.data, label_words=cfg.label_words, text_column=cfg.text_column,
        label_column=cfg.label_column, prompt_column=cfg.prompt_column, answers_column=cfg.answers_column,
        template=cfg.template, num_subsets=cfg.num_subsets, steps=cfg.warmup + cfg.steps,
        max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, secret_seed=cfg.seed + 1, output_dir="-", zero_shot=False)
    train_cfg = paczero.resolve_defaults(train_cfg)
    prepared = paczero.prepare(train_cfg)
    return train_cfg, prepared


def _make_run(train_cfg, prepared) -> paczero.Run:
    model, scorer, pool = prepared.model, prepared.scorer, prepared.pool
    public_rng = np.random.default_rng(train_cfg.seed)
    membership = mechanisms.membership_matrix(len(pool), train_cfg.num_subsets, public_rng)
    rule = mechanisms.make_release_rule(train_cfg.mode, train_cfg.num_subsets, train_cfg.steps, None,
                                        np.random.default_rng(train_cfg.secret_seed), clip=train_cfg.clip)
    return paczero.Run(cfg=train_cfg, model=model, named_params=zo.trainable_parameters(model),
                       pool_losses=lambda rows: scorer.losses(model, pool), pool_size=len(pool),
                       membership=membership, rule=rule, public_rng=public_rng)


def _time_steps(run: paczero.Run, timer: PhaseTimer, first_step: int, count: int) -> tuple[list[float], list[dict]]:
    seconds, records = [], []
    for step in range(first_step, first_step + count):
        timer.sync()
        started = time.perf_counter()
        records.append(paczero.paczero_step(run, step))
        timer.sync()
        seconds.append(time.perf_counter() - started)
    return seconds, records


@contextmanager
def _instrumented(run: paczero.Run, timer: PhaseTimer):
    """Route the step's phases through the timer by wrapping the functions it calls."""
    original_perturb = zo.perturb_
    original_losses = run.pool_losses
    original_release = run.rule.release_step
    original_build = mechanisms.StepInput.build
    build_descriptor = mechanisms.StepInput.__dict__["build"]
    calls = {"n": 0}

    def timed_perturb(params, seed, scale):
        with timer.phase("z regeneration and update"):
            original_perturb(params, seed, scale)

    def timed_losses(rows):
        name = "forward at +eps" if calls["n"] % 2 == 0 else "forward at -eps"
        calls["n"] += 1
        with timer.phase(name):
            return original_losses(rows)

    def timed_release(inputs):
        with timer.phase("mechanism"):
            return original_release(inputs)

    def timed_build(per_example, coin, membership):
        with timer.phase("mechanism"):
            return original_build(per_example, coin, membership)

    zo.perturb_ = timed_perturb
    run.pool_losses = timed_losses
    run.rule.release_step = timed_release
    mechanisms.StepInput.build = staticmethod(timed_build)
    try:
        yield
    finally:
        zo.perturb_ = original_perturb
        run.pool_losses = original_losses
        run.rule.release_step = original_release
        mechanisms.StepInput.build = build_descriptor


def _time_floor(run: paczero.Run, timer: PhaseTimer, repeats: int) -> float:
    """Two bare forward passes over the pool plus one pass that only draws z, per step."""
    total = 0.0
    for repeat in range(repeats):
        timer.sync()
        started = time.perf_counter()
        run.pool_losses(None)
        run.pool_losses(None)
        for _ in zo.directions(run.params, seed=10_000 + repeat):
            pass
        timer.sync()
        total += time.perf_counter() - started
    return total / repeats


def _time_paper_baseline(run: paczero.Run, prepared, train_cfg, timer: PhaseTimer, repeats: int) -> float:
    """Per-step work of the paper's public release, re-created on the same model and pool."""
    model = prepared.model
    if train_cfg.task == "sst2":
        template = data_lib.get_template(train_cfg.task, train_cfg.template)
        scorer = PaperReleaseScorer(prepared.scorer.tokenizer, template, prepared.scorer.max_length)
        pool = scorer.encode(prepared.split.pool, 64).to(prepared.device)
    else:
        scorer = GenerationScorer(prepared.scorer.tokenizer, prepared.scorer.template, prepared.scorer.max_length,
                                  prepared.scorer.max_new_tokens)
        scorer.sort_by_length = False
        pool = scorer.encode(prepared.split.pool, 64).to(prepared.device)
    eps = train_cfg.zo_eps
    total = 0.0
    for repeat in range(repeats):
        seed = 20_000 + repeat
        timer.sync()
        started = time.perf_counter()
        zo.perturb_(run.params, seed, eps)               # regeneration 1
        plus = scorer.losses(model, pool)
        zo.perturb_(run.params, seed, -2 * eps)          # regeneration 2
        minus = scorer.losses(model, pool)
        zo.perturb_(run.params, seed, eps)               # regeneration 3: restore
        logged = scorer.losses(model, pool)              # the third pass, only to log the loss
        grads = (plus - minus) / (2 * eps)
        means = mechanisms.subset_means(run.membership, grads.clamp(-train_cfg.clip, train_cfg.clip))
        sign = float(mechanisms.subset_signs(means)[0])
        zo.perturb_(run.params, seed, -1e-7 * sign)      # regeneration 4: the update
        del logged
        timer.sync()
        total += time.perf_counter() - started
    return total / repeats


def run_bench(cfg: BenchConfig) -> dict:
    """Time steps, phases, the floor and optionally the paper-release baseline; return the figures."""
    train_cfg, prepared = _prepare(cfg)
    device = prepared.device
    run = _make_run(train_cfg, prepared)
    timer = PhaseTimer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    _time_steps(run, timer, 0, cfg.warmup)
    step_seconds, records = _time_steps(run, timer, cfg.warmup, cfg.steps)
    with _instrumented(run, timer):
        _time_steps(run, timer, cfg.warmup + cfg.steps, 1)
    floor = _time_floor(run, timer, max(1, min(cfg.steps, 3)))
    step = float(np.median(step_seconds))
    tokens = 2 * prepared.pool.num_tokens
    phases = dict(timer.totals)
    phases["bookkeeping"] = max(0.0, step - sum(phases.values()))

    figures = {
        "model": cfg.model, "task": cfg.task, "tuning": cfg.tuning, "dtype": str(next(prepared.model.parameters()).dtype),
        "device": paczero.hardware_description(device), "pool_size": len(prepared.pool),
        "micro_batch_size": prepared.micro_batch_size, "steps_timed": cfg.steps,
        "trainable_params": sum(p.numel() for p in run.params),
        "seconds_per_step": step, "seconds_per_step_all": step_seconds, "phases_seconds": phases,
        "floor_seconds": floor, "step_over_floor": step / floor, "tokens_per_second": tokens / step,
        "pool_tokens": prepared.pool.num_tokens, "peak_memory_bytes": peak_memory_bytes(device),
        "zero_difference_rate": float(np.mean([r["zero_differences"] for r in records])) / len(prepared.pool),
        "unanimity_rate": float(np.mean([bool(r["unanimous"]) for r in records])),
    }
    flops = peak_flops(device)
    figures["mfu"] = None if flops is None else forward_flops(prepared.model, tokens) / step / flops
    if cfg.baseline:
        baseline = _time_paper_baseline(run, prepared, train_cfg, timer, max(1, min(cfg.steps, 3)))
        figures["baseline_seconds_per_step"] = baseline
        figures["speedup_over_baseline"] = baseline / step
    return figures


@torch.no_grad()
def weight_drift(cfg: BenchConfig, cycles: int, dtypes=("fp32", "fp16", "bf16"),
                 max_elements: int = 5_000_000) -> list[dict]:
    """Distance from exact restoration after `cycles` of +eps z, -2 eps z, +eps z, per weight dtype.

    The trainable parameters are copied and moved: LoRA adapters (cast to each dtype here,
    although peft keeps them in fp32 in training) or, for full fine-tuning, the first
    `max_elements` entries in parameter order (the last tensor cut to fit), because drawing
    z for every weight thousands of times is slow on a CPU.
    """
    train_cfg, prepared = _prepare(dataclasses.replace(cfg, dtype="fp32"))
    source, total = [], 0
    for _, p in zo.trainable_parameters(prepared.model):
        if total >= max_elements:
            break
        entries = p.detach().reshape(-1)[: max_elements - total].clone()
        source.append(entries)
        total += entries.numel()
    rows = []
    for name in dtypes:
        dtype = models.resolve_dtype(name, prepared.device)
        params = [p.to(dtype) for p in source]
        start = [p.clone() for p in params]
        started = time.perf_counter()
        for cycle in range(cycles):
            seed = 30_000 + cycle
            zo.perturb_(params, seed, train_cfg.zo_eps)
            zo.perturb_(params, seed, -2 * train_cfg.zo_eps)
            zo.perturb_(params, seed, train_cfg.zo_eps)
        diff = torch.cat([(p.float() - s.float()).reshape(-1) for p, s in zip(params, start)])
        norm = torch.cat([s.float().reshape(-1) for s in start]).norm()
        changed = float((diff != 0).float().mean())
        rows.append({"dtype": name, "cycles": cycles, "eps": train_cfg.zo_eps, "max_abs_drift": float(diff.abs().max()),
                     "relative_l2_drift": float(diff.norm() / norm) if norm > 0 else math.nan,
                     "fraction_changed": changed, "seconds": time.perf_counter() - started,
                     "elements": int(diff.numel())})
    return rows
