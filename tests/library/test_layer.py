"""SparseGradLinear against nn.Linear and autograd, in float64."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsegrad
import sparsegrad.support as support_mod
from sparsegrad import SparseGradLinear
from sparsegrad.support import block_support, topk_support

D_IN, D_OUT, K = 12, 20, 17
f64 = torch.float64


def _SupportPlan_build(rows, cols):
    return support_mod.SupportPlan.build(rows, cols, D_IN, D_OUT)


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))[0]


def make_layer(mode: str, bias: bool = True, support=None, k: int = K, seed: int = 0) -> tuple[SparseGradLinear, nn.Linear]:
    torch.manual_seed(seed)
    lin = nn.Linear(D_IN, D_OUT, bias=bias).to(f64)
    energy = torch.rand(D_IN, D_OUT, dtype=f64)
    layer = SparseGradLinear.from_linear(
        lin, k=k, mode=mode, U=orthogonal(D_IN, 1), V=orthogonal(D_OUT, 2), energy=energy, support=support
    )
    # a trained state: non-zero S, folded into the weight
    if mode == "fixed":
        layer.set_trained(torch.randn(k, dtype=f64))
    elif mode == "dynamic":
        layer.set_trained(torch.randn(D_IN, D_OUT, dtype=f64) * (torch.rand(D_IN, D_OUT) < 0.2))
    return layer, lin


def effective_reference(layer: SparseGradLinear, lin: nn.Linear):
    """Dense autograd reference: W_eff^T = W_0^T + U^T S V with S a leaf, for the same state."""
    if layer.mode == "fixed":
        S = torch.zeros(D_IN, D_OUT, dtype=f64)
        S[layer.rows, layer.cols] = layer.values.detach()
    elif layer.mode == "dynamic":
        S = layer.delta.detach().clone()
    else:
        S = torch.zeros(D_IN, D_OUT, dtype=f64)
    S.requires_grad_(True)
    U, V = (layer.U, layer.V) if layer.mode != "meprop" else (torch.eye(D_IN, dtype=f64), torch.eye(D_OUT, dtype=f64))
    W0 = lin.weight.detach().clone().requires_grad_(True)
    W_eff = (W0.t() + U.t() @ S @ V).t()  # (d_out, d_in)
    return S, W0, W_eff


def dense(t: torch.Tensor) -> torch.Tensor:
    return t.to_dense() if t.is_sparse else t


def topk_reference(full: torch.Tensor, k: int) -> torch.Tensor:
    idx = full.abs().flatten().topk(k).indices
    out = torch.zeros_like(full).flatten()
    out[idx] = full.flatten()[idx]
    return out.view_as(full)


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
@pytest.mark.parametrize("zero_rows", [False, True])
def test_matches_linear_and_autograd(mode, zero_rows):
    layer, lin = make_layer(mode)
    S, W0, W_eff = effective_reference(layer, lin)
    x = torch.randn(3, 5, D_IN, dtype=f64, requires_grad=True)  # leading dims (3, 5)
    x_ref = x.detach().clone().requires_grad_(True)
    b_ref = lin.bias.detach().clone().requires_grad_(True)
    dy = torch.randn(3, 5, D_OUT, dtype=f64)
    if zero_rows:  # most rows of dy zero: the sparse-by-dense path (Sec. 3.3)
        dy[:, 1:] = 0

    y, y_ref = layer(x), F.linear(x_ref, W_eff, b_ref)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.bias.grad, dy.sum((0, 1)), rtol=0, atol=1e-12)  # unrotated sum(dY)
    torch.testing.assert_close(layer.bias.grad, b_ref.grad, rtol=0, atol=1e-12)

    if mode == "fixed":
        torch.testing.assert_close(layer.values.grad, S.grad[layer.rows, layer.cols], rtol=0, atol=1e-12)
        assert layer.weight.grad is None
    elif mode == "dynamic":
        assert layer.delta.grad.is_sparse  # the step's k entries, not a dense (d_in, d_out) gradient
        torch.testing.assert_close(layer.delta.grad.to_dense(), topk_reference(S.grad, K), rtol=0, atol=1e-12)
        assert int(layer.delta.grad.to_dense().ne(0).sum()) == K
    else:
        assert layer.weight.grad.is_sparse  # k entries, for a lazy optimizer
        torch.testing.assert_close(layer.weight.grad.to_dense(), topk_reference(W0.grad, K), rtol=0, atol=1e-12)
        assert int(layer.weight.grad.to_dense().ne(0).sum()) == K


@pytest.mark.parametrize("mode", ["dynamic", "meprop"])
def test_topk_keeps_exactly_k_under_ties(mode):
    lin = nn.Linear(D_IN, D_OUT).to(f64)
    eye_in, eye_out = torch.eye(D_IN, dtype=f64), torch.eye(D_OUT, dtype=f64)
    layer = SparseGradLinear.from_linear(lin, k=K, mode=mode, U=eye_in, V=eye_out)
    x = torch.ones(4, D_IN, dtype=f64)  # every entry of G = x^T dy equal: all tied
    layer(x).backward(torch.ones(4, D_OUT, dtype=f64))
    assert int(dense(layer.trainable.grad).ne(0).sum()) == K


@pytest.mark.parametrize("rotate_activations", [True, False])
@pytest.mark.parametrize("support_kind", ["few_rows", "few_cols"])
def test_support_plans(monkeypatch, support_kind, rotate_activations):
    """Both rotation sides (fewer distinct rows or columns) and both ways of rotating
    (the activations, or the dense G) give the exact gradient; a support given in any order is
    stored in plan order as int32 (values follow it), so the plan keeps no permutation or copy."""
    monkeypatch.setattr(support_mod, "_rotate_activations", lambda *shape: rotate_activations)
    if support_kind == "few_rows":  # 3 distinct rows, each half the columns (not a block): rotate rows
        rows = torch.tensor([1, 4, 9]).repeat_interleave(D_OUT // 2)
        cols = torch.cat((torch.arange(0, D_OUT, 2), torch.arange(1, D_OUT, 2), torch.arange(D_OUT // 2)))
    else:  # 2 distinct columns, each half the rows: rotate columns
        rows = torch.arange(D_IN)
        cols = torch.tensor([3, 17]).repeat_interleave(D_IN // 2)
    perm = torch.randperm(rows.numel())  # any order in, same order out
    layer, lin = make_layer("fixed", support=(rows[perm], cols[perm]), k=rows.numel())
    plan = layer._support_plan()
    assert plan.transposed == (support_kind == "few_cols") and plan.order is None
    assert plan.block_cols is None and layer.structure == "scattered"
    assert layer.rows.dtype == layer.cols.dtype == torch.int32
    assert plan.cols is (layer.rows if plan.transposed else layer.cols)
    assert set(zip(layer.rows.tolist(), layer.cols.tolist())) == set(zip(rows.tolist(), cols.tolist()))
    # a plan over a support in any other order maps its results back to that order
    shuffled = _SupportPlan_build(rows[perm], cols[perm])
    assert shuffled.order is not None
    x_, dy_ = torch.randn(5, D_IN, dtype=f64), torch.randn(5, D_OUT, dtype=f64)
    full = layer.U @ (x_.t() @ dy_) @ layer.V.t()
    left, right = shuffled.sides(x_, dy_)
    torch.testing.assert_close(shuffled.gather(left, right, *shuffled.sides(layer.U, layer.V)),
                               full[rows[perm], cols[perm]], rtol=0, atol=1e-12)
    S, _, W_eff = effective_reference(layer, lin)
    x = torch.randn(7, D_IN, dtype=f64)
    dy = torch.randn(7, D_OUT, dtype=f64)
    y = layer(x)
    torch.testing.assert_close(y, F.linear(x, W_eff, lin.bias), rtol=0, atol=1e-12)
    y.backward(dy)
    F.linear(x, W_eff, lin.bias).backward(dy)
    torch.testing.assert_close(layer.values.grad, S.grad[layer.rows, layer.cols], rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_gradcheck(mode):
    layer, _ = make_layer(mode)
    x = torch.randn(2, 3, D_IN, dtype=f64, requires_grad=True)
    # input and bias gradients are exact in every mode
    assert torch.autograd.gradcheck(lambda x, b: layer(x), (x, layer.bias), eps=1e-6, atol=1e-8)
    if mode == "fixed":  # the values' gradient is exact too (top-k modes sparsify theirs on purpose)
        def perturbed(x, values):  # gradcheck moves the values in place, as an optimizer would: fold, then run
            sparsegrad.fold(layer)
            return layer(x)

        assert torch.autograd.gradcheck(perturbed, (x, layer.values), eps=1e-6, atol=1e-8)


def test_no_bias_layer():
    layer, lin = make_layer("fixed", bias=False)
    _, _, W_eff = effective_reference(layer, lin)
    x = torch.randn(5, D_IN, dtype=f64)
    torch.testing.assert_close(layer(x), F.linear(x, W_eff), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_bfloat16_input_follows_dtype(mode):
    layer, lin = make_layer(mode)
    layer, lin = layer.float(), lin.float()
    x = torch.randn(4, 6, D_IN)
    ref = layer(x)
    xb = x.bfloat16().requires_grad_(True)
    y = layer(xb)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref, rtol=0.05, atol=0.05)
    y.float().sum().backward()
    assert xb.grad.dtype == torch.bfloat16
    assert layer.trainable.grad.dtype == torch.float32 and torch.isfinite(dense(layer.trainable.grad)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(x).dtype == torch.bfloat16


def test_changed_values_are_folded_and_state_dict_round_trips():
    layer, lin = make_layer("fixed")
    x = torch.randn(5, D_IN, dtype=f64)
    layer(x)
    with torch.no_grad():
        layer.values.add_(0.5)  # written in place outside an optimizer step: folded by sparsegrad.fold
    sparsegrad.fold(layer)
    _, _, W_eff = effective_reference(layer, lin)
    torch.testing.assert_close(layer(x), F.linear(x, W_eff, lin.bias), rtol=0, atol=1e-12)

    fresh, _ = make_layer("fixed")
    fresh.load_state_dict(layer.state_dict())
    torch.testing.assert_close(fresh(x), layer(x), rtol=0, atol=0)
    merged = layer.to_linear()
    assert type(merged) is nn.Linear
    torch.testing.assert_close(merged(x), layer(x), rtol=0, atol=1e-12)


def test_topk_support_is_sorted_and_exact():
    energy = torch.rand(D_IN, D_OUT)
    rows, cols = topk_support(energy, K)
    flat = rows * D_OUT + cols
    assert torch.equal(flat, flat.sort().values) and flat.unique().numel() == K
    assert set(flat.tolist()) == set(energy.flatten().topk(K).indices.tolist())


def test_bad_arguments_name_the_fix():
    lin = nn.Linear(D_IN, D_OUT)
    U, V = torch.eye(D_IN), torch.eye(D_OUT)
    with pytest.raises(ValueError, match="k=0 is out of range"):
        SparseGradLinear.from_linear(lin, k=0, mode="meprop")
    with pytest.raises(ValueError, match=f"1 <= k <= {D_IN * D_OUT}"):
        SparseGradLinear.from_linear(lin, k=D_IN * D_OUT + 1, mode="meprop")
    with pytest.raises(ValueError, match=r"basis V has shape \(12, 12\).*needs \(20, 20\)"):
        SparseGradLinear.from_linear(lin, k=3, mode="dynamic", U=U, V=U)
    with pytest.raises(ValueError, match="needs the basis U"):
        SparseGradLinear.from_linear(lin, k=3, mode="dynamic")
    with pytest.raises(ValueError, match="mode='sparse' is not one of"):
        SparseGradLinear.from_linear(lin, k=3, mode="sparse", U=U, V=V)
    with pytest.raises(ValueError, match="energy"):
        SparseGradLinear.from_linear(lin, k=3, mode="fixed", U=U, V=V)
    with pytest.raises(ValueError, match="repeated"):
        SparseGradLinear.from_linear(lin, k=2, mode="fixed", U=U, V=V, support=([1, 1], [2, 2]))


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_counts_nonzero_rows_of_dy(mode):
    """Backward counts the rows of dy it multiplies (Fig. 3); take_row_share reads and restarts them."""
    from sparsegrad.model import take_row_share

    layer, _ = make_layer(mode)
    holder = nn.Sequential(layer)
    x = torch.randn(2, 5, D_IN, dtype=f64)
    dy = torch.randn(2, 5, D_OUT, dtype=f64)
    dy[0, 3:] = 0  # 2 padded positions
    dy[1, 1] = 0
    layer(x).backward(dy)
    assert layer.row_counts == [7, 10]
    assert take_row_share(holder) == pytest.approx(0.7)
    assert layer.row_counts == [0, 0] and take_row_share(holder) is None
    assert take_row_share(nn.Linear(2, 2)) is None


@pytest.mark.parametrize("mode", ["dynamic", "meprop"])
def test_deferred_topk_is_taken_of_the_summed_gradient(mode):
    """Accumulation / data parallelism: the top-k of the complete gradient, not a sum of per-part top-k's."""
    from sparsegrad.model import defer_topk, sparsify_gradients

    layer, lin = make_layer(mode)
    x = torch.randn(2, 6, D_IN, dtype=f64)
    S, W0, W_eff = effective_reference(layer, lin)
    F.linear(x, W_eff, lin.bias).pow(2).sum().backward()
    full = S.grad if mode == "dynamic" else W0.grad  # the complete gradient of the trained tensor

    defer_topk(layer)
    for part in (x[:1], x[1:]):  # two micro-batches (or two ranks' halves, once all-reduced)
        layer(part).pow(2).sum().backward()
    torch.testing.assert_close(layer.trainable.grad, full)  # nothing cut yet
    sparsify_gradients(layer)
    torch.testing.assert_close(dense(layer.trainable.grad), topk_reference(full, K))

    per_part = torch.zeros_like(full)  # what cutting each part would give: a different, wrong update
    for part in (x[:1], x[1:]):
        S2, W2, W_eff2 = effective_reference(layer, lin)
        F.linear(part, W_eff2, lin.bias).pow(2).sum().backward()
        per_part += topk_reference(S2.grad if mode == "dynamic" else W2.grad, K)
    assert (per_part != 0).sum() > K and not torch.allclose(per_part, topk_reference(full, K))


