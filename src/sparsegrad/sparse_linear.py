"""SparseLinear: what every layer with sparse weight updates shares, the method's and MeProp's.

Notation (PyTorch convention): the weight W is (d_out, d_in) and y = x W^T + b. The layer keeps
its effective weight merged in `weight`, so its forward pass is a plain ``F.linear`` and its input
gradient is ``dy @ W`` -- exactly those of ``nn.Linear`` with the same weight (the paper's
Table 2). What trains is the subclass's business: `trainable` is the tensor the optimizer updates
and `_trainable_grad` computes its gradient from the layer's input x and output gradient dy.

On the CPU, backward skips the all-zero rows of dy (sparse-by-dense multiplication, the paper's
Sec. 3.3): only the rows holding a non-zero take part in the input and weight gradients. On a GPU
it does not (see skips_zero_rows): nothing in a step reads the device back.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.profiler import record_function

from .collectives import keep_global_topk

# Rows of dy are gathered (the zero rows skipped) when at most this share is non-zero.
_ROW_SKIP_BELOW = 0.9
_ROW_LEAD = 16  # entries of each row of dy read first to find the non-zero rows

# Weights in these dtypes are folded exactly from the pretrained weight (see layer.py); the
# trained values and the bases of such a layer are kept in float32.
LOW_PRECISION = (torch.bfloat16, torch.float16)


def master_dtype(dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype trained values and bases are kept in for a weight of `dtype`: float32 for low precision."""
    return torch.float32 if dtype in LOW_PRECISION else dtype


def keep_precision(fn, t: torch.Tensor) -> torch.Tensor:
    """fn(t) for a Module._apply conversion, never narrower than float32: the bases and the trained
    values of a low-precision layer stay float32 (`model.to(torch.bfloat16)` included)."""
    out = fn(t)
    if out.dtype in LOW_PRECISION and t.dtype not in LOW_PRECISION:
        out = t.to(device=out.device, dtype=torch.float32)
    return out


# ---------------------------------------------------------------- linear-like modules

