"""An ``Intervention`` applied in place in one GPU launch (Triton), for decode passes.

``intervention.apply`` builds a layer's ablations and clamps from torch operations: seven
or more kernels per direction (the float32 copy, two matrix products, the differences, the
cast back). Inside a captured decode step every kernel costs a few microseconds of launch
gaps, so ablation at every layer of a 28-layer model made a step 30% slower (H100, bench/
gpu_interventions.py). ``apply_`` does the same arithmetic (float32 projections, the order
of engines/intervention.py: ablations, clamps, then the addition) with one program per row,
one launch per layer; it is captured in CUDA graphs like any kernel and compiled by Triton
on first use for each (directions, clamps, add) shape, which the eager run before a capture
triggers. Where Triton or CUDA is absent, ``apply_`` runs ``apply``.
"""
from __future__ import annotations

import functools

import torch

from max_jupyter.engines.intervention import Intervention, apply


def apply_(x: torch.Tensor, op: Intervention) -> None:
    """Apply ``op`` to every row of ``x`` ``[rows, hidden]`` in place (side effect: ``x``
    changes; there is no undo). One Triton launch on a CUDA tensor with contiguous rows and
    an ``op`` of contiguous tensors; otherwise ``intervention.apply`` and a copy back."""
    kernel = _kernel()
    if (kernel is None or not x.is_cuda or x.dim() != 2 or x.stride(-1) != 1
            or not all(t.is_contiguous() for t in op.parts)):  # the kernel reads rows at k * hidden
        x.copy_(apply(x, op))
    else:
        _launch(kernel, x, op)


def _launch(kernel, x: torch.Tensor, op: Intervention) -> None:
    """``kernel`` over the rows of ``x`` with ``op``'s tensors (contiguous, on ``x``'s device)."""
    hidden = x.shape[1]
    unused = x  # a pointer for the parts ``op`` lacks (never read: the flags skip them)
    kernel[(x.shape[0],)](
        x, x.stride(0), hidden,
        op.add if op.add is not None else unused,
        op.ablate if op.ablate is not None else unused, op.targets if op.targets is not None else unused,
        op.clamp if op.clamp is not None else unused, op.low if op.low is not None else unused,
        op.high if op.high is not None else unused,
        ABLATE=0 if op.ablate is None else len(op.ablate), CLAMP=0 if op.clamp is None else len(op.clamp),
        ADD=op.add is not None, BLOCK=1 << (hidden - 1).bit_length(), num_warps=8 if hidden > 2048 else 4)


@functools.cache
def _kernel():
    """The Triton kernel, or None where Triton cannot be imported."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def intervene(x_ptr, row_stride, hidden, add_ptr, ablate_ptr, targets_ptr, clamp_ptr, low_ptr, high_ptr,
                  ABLATE: tl.constexpr, CLAMP: tl.constexpr, ADD: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        inside = offs < hidden
        x = tl.load(x_ptr + row * row_stride + offs, mask=inside, other=0.0).to(tl.float32)
        for k in tl.static_range(ABLATE):  # x <- x - (x.u - t) u, in order
            u = tl.load(ablate_ptr + k * hidden + offs, mask=inside, other=0.0).to(tl.float32)
            x = x - (tl.sum(x * u, axis=0) - tl.load(targets_ptr + k).to(tl.float32)) * u
        for m in tl.static_range(CLAMP):  # x <- x + (clip(x.u) - x.u) u, in order
            u = tl.load(clamp_ptr + m * hidden + offs, mask=inside, other=0.0).to(tl.float32)
            p = tl.sum(x * u, axis=0)
            clipped = tl.minimum(tl.maximum(p, tl.load(low_ptr + m).to(tl.float32)),
                                 tl.load(high_ptr + m).to(tl.float32))
            x = x + (clipped - p) * u
        if ADD:
            x = x + tl.load(add_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        tl.store(x_ptr + row * row_stride + offs, x.to(x_ptr.dtype.element_ty), mask=inside)

    return intervene