@pytest.mark.parametrize("optimizer", ["torch-sgd", "sparsegrad"])
def test_every_optimizer_step_is_folded_once_right_after_it(optimizer):
    """The fold follows each optimizer step, whatever the optimizer (a torch step hook), for a copied layer
    too; a step that did not move S (no gradient) folds nothing; a forward folds nothing."""
    import copy

    layer, lin = make_layer("fixed")
    twin = copy.deepcopy(layer)  # built without __init__: registered for the hook all the same
    x = torch.randn(5, D_IN, dtype=f64)
    for module in (layer, twin):
        params = [module.values]
        opt = torch.optim.SGD(params, lr=0.1) if optimizer == "torch-sgd" else sparsegrad.optimizer(module, lr=0.1)
        before = module.weight.detach().clone()
        opt.step()  # no gradient yet: nothing moved, nothing folded
        assert torch.equal(module.weight, before)
        module(x).square().sum().backward()
        opt.step()
        _, _, W_eff = effective_reference(module, lin)
        torch.testing.assert_close(module.weight.detach(), W_eff, rtol=0, atol=1e-12)  # folded before any forward
        folded = module.weight.detach().clone()
        module(x), module(x)
        assert torch.equal(module.weight, folded)


# ---------------------------------------------------------------- the block support

