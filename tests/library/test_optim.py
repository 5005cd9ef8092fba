"""SparseAdamW against torch.optim.AdamW; O(k) state; state_dict; clip_grad_norm_; the HF Trainer."""
import copy
import io

import pytest
import torch
from torch import nn

import sparsegrad
from sparsegrad import SparseAdamW


@pytest.mark.parametrize("lazy", [False, True])
def test_matches_torch_adamw_on_a_full_support(lazy):
    torch.manual_seed(0)
    p_ref = nn.Parameter(torch.randn(6, 5, dtype=torch.float64))
    p = nn.Parameter(p_ref.detach().clone())
    kwargs = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-7, "weight_decay": 0.1}
    ref = torch.optim.AdamW([p_ref], **kwargs)
    ours = SparseAdamW([p], lazy=lazy, **kwargs)
    for _ in range(5):
        g = torch.randn(6, 5, dtype=torch.float64)  # every entry non-zero: full support
        p_ref.grad, p.grad = g.clone(), g.clone()
        ref.step()
        ours.step()
        torch.testing.assert_close(p, p_ref, rtol=1e-12, atol=1e-12)
    expected, moments = ref.state[p_ref]["exp_avg_sq"], ours.state[p]["exp_avg_sq"]
    if lazy:  # moments of the entries that had a gradient, by sorted flat index: here all of them
        index, _, moments = ours.lazy_entries(p)
        assert torch.equal(index, torch.arange(30))
        expected = expected.reshape(-1)
    torch.testing.assert_close(moments, expected)


def test_a_float16_parameter_steps_on_a_float32_master_copy():
    """Plain AdamW on float16 gives NaN within two steps (its second moment underflows, eps is zero there);
    SparseAdamW steps a float32 copy with float32 moments and rounds once: the float32 run, rounded. Its
    state survives a state_dict round trip in float32 (torch would cast it to the parameter's dtype)."""
    torch.manual_seed(0)
    p32 = nn.Parameter((torch.randn(8, 4) * 0.1).half().float())  # values float16 holds exactly
    p16, torch16 = nn.Parameter(p32.detach().half()), nn.Parameter(p32.detach().half())
    ours32, ours16 = SparseAdamW([p32], lr=1e-3), SparseAdamW([p16], lr=1e-3)
    plain16 = torch.optim.AdamW([torch16], lr=1e-3)
    for step in range(3):
        g = (torch.randn(8, 4) * 1e-4).half().float()  # small gradients, as a classifier head's late in training
        p32.grad, p16.grad, torch16.grad = g, g.half(), g.half()
        for opt in (ours32, ours16, plain16):
            opt.step()
        if step == 0:  # resumed after the first step
            state = ours16.state_dict()
            ours16 = SparseAdamW([p16], lr=1e-3)
            ours16.load_state_dict(copy.deepcopy(state))
            assert all(ours16.state[p16][k].dtype == torch.float32 for k in ("master", "exp_avg", "exp_avg_sq"))
    assert not torch.isfinite(torch16).all()  # what SparseAdamW avoids
    assert p16.dtype == torch.float16 and torch.equal(p16, p32.detach().half())


def test_lazy_update_touches_only_the_gradient_support():
    p = nn.Parameter(torch.ones(4, 4))
    opt = SparseAdamW([p], lr=0.1, weight_decay=0.5, lazy=True)
    grad = torch.zeros(4, 4)
    grad[1, 2], grad[3, 0] = 1.0, -2.0
    p.grad = grad
    opt.step()
    changed = (p != 1).nonzero().tolist()
    assert changed == [[1, 2], [3, 0]]  # weight decay and moments lazily, too
    index, exp_avg, _ = opt.lazy_entries(p)
    assert index.tolist() == [6, 12] and exp_avg.numel() == 2
    # sparse COO gradients take the same path
    q = nn.Parameter(torch.ones(4, 4))
    opt_q = SparseAdamW([q], lr=0.1, weight_decay=0.5, lazy=True)
    q.grad = grad.to_sparse()
    opt_q.step()
    assert torch.equal(q, p)


