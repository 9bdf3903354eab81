"""The autograd kernels of sparse deltas (:mod:`fps_onnx.torch.train.sparse`).

:class:`GatherGrad` hands a module the merged weight and keeps only the k
selected entries of its gradient. :class:`SparseLinear` is the forward and
backward of an ``nn.Linear`` (or transformers' ``Conv1D``) whose weight has a
delta, without the dense weight gradient: its backward returns the input's
gradient and, for the deltas, only the k sums
``grad_values[i] = sum_n g[n, r_i] * x[n, c_i]`` over the tokens
(O(tokens x k) instead of a second dense matmul; :func:`_entry_grad`).
"""

from __future__ import annotations

from ._torch import nn, torch

__all__ = ["GatherGrad", "SparseLinear"]


class GatherGrad(torch.autograd.Function):
    """Identity on the (already merged) weight; the backward keeps only its k entries."""

    @staticmethod
    def forward(ctx, weight, values, indices):
        ctx.save_for_backward(indices)
        return weight.view_as(weight)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        return None, grad.take(indices.long()), None


# elements of one gathered [chunk, tokens] block of the deltas' gradient: small
# enough to stay in cache, large enough to amortise the per-kernel overhead
_CHUNK_ELEMENTS = 1 << 19


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast computes a matmul of ``x`` in, or None when it is off for ``x``."""
    kind = x.device.type
    if x.dtype == torch.float64 or not x.is_floating_point() or not torch.is_autocast_enabled(kind):
        return None
    return torch.get_autocast_dtype(kind)


class SparseLinear(torch.autograd.Function):
    """``y = x W^T + b`` (``transposed``: ``x W + b``) on the merged weight ``W``.

    The backward gives the input's gradient (dense), the bias's, and for
    ``values`` only the selected entries of the weight's gradient, summed over
    the flattened tokens in float32 (:func:`_entry_grad`). ``W`` gets no
    gradient. Under autocast the matmuls run in autocast's dtype, as
    ``F.linear`` would.
    """

    @staticmethod
    def forward(ctx, x, weight, values, indices, bias, transposed):
        original = weight  # saved as it is: no copy of the weight is kept
        dtype = _autocast_dtype(x)
        if dtype is not None:
            x, weight = x.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        with torch.autocast(x.device.type, enabled=False):
            if transposed:  # transformers' Conv1D: weight [in, out]
                flat = x.reshape(-1, x.shape[-1])
                out = torch.addmm(bias, flat, weight) if bias is not None else flat.mm(weight)
                out = out.view(*x.shape[:-1], weight.shape[1])
            else:
                out = nn.functional.linear(x, weight, bias)
        # x in the matmul's dtype (under autocast the copy F.linear would keep too)
        ctx.save_for_backward(x if ctx.needs_input_grad[2] else None, original, indices)
        ctx.transposed = transposed
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, indices = ctx.saved_tensors
        transposed = ctx.transposed
        grad_x = grad_values = grad_bias = None
        with torch.autocast(grad.device.type, enabled=False):
            if ctx.needs_input_grad[0]:
                weight = weight.to(grad.dtype)
                grad_x = grad.matmul(weight.t() if transposed else weight)
            g = grad.reshape(-1, grad.shape[-1])
            if x is not None:
                grad_values = _entry_grad(g, x.reshape(-1, x.shape[-1]), indices, weight.shape[1], transposed)
            if ctx.needs_input_grad[4]:
                grad_bias = g.sum(0, dtype=torch.float32)
        return grad_x, None, grad_values, None, grad_bias, None


def _entry_grad(g: torch.Tensor, x: torch.Tensor, indices: torch.Tensor, columns: int,
                transposed: bool) -> torch.Tensor:
    """float32 ``g^T x`` (``transposed``: ``x^T g``) at the flat ``indices`` of a
    [*, ``columns``] weight; ``g`` [N, out], ``x`` [N, in]."""
    g, x = g.to(torch.float32), x.to(torch.float32)
    left, right = (x, g) if transposed else (g, x)  # the weight's gradient is left^T right
    rows, cols = indices // columns, indices % columns
    if left.device.type in _SAMPLED_DEVICES and bool((indices[1:] > indices[:-1]).all()):
        return _sampled(left, right, rows, cols, columns)
    return _gathered(left, right, rows, cols)


# where torch.sparse.sampled_addmm computes the entries (measured faster than gathering on CPU)
_SAMPLED_DEVICES = ("cpu",)


def _sampled(left, right, rows, cols, columns: int) -> torch.Tensor:
    """``(left^T right)`` at (rows, cols), sorted row-major, through a CSR pattern: no [k, N] blocks."""
    import warnings

    crow = torch.zeros(left.shape[1] + 1, dtype=cols.dtype, device=left.device)  # the indices' own dtype
    crow[1:] = torch.cumsum(torch.bincount(rows, minlength=left.shape[1]), 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the CSR layout's "beta" notice
        pattern = torch.sparse_csr_tensor(crow, cols, torch.zeros(cols.numel(), device=left.device),
                                          (left.shape[1], columns), check_invariants=False)
    return torch.sparse.sampled_addmm(pattern, left.t(), right, beta=0.0).values()


def _gathered(left, right, rows, cols) -> torch.Tensor:
    """``(left^T right)`` at (rows, cols): gathered rows of the transposes, multiplied and
    summed over the tokens, in chunks of about ``_CHUNK_ELEMENTS``."""
    lt = left.t().contiguous()  # [rows, N]: each entry's row is contiguous
    rt = right.t().contiguous()
    out = torch.empty(rows.numel(), dtype=torch.float32, device=left.device)
    step = max(64, _CHUNK_ELEMENTS // max(left.shape[0], 1))
    for start in range(0, rows.numel(), step):
        end = start + step
        block = lt.index_select(0, rows[start:end])
        block.mul_(rt.index_select(0, cols[start:end]))
        torch.sum(block, 1, out=out[start:end])
    return out