def block_layer(transposed: bool, seed: int = 0) -> tuple[SparseGradLinear, nn.Linear]:
    """A fixed layer whose support is a block of S: 4 rows x 7 columns less 2 entries, or 7 x 4 less 2."""
    rows, cols = torch.tensor([0, 2, 5, 11]), torch.tensor([1, 3, 4, 8, 13, 15, 19])
    block = torch.zeros(D_IN, D_OUT, dtype=torch.bool)
    block[rows[:, None], cols] = True
    block[11, [4, 19]] = False  # the last row partly
    if transposed:
        block = torch.zeros(D_IN, D_OUT, dtype=torch.bool)
        block[torch.tensor([0, 3, 4, 8, 9, 10, 11])[:, None], torch.tensor([2, 6, 7, 12])] = True
        block[[0, 3], 12] = False  # the last column partly
    return make_layer("fixed", support=block.nonzero().unbind(1), k=int(block.sum()), seed=seed)


@pytest.mark.parametrize("path", ["both", "activations", "gradient"])
@pytest.mark.parametrize("transposed", [False, True])
def test_block_support_matches_linear_and_autograd(monkeypatch, path, transposed):
    """A block support's gradient (dense products only: both sides' activations rotated, or r rows of the
    gradient then c columns, from rotated activations or the dense G) is the exact dL/dS at its entries, and
    the layer's output and input gradient are nn.Linear's, in float64."""
    monkeypatch.setattr(support_mod, "_rotate_both", lambda *shape: path == "both")
    monkeypatch.setattr(support_mod, "_rotate_activations", lambda *shape: path == "activations")
    layer, lin = block_layer(transposed)
    plan = layer._support_plan()
    assert plan.block_cols is not None and plan.transposed == transposed and layer.structure == "block"
    assert "block 7x4" in repr(layer) if transposed else "block 4x7" in repr(layer)
    S, _, W_eff = effective_reference(layer, lin)
    x = torch.randn(2, 9, D_IN, dtype=f64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    dy = torch.randn(2, 9, D_OUT, dtype=f64)
    y, y_ref = layer(x), F.linear(x_ref, W_eff, lin.bias)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=1e-12)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.values.grad, S.grad[layer.rows.long(), layer.cols.long()], rtol=0, atol=1e-12)

    def perturbed(x, values):  # the values' gradient by finite differences too
        sparsegrad.fold(layer)
        return layer(x)

    x = torch.randn(3, D_IN, dtype=f64, requires_grad=True)
    assert torch.autograd.gradcheck(perturbed, (x, layer.values), eps=1e-6, atol=1e-8)


