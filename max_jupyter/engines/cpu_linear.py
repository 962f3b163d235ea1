"""Linear layers on oneDNN-packed weights, for fp32 models on the CPU.

torch's CPU ``linear`` runs MKL's sgemm. On this project's 2-core AMD EPYC (AVX2) a product
of 2 to 8 rows there costs 2 to 3.5 times one row's, although both only stream the weights
once: so a verify pass of k + 1 tokens, or a batch of a few rows, cost nearly k + 1 steps
(bench/cpu_speculation_bound.py measured a 2-token verify of the 1.5B at 2.2 steps, 7
tokens at 3.6). The same product on a weight reordered once for oneDNN
(``torch.ops.mkldnn._reorder_linear_weight``, what torch.compile's CPU backend does)
cost about one row's time up to 8 rows, and 1.6 times less than MKL's at 64 rows
(1536 x 8960; docs/speculative.md). Results differ from MKL's by float32 rounding.
"""
from __future__ import annotations

import torch


class PackedLinear(torch.nn.Module):
    """``linear``'s product on a oneDNN-packed copy of its weight (its bias kept dense)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def can_pack(model: torch.nn.Module) -> bool:
    """Whether ``model`` is fp32 on the CPU and this torch has oneDNN's packed linear."""
    weight = next(model.parameters())
    return (weight.device.type == "cpu" and weight.dtype == torch.float32
            and torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def pack_linears(model: torch.nn.Module) -> int:
    """Replace every ``nn.Linear`` in ``model`` with a ``PackedLinear``, in place; returns
    how many. Side effects: those weights are no longer parameters (an fp32 CPU model for
    inference only; a head tied to the embedding gets its own packed copy), and the other
    parameters are copied into memory of their own, releasing a memory-mapped weights
    file (whose pages would otherwise stay resident beside the packed copies). No undo:
    load the model again for dense weights. Call only where ``can_pack(model)``."""
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    for parent, name, child in linears:
        setattr(parent, name, PackedLinear(child))
    with torch.no_grad():  # the rest off the weights file's memory map, else it stays resident
        for param in model.parameters():
            param.data = param.data.clone()
    return len(linears)