def test_lazy_moments_grow_with_the_entries_trained():
    p = nn.Parameter(torch.ones(4, 4))
    opt = SparseAdamW([p], lr=0.1, lazy=True)
    for entries in ([(1, 2), (3, 0)], [(0, 1), (3, 0)]):  # one new entry, one known
        p.grad = torch.zeros(4, 4)
        for (i, j), g in zip(entries, (0.5, 1.0)):
            p.grad[i, j] = g
        opt.step()
    index, m, _ = opt.lazy_entries(p)
    assert index.tolist() == [1, 6, 12]
    assert m.tolist() == pytest.approx([0.1 * 0.5, 0.1 * 0.5, 0.9 * 0.1 * 1.0 + 0.1 * 1.0])  # entry 6 untouched: lazy


@pytest.fixture(scope="module")
def minilm_bases(_minilm_classifier, bbc_batches):
    return sparsegrad.compute_bases(_minilm_classifier, bbc_batches, n_steps=2, progress=False)


def head_only(model):
    for p in model.parameters():
        p.requires_grad_(False)
    model.classifier.requires_grad_(True)
    return model


def test_fixed_mode_optimizer_state_is_order_k(minilm, minilm_bases, bbc_batches):
    head_only(minilm)
    sparsegrad.apply(minilm, minilm_bases, n_params=4000, mode="fixed")
    opt = sparsegrad.optimizer(minilm, lr=1e-3, weight_decay=0.01)
    minilm(**bbc_batches[0]).loss.backward()
    opt.step()
    head = sum(p.numel() for p in minilm.classifier.parameters())
    state_elements = sum(t.numel() for s in opt.state.values() for t in (s["exp_avg"], s["exp_avg_sq"]))
    assert state_elements == 2 * (12 * 4000 + head)  # two moments per trained value, nothing per weight entry
    names = {g["name"]: g for g in opt.param_groups}
    assert names["decay"]["weight_decay"] == 0.01 and names["no_decay"]["weight_decay"] == 0.0


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_state_dict_round_trip_and_clipping(minilm, minilm_bases, bbc_batches, mode):
    head_only(minilm)
    sparsegrad.apply(minilm, minilm_bases, density=0.005, mode=mode)
    twin = copy.deepcopy(minilm)
    opt = sparsegrad.optimizer(minilm, lr=1e-3, weight_decay=0.01)

    def step(model, optim, batch):
        model(**batch).loss.backward()
        norm = sparsegrad.clip_grad_norm_(model.parameters(), 0.5)  # dynamic gradients are sparse
        assert torch.isfinite(norm)
        optim.step()
        optim.zero_grad()

    step(minilm, opt, bbc_batches[0])
    buffer = io.BytesIO()  # through bytes, as a checkpoint on disk (no tensors shared)
    torch.save({"model": minilm.state_dict(), "opt": opt.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer)
    twin.load_state_dict(saved["model"])
    twin_opt = sparsegrad.optimizer(twin, lr=1e-3, weight_decay=0.01)
    twin_opt.load_state_dict(saved["opt"])
    minilm.eval(), twin.eval()  # no dropout: both continue identically
    for batch in bbc_batches[1:3]:
        step(minilm, opt, batch)
        step(twin, twin_opt, batch)
    for (n, a), (_, b) in zip(minilm.state_dict().items(), twin.state_dict().items()):
        assert torch.equal(a, b), n


def test_a_checkpoint_of_another_mode_says_so(minilm, minilm_bases):
    """Resuming a fixed run as dynamic (or back) names the option, not torch's group count."""
    head_only(minilm)
    twin = copy.deepcopy(minilm)
    sparsegrad.apply(minilm, minilm_bases, density=0.005, mode="fixed")
    sparsegrad.apply(twin, minilm_bases, density=0.005, mode="dynamic")
    fixed, dynamic = sparsegrad.optimizer(minilm, lr=1e-3), sparsegrad.optimizer(twin, lr=1e-3)
    with pytest.raises(ValueError, match="saved from a fixed model and this one is dynamic or meprop: resume with "
                                         "the mode"):
        dynamic.load_state_dict(fixed.state_dict())
    with pytest.raises(ValueError, match="saved from a dynamic or meprop model and this one is fixed"):
        fixed.load_state_dict(dynamic.state_dict())


def test_hf_trainer_with_our_optimizer(minilm, minilm_bases, bbc_batches, tmp_path):
    from torch.utils.data import Dataset
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    class Rows(Dataset):
        def __init__(self, batches):
            self.rows = [{k: v[i] for k, v in b.items()} for b in batches for i in range(len(b["labels"]))]

        def __len__(self):
            return len(self.rows)

        def __getitem__(self, i):
            return self.rows[i]

    head_only(minilm)
    sparsegrad.apply(minilm, minilm_bases, density=0.01, mode="fixed")
    before = {n: m.values.detach().clone() for n, m in sparsegrad.sparse_layers(minilm).items()}
    opt = sparsegrad.optimizer(minilm, lr=5e-3)
    sched = get_linear_schedule_with_warmup(opt, num_warmup_steps=1, num_training_steps=4)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=4, per_device_train_batch_size=8, max_grad_norm=1.0,
                             report_to=[], save_strategy="steps", save_steps=4, logging_steps=1, use_cpu=True,
                             disable_tqdm=True)
    trainer = Trainer(model=minilm, args=args, train_dataset=Rows(bbc_batches[:2]), optimizers=(opt, sched))
    trainer.train()
    assert trainer.state.global_step == 4
    for name, layer in sparsegrad.sparse_layers(minilm).items():
        assert not torch.equal(layer.values, before[name]), name
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0)  # the scheduler drove our optimizer
    # the checkpoint written right after the last optimizer step (no forward between) is current:
    # a plain model loaded from it gives the trained model's logits
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(tmp_path / "checkpoint-4").eval()
    minilm.eval()
    batch = {k: v for k, v in bbc_batches[3].items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(plain(**batch).logits, minilm(**batch).logits, rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode", ["fixed", "dynamic", "meprop"])
def test_one_step_updates_exactly_k_entries(mode):
    """After one optimizer step exactly k trained entries moved (weight decay included)."""
    torch.manual_seed(0)
    d_in, d_out, k = 16, 24, 10
    U = torch.linalg.qr(torch.randn(d_in, d_in))[0]
    V = torch.linalg.qr(torch.randn(d_out, d_out))[0]
    layer = sparsegrad.SparseGradLinear.from_linear(
        nn.Linear(d_in, d_out), k=k, mode=mode, U=U, V=V, energy=torch.rand(d_in, d_out))
    layer.bias.requires_grad_(False)
    before = layer.trainable.detach().clone()
    opt = sparsegrad.optimizer(layer, lr=0.1, weight_decay=0.1)
    layer(torch.randn(8, d_in)).square().sum().backward()
    opt.step()
    assert int((layer.trainable != before).sum()) == k


def test_lazy_store_takes_repeated_and_growing_sparse_gradients():
    """Sparse gradients summed over backward passes repeat entries (their parts sum); a store that fills
    grows, and every step equals SparseAdamW on the coalesced gradient."""
    torch.manual_seed(0)
    p, p_ref = nn.Parameter(torch.randn(30, 20)), None
    p_ref = nn.Parameter(p.detach().clone())
    ours, ref = SparseAdamW([p], lr=0.1, weight_decay=0.1, lazy=True), SparseAdamW([p_ref], lr=0.1, weight_decay=0.1, lazy=True)
    for step in range(12):
        flat = torch.randint(0, 600, (40 + 10 * step,))  # repeats within, and more new entries each step
        grad = torch.sparse_coo_tensor(torch.stack((flat // 20, flat % 20)), torch.randn(flat.numel()), (30, 20))
        p.grad, p_ref.grad = grad, grad.coalesce()
        ours.step()
        ref.step()
        torch.testing.assert_close(p, p_ref, rtol=1e-6, atol=1e-7)
    index, exp_avg, _ = ours.lazy_entries(p)
    ref_index, ref_avg, _ = ref.lazy_entries(p_ref)
    assert torch.equal(index, ref_index) and torch.equal(index, index.unique())
    torch.testing.assert_close(exp_avg, ref_avg)
