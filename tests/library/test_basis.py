"""Preliminary phase: streaming Gram bases against unfold-and-SVD, on real MiniLM gradients."""
import os

import pytest
import torch

import sparsegrad
from sparsegrad.basis import Bases, GramAccumulator, hosvd_unfold, top_share

UP = "bert.encoder.layer.*.intermediate.dense"
DOWN = "bert.encoder.layer.*.output.dense"


def collect_gradients(model, batches, role_suffix: str) -> torch.Tensor:
    """Stacked (N, d_in, d_out) gradients G = x^T dy of one role, over batches and blocks."""
    model.eval()  # no dropout: deterministic gradients
    weights = [m.weight for n, m in model.named_modules() if n.endswith(role_suffix) and "attention" not in n]
    slices = []
    for batch in batches:
        grads = torch.autograd.grad(model(**batch).loss, weights)
        slices += [g.t().double() for g in grads]  # (d_out, d_in) -> (d_in, d_out)
    return torch.stack(slices)


def assert_same_subspaces(U1: torch.Tensor, U2: torch.Tensor, n: int) -> None:
    """Leading n basis vectors agree up to sign: |<u1_i, u2_i>| = 1."""
    overlap = (U1[:n] @ U2[:n].t()).abs().diagonal()
    torch.testing.assert_close(overlap, torch.ones_like(overlap), rtol=0, atol=1e-6)


@pytest.mark.parametrize("role", ["intermediate.dense", "output.dense"])
def test_streaming_gram_equals_unfold_svd_on_real_gradients(minilm, bbc_batches, role):
    slices = collect_gradients(minilm, bbc_batches[:2], role)  # 2 steps x 6 blocks = 12 slices
    acc = GramAccumulator(*slices.shape[1:], compute_dtype=torch.float64)
    for g in slices:
        acc.add(g)
    U, V, s_in, _ = acc.bases(dtype=torch.float64)
    U_ref, V_ref = hosvd_unfold(slices)
    assert U.shape == (slices.shape[1],) * 2 and V.shape == (slices.shape[2],) * 2
    # compare the directions whose singular values are well separated (the rest is noise-level)
    gaps = (s_in[:-1] - s_in[1:]) / s_in[0]
    n = int(min(64, (gaps > 1e-4).nonzero().max()))
    assert_same_subspaces(U, U_ref, n)
    assert_same_subspaces(V, V_ref, n)
    for B in (U, V):  # orthogonal, rows sorted by descending singular value
        torch.testing.assert_close(B @ B.t(), torch.eye(B.shape[0], dtype=B.dtype), rtol=0, atol=1e-10)
    assert torch.all(s_in[:-1] >= s_in[1:])


def test_compute_bases_on_minilm(minilm, bbc_batches):
    before = {n: (p.detach().clone(), p.requires_grad) for n, p in minilm.named_parameters()}
    minilm.classifier.weight.requires_grad_(False)  # an unusual flag, to see it restored
    flags = {n: p.requires_grad for n, p in minilm.named_parameters()}
    bases = sparsegrad.compute_bases(minilm, bbc_batches, n_steps=3, progress=False)

    for n, p in minilm.named_parameters():  # model untouched
        assert torch.equal(p, before[n][0]) and p.requires_grad == flags[n] and p.grad is None
    assert set(bases.U) == {UP, DOWN}
    assert bases.U[UP].shape == (384, 384) and bases.V[UP].shape == (1536, 1536)
    assert bases.U[DOWN].shape == (1536, 1536) and bases.V[DOWN].shape == (384, 384)
    assert len(bases.layers) == 12 and len(bases.energy) == 12
    assert bases.info["spectra"][UP]["slices"] == 3 * 6

    # the transformed gradient is more compact than the original on real gradients
    shares = bases.info["top1pct_energy_share"]
    for role_key in ("intermediate", "output"):
        rows = [v for n, v in shares.items() if role_key in n]
        orig = sum(r["original"] for r in rows) / len(rows)
        tran = sum(r["transformed"] for r in rows) / len(rows)
        print(f"top-1% energy share, {role_key}: original {orig:.3f}, transformed {tran:.3f}")
        assert tran > orig + 0.05
    name = "bert.encoder.layer.2.output.dense"
    assert abs(top_share(bases.energy[name]) - shares[name]["transformed"]) < 1e-6


def test_compute_bases_streams_the_same_gradients(minilm, bbc_batches):
    """compute_bases' Gram sums equal those of the gradients collected by hand."""
    minilm.eval()
    bases = sparsegrad.compute_bases(minilm, bbc_batches[:2], n_steps=2, with_energy=False, progress=False)
    slices = collect_gradients(minilm, bbc_batches[:2], "intermediate.dense")
    acc = GramAccumulator(*slices.shape[1:])
    for g in slices:
        acc.add(g)
    U, V, _, _ = acc.bases()
    assert_same_subspaces(bases.U[UP].double(), U.double(), 8)
    assert_same_subspaces(bases.V[UP].double(), V.double(), 8)
    assert bases.energy == {}


def test_per_layer_and_per_shape_grouping(minilm, bbc_batches):
    per_layer = sparsegrad.compute_bases(minilm, bbc_batches, 1, group_by="layer", with_energy=False, progress=False)
    assert len(per_layer.U) == 12 and per_layer.layers["bert.encoder.layer.0.output.dense"] == "bert.encoder.layer.0.output.dense"
    per_shape = sparsegrad.compute_bases(minilm, bbc_batches, 1, group_by="shape", with_energy=False, progress=False)
    assert set(per_shape.U) == {"384x1536", "1536x384"}


def test_save_load_round_trip(minilm, bbc_batches, tmp_path):
    bases = sparsegrad.compute_bases(minilm, bbc_batches, n_steps=1, progress=False)
    path = tmp_path / "bases.safetensors"
    bases.save(path)
    assert os.listdir(tmp_path) == ["bases.safetensors"]  # written atomically, no leftovers
    loaded = Bases.load(path)
    assert loaded.layers == bases.layers and loaded.info == bases.info
    for key in bases.U:
        assert torch.equal(loaded.U[key], bases.U[key]) and torch.equal(loaded.V[key], bases.V[key])
    for name in bases.energy:
        assert torch.equal(loaded.energy[name], bases.energy[name])
    with pytest.raises(FileNotFoundError, match="compute_bases"):
        Bases.load(tmp_path / "missing.safetensors")


def test_bad_input(minilm, bbc_batches):
    no_labels = [{k: v for k, v in bbc_batches[0].items() if k != "labels"}]
    with pytest.raises(ValueError, match="labels"):
        sparsegrad.compute_bases(minilm, no_labels, 1, progress=False)
    assert all(p.requires_grad for p in minilm.parameters())  # restored after the error
    with pytest.raises(ValueError, match="match no linear layer"):
        sparsegrad.compute_bases(minilm, bbc_batches, 1, targets=["mlp.up_proj"], progress=False)
    with pytest.raises(ValueError, match="n_steps"):
        sparsegrad.compute_bases(minilm, bbc_batches, 0, progress=False)
    with pytest.raises(ValueError, match="yielded nothing"):
        sparsegrad.compute_bases(minilm, [], 3, progress=False)