def is_conv1d(module: nn.Module) -> bool:
    """transformers' Conv1D (GPT-2): weight (d_in, d_out), y = x @ W + b."""
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_linear_like(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The module's weight in nn.Linear orientation, shape (d_out, d_in)."""
    return module.weight.t() if is_conv1d(module) else module.weight


def check_plain_weight(module: nn.Module, name: str = "") -> None:
    """Refuse quantized linears (bitsandbytes, torchao, GPTQ/AWQ kernels): their weight cannot take the fold."""
    weight = getattr(module, "weight", None)
    where = f"layer {name!r}" if name else "this layer"
    if (not is_linear_like(module) or not torch.is_tensor(weight) or type(weight) not in (torch.Tensor, nn.Parameter)
            or not weight.is_floating_point()):
        kind = type(weight).__name__ if torch.is_tensor(weight) and not weight.is_floating_point() else type(module).__name__
        raise TypeError(
            f"{where} is quantized ({kind}, weight dtype {getattr(weight, 'dtype', None)}): SparseGrad folds its "
            "trained entries into the weight, which needs a floating-point weight. Load the model in bfloat16 "
            "(torch_dtype=torch.bfloat16) instead of 8-bit or 4-bit; for a quantized base, use LoRA (QLoRA)"
        )


def in_out_features(module: nn.Module) -> tuple[int, int]:
    d_out, d_in = linear_weight(module).shape
    return d_in, d_out


# ---------------------------------------------------------------- top-k

def check_k(k: int, d_in: int, d_out: int) -> int:
    if not isinstance(k, int) or isinstance(k, bool):
        raise TypeError(f"k must be an int, got {type(k).__name__}")
    if not 1 <= k <= d_in * d_out:
        raise ValueError(
            f"k={k} is out of range for a {d_in}x{d_out} layer: choose 1 <= k <= {d_in * d_out} "
            f"(n_params per layer) or a density in (0, 1]"
        )
    return k


def sparse_entries(flat: torch.Tensor, values: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A sparse COO tensor of `shape` holding `values` at the sorted, distinct flat indices `flat`;
    marked coalesced, so that nothing downstream sorts it again (or reads the device back to do so)."""
    index = torch.stack((flat // shape[1], flat % shape[1]))
    return torch.sparse_coo_tensor(index, values, shape, check_invariants=False, is_coalesced=True)


def topk_entries(full: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest-magnitude entries of the 2-d `full` as a sparse COO tensor (exactly k kept)."""
    flat = torch.topk(full.reshape(-1).abs(), k, sorted=False).indices.sort().values
    return sparse_entries(flat, full.reshape(-1)[flat], full.shape)


def skips_zero_rows(dy: torch.Tensor) -> bool:
    """Skip the all-zero rows of dy (Sec. 3.3) where it pays: on the CPU, where finding them reads
    nothing back and every skipped row saves its FLOPs. On a GPU a zero row costs next to nothing
    in a matmul, while counting the rows would stall the host until the device's queue drains;
    and a compiled graph keeps static shapes."""
    return dy.device.type == "cpu" and not torch.compiler.is_compiling()


def _nonzero_rows(dy: torch.Tensor) -> tuple[torch.Tensor | None, int]:
    """Indices of the rows of dy (tokens, d_out) holding a non-zero (None if skipping won't pay), and their count.

    A row with a non-zero among its first few entries is non-zero: only the others (the padded tokens' rows, and
    the rare real row that starts with zeros) are read whole, not all of dy."""
    nonzero = dy[:, :_ROW_LEAD].ne(0).any(dim=1)  # (t,)
    unsure = (~nonzero).nonzero().squeeze(1)
    if unsure.numel():
        nonzero[unsure] = dy.index_select(0, unsure).ne(0).any(dim=1)
    nz = nonzero.nonzero().squeeze(1)
    return (nz if nz.numel() < _ROW_SKIP_BELOW * dy.shape[0] else None), nz.numel()


# ---------------------------------------------------------------- autograd

class _SparseLinearFn(torch.autograd.Function):
    """y = x W^T + b with W the merged weight; the trainable tensor's gradient from the layer."""

    @staticmethod
    def forward(ctx, x, weight, bias, trainable, layer):
        ctx.layer = layer
        ctx.save_for_backward(x, weight)
        return F.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, dy):
        with torch.autocast(dy.device.type, enabled=False):  # a backward run under autocast keeps its dtypes
            return _SparseLinearFn._backward(ctx, dy)

    @staticmethod
    def _backward(ctx, dy):
        x, weight = ctx.saved_tensors
        layer: SparseLinear = ctx.layer
        d_in, d_out = layer.in_features, layer.out_features
        x2, dy2 = x.reshape(-1, d_in), dy.reshape(-1, d_out)
        rows = None
        if layer.skip_zero_rows and skips_zero_rows(dy2):
            rows, n_nonzero = _nonzero_rows(dy2)
            layer.row_counts[0] += n_nonzero
            layer.row_counts[1] += dy2.shape[0]
        if rows is not None:  # Sec. 3.3: only rows of dy with a non-zero take part
            x2, dy_r = x2.index_select(0, rows), dy2.index_select(0, rows)
        else:
            dy_r = dy2

        dx = dw = db = dt = None
        if ctx.needs_input_grad[0]:
            with record_function("sparsegrad.input_grad"):
                dx_r = dy_r @ weight.to(dy.dtype)  # (t, d_out) @ (d_out, d_in)
            if rows is None:
                dx = dx_r.view(*dy.shape[:-1], d_in)
            else:
                dx = dy2.new_zeros(dy2.shape[0], d_in).index_copy_(0, rows, dx_r).view(*dy.shape[:-1], d_in)
        if ctx.needs_input_grad[2]:
            db = dy2.sum(0).to(layer.bias.dtype)  # unrotated sum(dy)
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[3]:
            with record_function(f"sparsegrad.{layer.mode}_grad"):
                grad = layer._trainable_grad(x2, dy_r)
            if layer.trains_weight:
                dw = grad
            else:
                dt = grad
        return dx, dw, db, dt, None


# ---------------------------------------------------------------- the layer

def _fold_before_saving(module: SparseLinear, prefix: str, keep_vars: bool) -> None:
    module.sync()  # a function, not a lambda: layers pickle


class SparseLinear(nn.Module):
    """Base of the drop-in nn.Linear replacements that train k entries per layer.

    Subclasses set `mode`, `trains_weight` (the optimizer updates `weight` itself) and implement
    `trainable` and `_trainable_grad`; those that keep trained values apart from the merged weight
    implement `sync`, which folds them into `weight`.
    """

    mode: str = ""
    trains_weight: bool = False

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, k: int,
                 device=None, dtype=None, owner: nn.Linear | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.in_features, self.out_features = in_features, out_features
        self.k = check_k(k, in_features, out_features)
        if owner is None:
            self.weight = nn.Parameter(torch.empty(out_features, in_features, **factory),
                                       requires_grad=self.trains_weight)
            self.bias = nn.Parameter(torch.zeros(out_features, **factory)) if bias else None
        else:
            # Borrowed (the peft tuner layer): the wrapped nn.Linear keeps its weight and bias and
            # this layer reads and folds into them -- no second copy, and nothing of the base model
            # among this layer's parameters or state. Not registered as a submodule.
            self.__dict__["_owner"] = owner
        self.original_type = "Linear"
        # skip the all-zero rows of dy where that pays (see skips_zero_rows); False: never
        self.skip_zero_rows = True
        # [non-zero rows of dy, rows of dy] seen by backward since the last `model.take_row_share` (Fig. 3),
        # counted where rows are skipped (their count is then known on the host for free)
        self.row_counts = [0, 0]
        # top-k layers: keep the top-k at every backward (the paper), or leave the full gradient
        # for `sparsify_grad` to cut once it is complete (summed over micro-batches, reduced over ranks)
        self.topk_in_backward = True
        # sharded by FSDP2 (sparsegrad.shard): folds after the optimizer step, into this rank's rows only
        self.sharded = False
        # whatever is saved is current: fold pending updates before state_dict() / save_pretrained
        self.register_state_dict_pre_hook(_fold_before_saving)

    def __getattr__(self, name: str):
        owner = self.__dict__.get("_owner")
        if owner is not None and name in ("weight", "bias"):
            return getattr(owner, name)
        holder = self.__dict__.get("_modules", {}).get("sharded_trainable")  # S's tensor while sharded (sharding.py)
        if holder is not None and name == holder.name:
            return holder._parameters[name]
        return super().__getattr__(name)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_linear(cls, module: nn.Module, *, k: int, borrow: bool = False, **layer_kwargs) -> SparseLinear:
        """Wrap an nn.Linear (or transformers' Conv1D); outputs are unchanged.

        borrow: read and fold into `module`'s own weight and bias instead of a copy (an nn.Linear
        with a frozen weight; how the peft tuner layer wraps its base layer)."""
        check_plain_weight(module)
        w = linear_weight(module)
        d_out, d_in = w.shape
        if borrow:
            if not isinstance(module, nn.Linear) or cls.trains_weight:
                raise TypeError(f"{cls.__name__} borrows the weight of an nn.Linear it does not train; "
                                f"got {type(module).__name__}")
            return cls(d_in, d_out, module.bias is not None, k=k, device=w.device, dtype=w.dtype, owner=module,
                       **layer_kwargs)
        layer = cls(d_in, d_out, module.bias is not None, k=k, device=w.device, dtype=w.dtype, **layer_kwargs)
        with torch.no_grad():
            layer.weight.copy_(w)
            if module.bias is not None:
                layer.bias.copy_(module.bias)
                layer.bias.requires_grad_(module.bias.requires_grad)
        layer.original_type = "Conv1D" if is_conv1d(module) else "Linear"
        return layer

    def to_linear(self) -> nn.Module:
        """A plain nn.Linear (or Conv1D, if that is what was wrapped) with the trained effective weight.
        Its weight and bias keep this layer's requires_grad (frozen unless the dense weight itself
        trained, as in MeProp), as peft's merge_and_unload keeps the base layer's."""
        self.sync()
        w = self.weight.detach()
        if self.original_type == "Conv1D":
            from transformers.pytorch_utils import Conv1D

            out = Conv1D(self.out_features, self.in_features).to(device=w.device, dtype=w.dtype)
            w = w.t()
        else:
            out = nn.Linear(self.in_features, self.out_features, self.bias is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            out.weight.copy_(w)
            if self.bias is not None:
                out.bias.copy_(self.bias.detach())
        out.weight.requires_grad_(self.weight.requires_grad)
        if self.bias is not None:
            out.bias.requires_grad_(self.bias.requires_grad)
        return out

    # ------------------------------------------------------------------ what subclasses provide
    @property
    def trainable(self) -> nn.Parameter:
        """The tensor the optimizer updates."""
        raise NotImplementedError

    def _trainable_grad(self, x: torch.Tensor, dy: torch.Tensor) -> torch.Tensor:
        """Gradient of `trainable` from x (t, d_in) and dy (t, d_out), zero rows of dy already skipped."""
        raise NotImplementedError

    def sync(self) -> None:
        """Fold trained values that changed since the last fold into `weight` (nothing to fold here)."""

    @torch.no_grad()
    def sparsify_grad(self) -> None:
        """With topk_in_backward=False: keep the top-k entries of the complete gradient (after
        accumulation and the data-parallel all-reduce), zeros elsewhere."""
        grad = self.trainable.grad
        if grad is not None and self.sharded:
            keep_global_topk(grad, self.k)
        elif grad is not None:
            self.trainable.grad = topk_entries(grad.to_dense() if grad.is_sparse else grad, self.k)

    # ------------------------------------------------------------------ compute
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"expected input with last dimension {self.in_features}, got {tuple(x.shape)}")
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            trainable = None
            if not self.trains_weight:  # sharded: through its FSDP group, which gathers it and reduces its gradient
                trainable = self.sharded_trainable() if self.sharded else self.trainable
            return _SparseLinearFn.apply(x, self.weight, self.bias, trainable, self)

    def extra_repr(self) -> str:
        density = self.k / (self.in_features * self.out_features)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"mode={self.mode}, k={self.k} ({100 * density:.2f}%)"
        )
