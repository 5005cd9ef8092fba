"""The same checks on a CUDA device (skipped without one): the layer's equivalence with nn.Linear and
autograd in float32, a training step with bfloat16 weights that stays exact, bases held once per role.
SPARSEGRAD_TEST_DEVICE=cpu runs them on the CPU (to check the tests themselves)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCausalLM

import sparsegrad
from sparsegrad.layer import SparseGradLinear

DEVICE = os.environ.get("SPARSEGRAD_TEST_DEVICE", "cuda")
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and not torch.cuda.is_available(), reason="needs a CUDA device")
D_IN, D_OUT, K = 48, 80, 300
VARIANTS = {"fixed": {"mode": "fixed"}, "block": {"mode": "fixed", "structure": "block"}, "dynamic": {"mode": "dynamic"},
            "meprop": {"mode": "meprop"}}  # the fixed mode with each structure of its support


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()


@pytest.mark.parametrize("variant", ["fixed", "block", "dynamic"])
def test_layer_matches_linear_on_cuda(variant):
    torch.manual_seed(0)
    mode = VARIANTS[variant]["mode"]
    lin = nn.Linear(D_IN, D_OUT).to(DEVICE)
    layer = SparseGradLinear.from_linear(lin, k=K, **VARIANTS[variant], U=orthogonal(D_IN, 1).to(DEVICE),
                                         V=orthogonal(D_OUT, 2).to(DEVICE), energy=torch.rand(D_IN, D_OUT))
    assert mode != "fixed" or layer.structure == VARIANTS[variant].get("structure", "scattered")
    x = torch.randn(4, 6, D_IN, device=DEVICE, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x_ref, lin.weight, lin.bias), rtol=1e-5, atol=1e-5)
    dy = torch.randn_like(y)
    y.backward(dy)
    F.linear(x_ref, lin.weight, lin.bias).backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-5)
    # the trained tensor's gradient: U G V^T at the support (fixed) or its top-k (dynamic)
    G = x.detach().reshape(-1, D_IN).t().double() @ dy.reshape(-1, D_OUT).double()
    full = layer.U.double() @ G @ layer.V.double().t()
    grad = layer.trainable.grad
    if mode == "fixed":
        torch.testing.assert_close(grad.double(), full[layer.rows.long(), layer.cols.long()], rtol=1e-4, atol=1e-4)
    else:
        dense = grad.to_dense().double()
        assert int(dense.ne(0).sum()) == K
        torch.testing.assert_close(dense[dense != 0], full[dense != 0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("variant", ["fixed", "block", "dynamic"])
def test_bfloat16_training_step_on_cuda_is_exact(tiny_llama_dir, variant):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16).to(DEVICE)
    batch = {"input_ids": torch.randint(5, 1000, (2, 24), device=DEVICE)}
    batch["labels"] = batch["input_ids"]
    bases = sparsegrad.compute_bases(model, [batch], n_steps=1, progress=False)
    originals = {n: m.weight.detach().clone() for n, m in sparsegrad.find_targets(model).items()}
    model.requires_grad_(False)
    sparsegrad.apply(model, bases, density=0.1, **VARIANTS[variant])
    layers = sparsegrad.sparse_layers(model)
    assert len({id(m.U) for m in layers.values()}) == len({sparsegrad.targets.role_of(n) for n in layers})
    assert all(m.U.device.type == DEVICE and m.U.dtype == torch.float32 for m in layers.values())
    opt = sparsegrad.optimizer(model, lr=1e-3)
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert torch.isfinite(loss)
    state = model.state_dict()  # folds first
    for name, layer in layers.items():
        rows, cols, values = layer.trained_entries()
        S = torch.zeros(layer.in_features, layer.out_features, dtype=torch.float64, device=DEVICE)
        S[rows.long(), cols.long()] = values.double()
        ref = (originals[name].double() + (layer.U.double().t() @ S @ layer.V.double()).t()).bfloat16()
        diff = (state[f"{name}.weight"].float() - ref.float()).abs()
        assert bool((diff <= ref.float().abs() * 2**-7).all())  # within one bfloat16 ulp of float64


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_training_step_never_waits_for_the_device(variant):
    """A steady-state step (forward, backward, clipping, optimizer step and its fold, zero_grad) under
    torch.cuda.set_sync_debug_mode("error"): any read-back raises. The top-k modes' lazy optimizer
    state grows now and then (one read-back, amortised): their steps run once the store has room."""
    from sparsegrad.readbacks import ReadBackCounter

    torch.manual_seed(0)
    mode = VARIANTS[variant]["mode"]
    d_in, d_out = 64, 96
    layer = SparseGradLinear.from_linear(nn.Linear(d_in, d_out), k=200, **VARIANTS[variant], U=orthogonal(d_in, 1),
                                         V=orthogonal(d_out, 2), energy=torch.rand(d_in, d_out))
    layer.skip_zero_rows = False  # as a GPU runs it (on the CPU the rows are found without waiting)
    model = nn.Sequential(nn.Linear(16, d_in), nn.GELU(), layer).to(DEVICE)
    opt = sparsegrad.optimizer(model, lr=1e-3)
    x = torch.randn(8, 12, 16, device=DEVICE)

    def step():
        model(x).square().mean().backward()
        sparsegrad.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(8 if mode == "fixed" else 1):
        step()
    if mode != "fixed":  # room for several more steps' entries: no growth below
        opt.reserve(layer.trainable, 10 * layer.k)
    with ReadBackCounter() as counter:
        if DEVICE == "cuda":
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("error")
        try:
            for _ in range(3):
                step()
        finally:
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    assert counter.total == 0, dict(counter.counts)