def test_block_support_takes_the_energy_of_a_planted_block():
    """k entries inside r x c, exactly k, sorted, none repeated; where the energy sits in a block, that block (the
    last row: its entries of most energy), on the side that keeps more energy; within max_rows on its narrow side."""
    energy = torch.rand(D_IN, D_OUT, dtype=f64, generator=torch.Generator().manual_seed(0)) * 0.01
    planted_rows, planted_cols = torch.tensor([2, 7, 9]), torch.tensor([0, 5, 6, 10, 14, 18])
    energy[planted_rows[:, None], planted_cols] = 1.0
    energy[9, 18] = 0.5  # the least of the block: left out at k = 17
    for e, transposed in ((energy, False), (energy.t().contiguous(), True)):
        rows, cols = block_support(e, 17)
        narrow, wide = (cols, rows) if transposed else (rows, cols)
        d_out = e.shape[1]
        flat = rows * d_out + cols
        assert flat.numel() == 17 and flat.unique().numel() == 17 and torch.equal(flat, flat.sort().values)
        assert set(narrow.tolist()) == set(planted_rows.tolist()) and set(wide.tolist()) == set(planted_cols.tolist())
        assert (9, 18) not in set(zip(narrow.tolist(), wide.tolist()))
    many = block_support(torch.rand(64, 256, dtype=f64), 2000, max_rows=4)  # 4 rows cannot hold 2,000
    narrow_count = min(many[0].unique().numel(), many[1].unique().numel())
    assert narrow_count in (8, 32) and many[0].numel() == 2000  # the fewest that can: 2000 / 256 or 2000 / 64
    few = block_support(torch.rand(64, 256, dtype=f64), 300, max_rows=4)
    assert min(few[0].unique().numel(), few[1].unique().numel()) <= 4
    for k in (1, 5, D_IN * D_OUT):  # every size of layer share
        rows, cols = block_support(torch.rand(D_IN, D_OUT), k)
        assert (rows * D_OUT + cols).unique().numel() == k


