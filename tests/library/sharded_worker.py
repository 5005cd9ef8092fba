"""A torchrun worker: a tiny LLaMA decoder converted by sparsegrad.apply, sharded over the processes
(or not, with one), trained 3 steps on a fixed global batch of 8; rank 0 saves the whole trained state
and the weights an unsharded copy of the model folds the same trained S into.
    torchrun --nproc-per-node N sharded_worker.py MODE DTYPE OUT [torch-adamw] [no-sparsify]"""
import gc
import sys

import torch
import torch.distributed as dist
from transformers import LlamaConfig, LlamaForCausalLM

import sparsegrad
from sparsegrad.sharding import full_state_dict, load_full_state_dict

mode, dtype, out, flags = sys.argv[1], getattr(torch, sys.argv[2]), sys.argv[3], sys.argv[4:]
# "block": the fixed mode with the block support
options = {"mode": "fixed", "structure": "block"} if mode == "block" else {"mode": mode}
dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()


def converted_model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(config).to(dtype)
    model.requires_grad_(False)
    ids = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(1))
    bases = sparsegrad.compute_bases(model, [{"input_ids": ids, "labels": ids}], n_steps=1, progress=False)
    return sparsegrad.apply(model, bases, density=0.1, **options)


model = converted_model()
if world > 1:
    sparsegrad.shard(model)
if "torch-adamw" in flags:  # torch's own optimizer: S is folded after its steps all the same (folding.py)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
else:
    opt = sparsegrad.optimizer(model, lr=1e-2)
per = 8 // world
for step in range(3):
    x = torch.randint(0, 100, (8, 12), generator=torch.Generator().manual_seed(10 + step))[rank * per:(rank + 1) * per]
    model(input_ids=x, labels=x).loss.backward()
    if "no-sparsify" not in flags:  # without, the optimizer step cuts the top-k all the same (folding.py)
        sparsegrad.sparsify_gradients(model)
    sparsegrad.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
state = full_state_dict(model) if world > 1 else {k: v.detach().clone() for k, v in model.state_dict().items()}
if world > 1:  # the gathered state loads back into the shards unchanged
    load_full_state_dict(model, state)
    again = full_state_dict(model)
    assert all(torch.equal(state[k], again[k]) for k in state), "the state changed on a load into the shards"
rebuilt = {}
if rank == 0:  # the weights an unsharded layer folds the same S into, from the same pretrained weights
    reference = converted_model()
    for name, layer in sparsegrad.sparse_layers(reference).items() if mode != "meprop" else ():
        layer.set_trained(state[f"{name}.{'values' if options['mode'] == 'fixed' else 'delta'}"])
        rebuilt[f"{name}.weight"] = layer.weight.detach().clone()
    torch.save({"state": state, "rebuilt": rebuilt}, out)
# Free what holds the process group, then the group, before interpreter exit: left to exit, gloo's threads
# can be torn down out of order and a rank aborts after its work is done.
del model, opt
gc.collect()
dist.destroy_process_group()
