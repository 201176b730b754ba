"""Seeded SPSA: regenerated directions, projected gradients against autograd, in-place moves."""

from __future__ import annotations

import pytest
import torch

import models
import paczero
import zo
from conftest import tiny_opt

PROMPTS = ["a dull film It was", "a truly wonderful story , really wonderful It was", "bland It was"]
LABELS = [0, 1, 0]
LABEL_TOKENS = [7818, 1049]  # " terrible", " great" in GPT-2 BPE


def prompt_ids(tokenizer) -> list[torch.Tensor]:
    return [torch.tensor(tokenizer(p)["input_ids"]) for p in PROMPTS]


def label_word_losses(model, ids: list[torch.Tensor]) -> torch.Tensor:
    """Compute each prompt's cross-entropy over the two label words, one unpadded forward pass each."""
    losses = []
    for sequence, label in zip(ids, LABELS):
        log_probs = torch.log_softmax(model(input_ids=sequence[None]).logits[0, -1], dim=-1)
        scores = log_probs[LABEL_TOKENS]
        losses.append(torch.nn.functional.cross_entropy(scores[None], torch.tensor([label])))
    return torch.stack(losses)


def trainable(model) -> list[torch.Tensor]:
    return [p for _, p in zo.trainable_parameters(model)]


def clones(params: list[torch.Tensor]) -> list[torch.Tensor]:
    return [p.detach().clone() for p in params]


def test_directions_same_seed_identical(tokenizer):
    params = trainable(tiny_opt(tokenizer))
    first = [z for _, z in zo.directions(params, 42)]
    again = [z for _, z in zo.directions(params, 42)]
    assert len(first) == len(params)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


def test_directions_other_seed_differs(tokenizer):
    params = trainable(tiny_opt(tokenizer))
    first = [z for _, z in zo.directions(params, 42)]
    other = [z for _, z in zo.directions(params, 43)]
    assert not any(torch.equal(a, b) for a, b in zip(first, other))


def test_directions_fp32_with_param_shape(tokenizer):
    params = trainable(tiny_opt(tokenizer).half())
    for p, z in zo.directions(params, 0):
        assert z.dtype == torch.float32
        assert z.shape == p.shape


def test_trainable_parameters_tied_once(tokenizer):
    model = tiny_opt(tokenizer)
    names = [name for name, _ in zo.trainable_parameters(model)]
    pointers = [p.data_ptr() for _, p in zo.trainable_parameters(model)]
    assert len(set(pointers)) == len(pointers)
    assert model.lm_head.weight.data_ptr() in pointers
    assert len(names) == len(list(model.parameters()))


def test_projected_gradients_match_autograd(tokenizer):
    # GELU, not OPT's ReLU: with ReLU a perturbation can cross a kink, and the central
    # difference then differs from the derivative by a few percent. fp64 weights keep
    # rounding out of the finite difference, so what is left is the fp32 loss cast
    # (about 3e-4 at eps 1e-4) and the O(eps^2) truncation.
    model = tiny_opt(tokenizer, activation="gelu").double()
    ids = prompt_ids(tokenizer)
    params = trainable(model)
    seed, eps = 11, 1e-4

    expected = []
    directions = [z.double() for _, z in zo.directions(params, seed)]
    for i in range(len(PROMPTS)):
        loss = label_word_losses(model, ids)[i]
        grads = torch.autograd.grad(loss, params)
        expected.append(float(sum((g * z).sum() for g, z in zip(grads, directions))))

    with torch.no_grad():
        estimate = zo.projected_gradients(params, seed, eps, lambda: label_word_losses(model, ids))
    assert estimate.grads.dtype == torch.float32
    assert estimate.grads.shape == (len(PROMPTS),)
    for got, want in zip(estimate.grads.tolist(), expected):
        assert abs(got - want) <= 1e-3 * abs(want) + 1e-3, (got, want)


def test_projected_gradients_mean_loss(tokenizer):
    model = tiny_opt(tokenizer)
    ids = prompt_ids(tokenizer)
    params = trainable(model)
    with torch.no_grad():
        estimate = zo.projected_gradients(params, 3, 1e-3, lambda: label_word_losses(model, ids))
    manual = (estimate.loss_plus.mean() + estimate.loss_minus.mean()) / 2
    assert estimate.mean_loss == pytest.approx(float(manual), rel=1e-6)
    assert torch.equal(estimate.grads, (estimate.loss_plus - estimate.loss_minus) / 2e-3)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-15), (torch.float32, 1e-6)])