def test_block_structure_through_apply_and_state_dict(minilm, bbc_batches):
    """apply(structure="block") gives every fixed layer a block of exactly its k entries on real MiniLM bases,
    which keeps most of the top-k's energy; a state dict round-trips the support; bad structures name the fix."""
    bases = sparsegrad.compute_bases(minilm, bbc_batches[:2], n_steps=2, progress=False)
    sparsegrad.apply(minilm, bases, structure="block")
    for name, layer in sparsegrad.sparse_layers(minilm).items():
        assert layer.structure == "block" and layer.k == round(0.01 * layer.in_features * layer.out_features)
        energy = bases.energy_for(name).double()
        kept = energy[layer.rows.long(), layer.cols.long()].sum() / energy.flatten().topk(layer.k).values.sum()
        assert kept > 0.5, name
    with pytest.raises(ValueError, match="structure='rows' is not one of"):
        sparsegrad.apply(sparsegrad.merge(minilm), bases, structure="rows")
    with pytest.raises(ValueError, match="use it with mode='fixed'"):
        sparsegrad.apply(minilm, bases, mode="dynamic", structure="block")


def test_nonzero_rows_of_dy_are_found_exactly():
    """The sparse-by-dense row finder reads only the first entries of most rows, and whole the rows that start with
    zeros: padded rows (all zero) and real rows whose non-zeros come late are told apart exactly."""
    from sparsegrad.sparse_linear import _nonzero_rows

    dy = torch.randn(64, 200, dtype=f64)
    dy[10:50] = 0  # padded tokens
    dy[3, :150] = 0  # a real row that starts with zeros
    dy[20, 199] = 2.0  # a late non-zero in an otherwise zero row
    rows, count = _nonzero_rows(dy)
    expected = dy.ne(0).any(dim=1).nonzero().squeeze(1)
    assert count == expected.numel() == 25 and torch.equal(rows, expected)
    assert _nonzero_rows(torch.randn(8, 5, dtype=f64)) == (None, 8)  # all non-zero: nothing to skip
