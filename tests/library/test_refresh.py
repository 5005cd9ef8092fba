"""The support refresh of the fixed mode: energy against autograd, S and the weight unchanged by a
refresh, the optimizer's moments carried, the adapter whole (float64)."""
import pytest
import torch
from torch import nn

from sparsegrad import SparseAdamW, SparseGradLinear, SupportRefresh, load_adapter, save_adapter
from sparsegrad.refresh import carry_state, refresh_support

D_IN, D_OUT, K = 12, 20, 40
f64 = torch.float64


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=f64))[0]


def make_layer(seed: int = 0):
    """A fixed layer with a trained S (non-zero, folded), and the nn.Linear it came from."""
    torch.manual_seed(seed)
    lin = nn.Linear(D_IN, D_OUT).to(f64)
    layer = SparseGradLinear.from_linear(lin, k=K, mode="fixed", U=orthogonal(D_IN, 1), V=orthogonal(D_OUT, 2),
                                         energy=torch.rand(D_IN, D_OUT, dtype=f64))
    layer.set_trained(torch.randn(K, dtype=f64))
    return layer, lin


def dense_S(layer) -> torch.Tensor:
    """S as a dense (d_in, d_out) matrix, from every trained entry (support and frozen)."""
    rows, cols, values = layer.trained_entries()
    S = torch.zeros(D_IN, D_OUT, dtype=f64)
    S.index_put_((rows, cols), values, accumulate=True)  # a repeated entry would be counted twice
    return S


def test_energy_is_the_transformed_gradient_squared_summed_over_backward_passes():
    layer, _ = make_layer()
    layer.record_energy()
    expected = torch.zeros(D_IN, D_OUT, dtype=torch.float32)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(2, 5, D_IN, dtype=f64, generator=g)
        w = layer.weight.detach().clone().requires_grad_(True)  # the dense reference: dL/dW of the same layer
        target = torch.randn(2, 5, D_OUT, dtype=f64, generator=g)
        ((x @ w.t() + layer.bias.detach() - target) ** 2).sum().backward()
        expected += (layer.U @ w.grad.t() @ layer.V.t()).float() ** 2  # (d_in, d_out) in the bases
        ((layer(x) - target) ** 2).sum().backward()
    torch.testing.assert_close(layer.energy, expected, rtol=1e-5, atol=1e-6)


def test_refresh_keeps_S_and_the_weight_and_moves_the_support_to_the_energy():
    layer, _ = make_layer()
    x = torch.randn(4, D_IN, dtype=f64)
    before_S, before_w, before_y = dense_S(layer), layer.weight.detach().clone(), layer(x).detach()
    old = set(zip(layer.rows.tolist(), layer.cols.tolist()))
    old_values = dict(zip(zip(layer.rows.tolist(), layer.cols.tolist()), layer.values.tolist()))
    layer.record_energy()
    layer.energy.uniform_()
    energy = layer.energy.clone()
    old_position = refresh_support(layer)

    new = list(zip(layer.rows.tolist(), layer.cols.tolist()))
    top = {divmod(i, D_OUT) for i in energy.flatten().topk(K).indices.tolist()}
    assert set(new) == top and layer.energy is None
    assert 0 < len(old & top) < K  # the fixture overlaps partly: some entries stay, some leave, some join
    torch.testing.assert_close(dense_S(layer), before_S, rtol=0, atol=0)  # nothing of S lost or doubled
    assert torch.equal(layer.weight, before_w)
    torch.testing.assert_close(layer(x), before_y, rtol=0, atol=0)
    assert layer.frozen_rows.numel() == len(old - top)
    for pos, (entry, value) in enumerate(zip(new, layer.values.tolist())):
        assert value == old_values.get(entry, 0.0)  # a staying entry keeps its value, a joining one starts at 0
        assert (old_position[pos] >= 0) == (entry in old)


def test_refresh_trains_on_after_it_and_state_dict_and_adapter_keep_the_frozen_part(tmp_path):
    torch.manual_seed(0)
    layer, lin = make_layer()
    model = nn.Sequential(layer)
    opt = SparseAdamW([layer.values], lr=1e-2)
    refresh = SupportRefresh(model, opt, every=3, window=2)
    x, target = torch.randn(8, D_IN, dtype=f64), torch.randn(8, D_OUT, dtype=f64)
    recorded = []
    for _ in range(7):
        ((model(x) - target) ** 2).mean().backward()
        recorded.append(layer.energy is not None)
        opt.step()
        opt.zero_grad()
        layer.sync()
        refresh.step()
    assert recorded == [False, True, True, False, True, True, False] and refresh.refreshes == 2
    # the weight is W_0 + U^T S V for the whole S, support and frozen
    torch.testing.assert_close(layer.weight.detach(), lin.weight.detach() + (layer.U.t() @ dense_S(layer) @ layer.V).t())

    copy, _ = make_layer()
    copy.load_state_dict(layer.state_dict())
    assert torch.equal(copy.frozen_values, layer.frozen_values) and torch.equal(copy.weight, layer.weight)

    save_adapter(model, tmp_path / "adapter")
    plain = nn.Sequential(nn.Linear(D_IN, D_OUT).to(f64))
    plain[0].load_state_dict(lin.state_dict())
    load_adapter(plain, tmp_path / "adapter")
    torch.testing.assert_close(plain[0].weight, layer.weight)


def test_carry_state_moves_moments_and_zeroes_new_entries():
    p = nn.Parameter(torch.zeros(4))
    opt = torch.optim.AdamW([p])
    opt.state[p] = {"step": torch.tensor(5.0), "exp_avg": torch.tensor([1.0, 2, 3, 4]),
                    "exp_avg_sq": torch.tensor([10.0, 20, 30, 40])}
    carry_state(opt, p, torch.tensor([2, -1, 0, 3]))
    assert opt.state[p]["exp_avg"].tolist() == [3, 0, 1, 4] and opt.state[p]["exp_avg_sq"].tolist() == [30, 0, 10, 40]
    assert float(opt.state[p]["step"]) == 5


def test_refresh_refuses_what_it_cannot_do():
    layer, _ = make_layer()
    with pytest.raises(RuntimeError, match="record_energy"):
        refresh_support(layer)
    with pytest.raises(ValueError, match="no fixed SparseGrad layer"):
        SupportRefresh(nn.Sequential(nn.Linear(2, 2)), None, every=3)
    with pytest.raises(ValueError, match="window"):
        SupportRefresh(nn.Sequential(layer), None, every=3, window=4)
