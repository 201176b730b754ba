"""Seeded SPSA, the memory-efficient zeroth-order core (MeZO, Malladi et al. 2023).

A step estimates the directional derivative of each example's loss along a random
direction z ~ N(0, I) over the trainable parameters:

    g_i = (l_i(theta + eps z) - l_i(theta - eps z)) / (2 eps)  ~=  <grad l_i(theta), z>

z is never stored. It is regenerated, one parameter tensor at a time, from a per-step seed
with a dedicated torch.Generator, so the memory cost is that of inference plus one
parameter-sized temporary. The weights are moved in place: +eps z, then -2 eps z, then
restore-and-update (+eps z - lr * release * z) in a single regeneration. No other copy
of the weights is kept.

Exactness: float addition is not associative, so theta + eps z - 2 eps z + eps z can differ
from theta in the last bit. The drift is the same for every run with the same public seed,
which is what the privacy argument needs (the trajectory is a function of public
randomness and the releases only).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

log = logging.getLogger("paczero")


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """Return the (name, parameter) pairs that SPSA perturbs: those with requires_grad set.

    For full fine-tuning that is every weight, for LoRA only the adapters. Tied weights
    (an input embedding shared with the LM head) appear once, so they are moved once.
    """
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def directions(params: list[torch.Tensor], seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (parameter, z) pairs, z ~ N(0, I) in fp32 with the parameter's shape, from `seed`.

    One generator per device, seeded identically, walks the parameters in a fixed order, so
    each call with the same seed yields bit-identical z on CPU and on CUDA. z is fp32 for
    every weight dtype, so fp16 and fp32 runs move along the same direction. Each z is
    released before the next one is drawn.
    """
    generators: dict[torch.device, torch.Generator] = {}
    for p in params:
        generator = generators.get(p.device)
        if generator is None:
            generator = torch.Generator(device=p.device)
            generator.manual_seed(seed)
            generators[p.device] = generator
        z = torch.randn(p.shape, generator=generator, device=p.device, dtype=torch.float32)
        yield p, z


@torch.no_grad()
def perturb_(params: list[torch.Tensor], seed: int, scale: float) -> None:
    """theta <- theta + scale * z(seed), in place, one tensor at a time.

    For fp16/bf16 weights the sum is formed in fp32 (the dtype of z) and rounded once.
    """
    for p, z in directions(params, seed):
        p.add_(z, alpha=scale)


@dataclass
class ProjectedGradients:
    """Per-example SPSA estimates and the two losses they came from, all fp32, shape (N,)."""

    grads: torch.Tensor
    loss_plus: torch.Tensor
    loss_minus: torch.Tensor

    @property
    def mean_loss(self) -> float:
        """The pool loss at theta, estimated by the mean of the two perturbed losses at no extra cost."""
        return float((self.loss_plus + self.loss_minus).mean() / 2)


def projected_gradients(params: list[torch.Tensor], seed: int, eps: float,
                        per_example_losses: Callable[[], torch.Tensor]) -> ProjectedGradients:
    """Two forward passes over the pool give every example's projected gradient g_i.

    Leaves the weights at theta - eps z: the caller finishes the step with
    `restore_and_update_`, which needs the same seed and eps.
    `per_example_losses()` returns the (N,) losses of the pool at the current weights.
    """
    perturb_(params, seed, eps)
    loss_plus = per_example_losses().float()
    perturb_(params, seed, -2.0 * eps)
    loss_minus = per_example_losses().float()
    grads = (loss_plus - loss_minus) / (2.0 * eps)
    return ProjectedGradients(grads=grads, loss_plus=loss_plus, loss_minus=loss_minus)


def restore_and_update_(params: list[torch.Tensor], seed: int, eps: float, step: float) -> None:
    """From theta - eps z go to theta - step * z in one regeneration of z.

    `step` is lr_t times the release (a sign for PACZero, the raw gradient for MeZO).
    """
    perturb_(params, seed, eps - step)


def rounded_away_fraction(params: list[torch.Tensor], eps: float, sample: int = 1_000_000) -> float:
    """Estimate the fraction of weights whose perturbation by eps (|z| = 1) rounds away in their dtype.

    A float w of dtype d is represented to within half a spacing, and the spacing near w is
    about finfo(d).eps * |w|. Adding eps * z changes the stored value only if |eps * z|
    exceeds half that spacing. The estimate uses up to `sample` evenly spaced entries.
    """
    low_precision = [p for p in params if p.dtype in (torch.float16, torch.bfloat16)]
    if not low_precision:
        return 0.0
    total = sum(p.numel() for p in params)
    rounded = 0.0
    for p in low_precision:
        flat = p.detach().reshape(-1)
        stride = max(1, flat.numel() * len(params) // sample)
        values = flat[::stride].float().abs()
        half_spacing = values * torch.finfo(p.dtype).eps / 2
        rounded += float((half_spacing > eps).float().mean()) * p.numel()
    return rounded / total


def warn_if_rounded_away(params: list[torch.Tensor], eps: float, threshold: float = 0.01) -> float:
    """Log a warning when more than `threshold` of the weights would not move under eps * z."""
    fraction = rounded_away_fraction(params, eps)
    if fraction > threshold:
        dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})
        log.warning(
            "--zo-eps %g is below the resolution of %.1f %% of the %s weights: their perturbation rounds "
            "away and their projected gradients read as 0. Raise --zo-eps or use --dtype fp32.",
            eps, 100 * fraction, "/".join(dtypes))
    return fraction
