"""The fold (folding.py): the layers of one role fold in one batched product, equal to folding each alone,
in float64; each layer's rule follows its weight's dtype; delta_weight is what S adds to the weight."""
import copy
import pickle

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import sparsegrad
from sparsegrad import folding
from sparsegrad.support import SupportPlan, fold, topk_support

f64 = torch.float64


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))[0]


@pytest.mark.parametrize("d_in, d_out", [(12, 20), (20, 12)])
def test_stacked_plans_fold_as_each_alone(d_in, d_out):
    """Supports of different sizes and row counts (padded), either orientation, and the dynamic mode's
    every-row plan with a repeated entry (its values sum)."""
    g = torch.Generator().manual_seed(0)
    U, V = orthogonal(d_in, 1), orthogonal(d_out, 2)
    plans, values = [], []
    for k, rows in ((7, 2), (30, 9), (5, 5)):  # entries, and the rows of S they fall in
        energy = torch.zeros(d_in, d_out, dtype=f64)
        energy[torch.randperm(d_in, generator=g)[:rows]] = torch.rand(rows, d_out, generator=g, dtype=f64)
        plans.append(SupportPlan.build(*topk_support(energy, k), d_in, d_out))
        values.append(torch.randn(k, generator=g, dtype=f64))
    plans = [p for p in plans if p.transposed == plans[0].transposed]
    values = values[:len(plans)]
    one = [torch.randn(d_out, d_in, generator=g, dtype=f64) for _ in plans]
    together = [w.clone() for w in one]
    for w, plan, v in zip(one, plans, values):
        fold([w], plan, v, *plan.sides(U, V))
    stacked = SupportPlan.stack(plans)
    fold(together, stacked, torch.cat(values), *stacked.sides(U, V))
    for a, b in zip(one, together):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)

    # every row, 3 layers: flat indices into the stack, sorted, one entry twice
    flat = torch.tensor([3, 3, 17, d_in * d_out + 5, 2 * d_in * d_out + d_in * d_out - 1])
    vals = torch.randn(flat.numel(), generator=g, dtype=f64)
    dense = torch.zeros(3 * d_in * d_out, dtype=f64).index_add_(0, flat, vals).view(3, d_in, d_out)
    weights = [torch.zeros(d_out, d_in, dtype=f64) for _ in range(3)]
    plan = SupportPlan.every_row(flat, d_in, d_out, 3)
    fold(weights, plan, vals, *plan.sides(U, V))
    for w, S in zip(weights, dense):
        torch.testing.assert_close(w, (U.t() @ S @ V).t(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("d_in, d_out", [(12, 20), (20, 12)])
def test_block_supports_fold_exactly_in_dense_products(d_in, d_out):
    """A block support's fold (its dense (r, c) block times c rows of a basis) adds U^T S V, in any caller order of
    its values, and a role of block layers folds after an optimizer step as each alone would, in float64."""
    from sparsegrad.support import block_support

    g = torch.Generator().manual_seed(0)
    U, V = orthogonal(d_in, 1), orthogonal(d_out, 2)
    for k in (23, 40):
        rows, cols = block_support(torch.rand(d_in, d_out, generator=g, dtype=f64), k, max_rows=4)
        perm = torch.randperm(k, generator=g)
        plan = SupportPlan.build(rows[perm], cols[perm], d_in, d_out)
        assert plan.block_cols is not None
        values = torch.randn(k, generator=g, dtype=f64)
        w = torch.zeros(d_out, d_in, dtype=f64)
        fold([w], plan, values, *plan.sides(U, V))
        S = torch.zeros(d_in, d_out, dtype=f64)
        S[rows[perm], cols[perm]] = values
        torch.testing.assert_close(w, (U.t() @ S @ V).t(), rtol=0, atol=1e-12)

    torch.manual_seed(0)
    model = nn.Sequential(*(nn.Linear(d_in, d_out, dtype=f64) for _ in range(3)))
    energies = [torch.rand(d_in, d_out, dtype=f64) for _ in model]
    layers = [sparsegrad.SparseGradLinear.from_linear(lin, k=17, U=U, V=V, energy=e, structure="block")
              for lin, e in zip(model, energies)]
    originals = [layer.weight.detach().clone() for layer in layers]
    opt = torch.optim.SGD([layer.values for layer in layers], lr=0.5)
    for layer in layers:
        layer(torch.randn(4, d_in, dtype=f64)).square().sum().backward()
    opt.step()  # the role's layers fold together after it
    for layer, w0 in zip(layers, originals):
        assert layer.structure == "block"
        S = torch.zeros(d_in, d_out, dtype=f64)
        S[layer.rows.long(), layer.cols.long()] = layer.values.detach()
        torch.testing.assert_close(layer.weight, w0 + (U.t() @ S @ V).t(), rtol=0, atol=1e-12)


class CountProducts(TorchDispatchMode):
    """The matrix products run (dense and sparse)."""

    def __init__(self):
        super().__init__()
        self.products = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm", "_sparse_csr_mm", "_sparse_mm",
                                            "addmm_", "_sparse_addmm"):
            self.products += 1
        return func(*args, **(kwargs or {}))


def _role_model(n_layers: int, mode: str) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Sequential(nn.Linear(16, 24).to(f64)) for _ in range(n_layers)])
    U, V = orthogonal(16, 1).contiguous(), orthogonal(24, 2).contiguous()  # one tensor each, for every layer
    energy = torch.rand(16, 24, dtype=f64)  # one support, one orientation
    for block in model:
        extra = {"energy": energy} if mode == "fixed" else {}
        block[0] = sparsegrad.SparseGradLinear.from_linear(block[0], k=20, mode=mode, U=U, V=V, **extra)
    return model


