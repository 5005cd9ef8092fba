"""bfloat16 / float16 base weights: trained without a float32 copy, folded exactly (no drift over
steps), saved current right after an optimizer step, checkpointed activations give the same run;
quantized weights are refused with a message that says what to do."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import sparsegrad
from sparsegrad import folding
from sparsegrad.layer import SparseGradLinear
from sparsegrad.model import sparsify_gradients

D_IN, D_OUT, K = 48, 80, 300


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0].float()


def low_precision_layer(mode: str, dtype: torch.dtype) -> tuple[SparseGradLinear, torch.Tensor]:
    torch.manual_seed(0)
    lin = nn.Linear(D_IN, D_OUT).to(dtype)
    layer = SparseGradLinear.from_linear(lin, k=K, mode=mode, U=orthogonal(D_IN, 1), V=orthogonal(D_OUT, 2),
                                         energy=torch.rand(D_IN, D_OUT))
    return layer, lin.weight.detach().clone()


def trained_S(layer: SparseGradLinear) -> torch.Tensor:
    rows, cols, values = layer.trained_entries()
    S = torch.zeros(D_IN, D_OUT, dtype=torch.float64)
    S[rows.long(), cols.long()] = values.double()
    return S


def ulps(a: torch.Tensor, b: torch.Tensor, slack: torch.Tensor | float = 0.0) -> torch.Tensor:
    """Distance of a from b, less `slack`, in units in the last place of b's dtype (at b's magnitude)."""
    spacing = torch.finfo(b.dtype).eps * torch.maximum(b.double().abs(), torch.tensor(torch.finfo(b.dtype).tiny))
    distance = ((a.double() - b.double()).abs() - slack).clamp(min=0)
    return distance / (2 ** torch.floor(torch.log2(spacing / torch.finfo(b.dtype).eps)) * torch.finfo(b.dtype).eps)


@pytest.mark.parametrize("lr", [1e-4, 3e-2], ids=["small", "large"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_many_updates_do_not_drift(mode, dtype, lr):
    """300 optimizer steps: the weight stays round(W_0 + U^T S V) within 1 ulp of a float64
    evaluation, where adding each step's change to the weight drifts by many ulps. No copy of
    W_0 is kept: the weight gives it back, but for a few entries kept apart (large steps cross
    more powers of two: more of them). The sum is float32's: where W_0 + U^T S V cancels to near
    zero, its own rounding (a few float32 units at the scale of the terms, 2^-21 x that scale here)
    can exceed a unit of the tiny result, and how it falls depends on the CPU's float32 kernels; that
    much is allowed beside the 1 ulp, to both the fold and the per-step fold."""
    layer, W0 = low_precision_layer(mode, dtype)
    layer.bias.requires_grad_(False)  # only S trains (Adam on a float16 bias would underflow)
    assert layer.trainable.dtype == torch.float32 and layer.U.dtype == torch.float32
    opt = sparsegrad.optimizer(layer, lr=lr)
    naive = W0.clone()  # the per-step fold a low-precision weight must not use
    g = torch.Generator().manual_seed(3)
    for _ in range(300):
        before = trained_S(layer)
        x = torch.randn(16, D_IN, generator=g).to(dtype)
        layer(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        step = (layer.U.double().t() @ (trained_S(layer) - before) @ layer.V.double()).t()
        naive += step.to(dtype)
    layer.sync()
    S, U, V = trained_S(layer), layer.U.double(), layer.V.double()
    reference = (W0.double() + (U.t() @ S @ V).t()).to(dtype)
    float32_rounding = 2**-21 * (W0.double().abs() + (U.abs().t() @ S.abs() @ V.abs()).t())
    err = ulps(layer.weight.detach(), reference, float32_rounding)
    naive_err = ulps(naive, reference, float32_rounding)
    kept = layer.w0_index.numel() / layer.weight.numel()
    print(f"{mode} {dtype} lr {lr:g}: max {err.max():.0f} ulp, {100 * (err > 0).float().mean():.3f}% off by 1, "
          f"{100 * kept:.2f}% of W_0 kept apart; per-step fold: max {naive_err.max():.0f} ulp, "
          f"{100 * (naive_err > 0).float().mean():.1f}% off")
    assert trained_S(layer).abs().max() > 0
    assert err.max() <= 1 and (err > 0).float().mean() < 0.01
    assert kept < (0.05 if lr < 1e-3 else 0.2)
    assert naive_err.max() >= 2 and (naive_err > 0).float().mean() > 0.05


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_no_float32_copy_of_the_weight(tiny_llama_dir, mode):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    batches = [{"input_ids": torch.randint(5, 1000, (2, 24)), "labels": torch.randint(5, 1000, (2, 24))}
               for _ in range(3)]
    bases = sparsegrad.compute_bases(model, batches[:2], n_steps=2, progress=False)
    model.requires_grad_(False)
    sparsegrad.apply(model, bases, density=0.05, mode=mode)
    opt = sparsegrad.optimizer(model, lr=1e-3)
    loss = model(**batches[2]).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    layers = sparsegrad.sparse_layers(model)
    shared = {id(t) for m in layers.values() for t in (m.U, m.V)}
    for layer in layers.values():
        weight_bytes = layer.weight.numel() * 2
        own = [t for t in (*layer.parameters(), *layer.buffers()) if id(t) not in shared]
        full_fp32 = [t for t in own if t.dtype == torch.float32 and t.numel() >= layer.weight.numel()]
        nbytes = sum(t.numel() * t.element_size() for t in own)
        if mode == "fixed":  # the bfloat16 weight, then O(k): no copy of the weight at all
            assert not full_fp32
            assert nbytes <= weight_bytes + 24 * layer.k + 2 * layer.out_features + 6 * layer.w0_index.numel()
        else:  # S itself is dense in the paper's mode; no other copy, no dense gradient
            assert [t is layer.delta for t in full_fp32] == [True]
            assert layer.delta.grad.is_sparse
        assert layer.weight.dtype == torch.bfloat16
        # pretrained values kept apart: those whose sum crossed a power of two (here ~1%: a tiny layer, a large step)
        assert layer.w0_index.numel() < 0.03 * layer.weight.numel()
    roles = {sparsegrad.targets.role_of(n) for n in layers}
    assert len(shared) == 2 * len(roles)  # U and V of each role, held once, float32
    assert all(m.U.dtype == torch.float32 for m in layers.values())


def _step(model, batch, opt):
    model(**batch).loss.backward()
    sparsify_gradients(model)
    opt.step()
    opt.zero_grad()


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_saved_right_after_a_step_is_current(tiny_llama_dir, tmp_path, mode):
    """state_dict / save_pretrained taken with no forward after the optimizer step hold the new weight."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.bfloat16)
    batch = {"input_ids": torch.randint(5, 1000, (2, 24)), "labels": torch.randint(5, 1000, (2, 24))}
    bases = sparsegrad.compute_bases(model, [batch], n_steps=1, progress=False)
    model.requires_grad_(False)
    sparsegrad.apply(model, bases, density=0.1, mode=mode)
    pretrained = {n: m.weight.detach().clone() for n, m in sparsegrad.sparse_layers(model).items()}
    opt = sparsegrad.optimizer(model, lr=1e-2)
    for _ in range(2):
        _step(model, batch, opt)
    name = next(iter(sparsegrad.sparse_layers(model)))
    saved = model.state_dict()[f"{name}.weight"].clone()
    assert not torch.equal(saved, pretrained[name])  # the steps' changes were folded before the save
    model.save_pretrained(tmp_path)
    model.eval()
    with torch.no_grad():
        trained = model(input_ids=batch["input_ids"]).logits
    plain = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    assert type(plain.get_submodule(name)) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=batch["input_ids"]).logits, trained, rtol=0, atol=0)


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_gradient_checkpointing_gives_the_same_run(tiny_llama_dir, monkeypatch, mode):
    """Recomputed forwards neither fold twice nor see a half-updated weight: same losses, same S."""
    batches = [{"input_ids": torch.randint(5, 1000, (2, 24)), "labels": torch.randint(5, 1000, (2, 24))}
               for _ in range(4)]
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
    bases = sparsegrad.compute_bases(base, batches[:2], n_steps=2, progress=False)
    folds = []
    real_fold = folding.fold_layers
    monkeypatch.setattr(folding, "fold_layers", lambda layers, check=True: (folds.extend(layers), real_fold(layers, check))[1])

    runs = {}
    for checkpointing in (False, True):
        model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float64)
        model.requires_grad_(False)
        sparsegrad.apply(model, bases, density=0.1, mode=mode)
        if checkpointing:
            model.activation_checkpointing_enable()  # (gradient_checkpointing_enable: its older name)
        model.train()
        opt = sparsegrad.optimizer(model, lr=1e-2)
        folds.clear()
        losses = []
        for batch in batches:
            loss = model(**batch).loss
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        n_layers = len(sparsegrad.sparse_layers(model))
        # one fold per layer per step, right after it: none in the recomputed forwards
        assert len(folds) == n_layers * len(batches), (checkpointing, len(folds))
        runs[checkpointing] = (losses, {n: m.trainable.detach().clone() for n, m in sparsegrad.sparse_layers(model).items()})
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-12)
    for name, value in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][name], value, rtol=1e-10, atol=1e-12)


def test_quantized_weights_are_refused_with_what_to_do(tiny_llama_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir)
    mlp = model.model.layers[0].mlp
    q = nn.Linear(mlp.up_proj.in_features, mlp.up_proj.out_features, bias=False)
    q.weight = nn.Parameter(torch.randint(-127, 127, q.weight.shape, dtype=torch.int8), requires_grad=False)
    mlp.up_proj = q  # what an 8-bit quantized checkpoint holds
    with pytest.raises(TypeError, match=r"model.layers.0.mlp.up_proj.*quantized.*bfloat16.*LoRA"):
        sparsegrad.compute_bases(model, [], n_steps=1, progress=False)