def test_restore_after_zero_step(tokenizer, dtype, tolerance):
    model = tiny_opt(tokenizer).to(dtype)
    ids = prompt_ids(tokenizer)
    params = trainable(model)
    originals = clones(params)
    with torch.no_grad():
        zo.projected_gradients(params, 5, 1e-3, lambda: label_word_losses(model, ids))
        moved = max(float((p - o).abs().max()) for p, o in zip(params, originals))
        zo.restore_and_update_(params, 5, 1e-3, step=0.0)
    assert moved > 1e-4
    for p, o in zip(params, originals):
        assert float((p.detach() - o).abs().max()) <= tolerance


def test_restore_and_update_moves_along_z(tokenizer):
    model = tiny_opt(tokenizer).double()
    params = trainable(model)
    originals = clones(params)
    zo.perturb_(params, 9, -1e-3)  # where projected_gradients leaves the weights
    zo.restore_and_update_(params, 9, 1e-3, step=0.05)
    for (p, z), o in zip(zo.directions(params, 9), originals):
        torch.testing.assert_close(p.detach(), o - 0.05 * z.double(), rtol=0.0, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_perturb_low_precision(tokenizer, dtype):
    params = trainable(tiny_opt(tokenizer).to(dtype))
    originals = clones(params)
    zo.perturb_(params, 4, 1e-2)
    for (p, z), o in zip(zo.directions(params, 4), originals):
        assert p.dtype == dtype
        # The sum is formed in fp32 and rounded to the weight dtype once.
        assert torch.equal(p.detach(), torch.add(o.float(), z, alpha=1e-2).to(dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_projected_gradients_low_precision(tokenizer, dtype):
    model = tiny_opt(tokenizer).to(dtype)
    ids = prompt_ids(tokenizer)
    params = trainable(model)
    originals = clones(params)
    with torch.no_grad():
        estimate = zo.projected_gradients(params, 5, 1e-2, lambda: label_word_losses(model, ids))
        zo.restore_and_update_(params, 5, 1e-2, step=0.0)
    assert estimate.grads.dtype == torch.float32
    assert bool(torch.isfinite(estimate.grads).all())
    for p, o in zip(params, originals):
        torch.testing.assert_close(p.detach().float(), o.float(), rtol=0.0, atol=0.05)


def test_lora_step_keeps_base_weights(tokenizer):
    cfg = paczero.TrainConfig(tuning="lora", seed=0)
    model = models.apply_tuning(tiny_opt(tokenizer), cfg)
    named = zo.trainable_parameters(model)
    assert named
    assert all("lora_" in name for name, _ in named)

    frozen = [(name, p) for name, p in model.named_parameters() if not p.requires_grad]
    base_hash = paczero.params_sha256(frozen)
    adapter_hash = paczero.params_sha256(named)
    ids = prompt_ids(tokenizer)
    params = [p for _, p in named]
    with torch.no_grad():
        for seed in range(3):
            zo.projected_gradients(params, seed, 1e-3, lambda: label_word_losses(model, ids))
            zo.restore_and_update_(params, seed, 1e-3, step=0.1)
    assert paczero.params_sha256(frozen) == base_hash
    assert paczero.params_sha256(named) != adapter_hash


def test_lora_init_from_public_seed(tokenizer):
    # peft draws the A matrices at random, so the public seed must fix them for runs to repeat.
    first = models.apply_tuning(tiny_opt(tokenizer), paczero.TrainConfig(tuning="lora", seed=0))
    again = models.apply_tuning(tiny_opt(tokenizer), paczero.TrainConfig(tuning="lora", seed=0))
    other = models.apply_tuning(tiny_opt(tokenizer), paczero.TrainConfig(tuning="lora", seed=1))
    first_hash = paczero.params_sha256(zo.trainable_parameters(first))
    assert paczero.params_sha256(zo.trainable_parameters(again)) == first_hash
    assert paczero.params_sha256(zo.trainable_parameters(other)) != first_hash