@pytest.mark.parametrize("mode", ["fixed", "dynamic"])
def test_one_role_folds_in_one_batched_product(mode):
    """After an optimizer step, 2 or 6 layers of one role fold with the same number of products, and each
    weight is W_0 + (U^T S V)^T (float64)."""
    counts = {}
    for n in (2, 6):
        model = _role_model(n, mode)
        layers = list(sparsegrad.sparse_layers(model).values())
        w0 = [layer.weight.detach().clone() for layer in layers]
        opt = sparsegrad.optimizer(model, lr=0.1)
        x = torch.randn(5, 16, dtype=f64)
        sum(block(x).square().sum() for block in model).backward()
        with CountProducts() as counter:
            opt.step()
        counts[n] = counter.products
        for layer, w in zip(layers, w0):
            S = torch.zeros(16, 24, dtype=f64)
            rows, cols, values = layer.trained_entries()
            S[rows, cols] = values
            assert S.abs().sum() > 0  # it trained
            torch.testing.assert_close(layer.weight.detach(), w + (layer.U.t() @ S @ layer.V).t(), rtol=0, atol=1e-12)
            torch.testing.assert_close(layer.delta_weight().double(), layer.weight.detach() - w, rtol=0, atol=1e-6)
    assert counts[2] == counts[6] > 0, counts


def test_the_rule_follows_the_weight_and_survives_copies():
    model = _role_model(1, "fixed")
    layer = model[0][0]
    assert layer.fold_rule is folding.IN_PLACE
    model.to(torch.bfloat16)
    assert layer.fold_rule is folding.REBUILD and layer.U.dtype == torch.float32
    for copied in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert copied[0][0].fold_rule is folding.REBUILD
    model.float()
    assert layer.fold_rule is folding.IN_PLACE


@pytest.mark.parametrize("mode", ["dynamic", "meprop"])
def test_a_deferred_top_k_is_cut_at_the_step(mode):
    """A top-k layer that leaves its gradient whole (defer_topk) and that nothing cut: the optimizer step cuts
    it, so one step changes k entries (of S, or of MeProp's weight), not every entry."""
    model = _role_model(1, "dynamic") if mode == "dynamic" else nn.Sequential(nn.Sequential(
        sparsegrad.MePropLinear.from_linear(nn.Linear(16, 24).to(f64), k=20)))
    layer = model[0][0]
    layer.topk_in_backward = False  # (sparsegrad.model.defer_topk)
    before = layer.trainable.detach().clone()
    opt = sparsegrad.optimizer(model, lr=0.1)
    model(torch.randn(5, 16, dtype=f64)).square().sum().backward()
    assert not layer.trainable.grad.is_sparse and int(layer.trainable.grad.count_nonzero()) > layer.k  # whole
    opt.step()
    assert int((layer.trainable.detach() != before).sum()) == layer.k
