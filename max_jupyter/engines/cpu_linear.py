"""Linear layers for fp32 models on the CPU: oneDNN-packed fp32 weights, or int8 weights.

torch's CPU ``linear`` runs MKL's sgemm. On this project's 2-core AMD EPYC (AVX2) a product
of 2 to 8 rows there costs 2 to 3.5 times one row's, although both only stream the weights
once: so a verify pass of k + 1 tokens, or a batch of a few rows, cost nearly k + 1 steps
(bench/cpu_speculation_bound.py measured a 2-token verify of the 1.5B at 2.2 steps, 7
tokens at 3.6). The same product on a weight reordered once for oneDNN
(``torch.ops.mkldnn._reorder_linear_weight``, what torch.compile's CPU backend does)
cost about one row's time up to 8 rows, and 1.6 times less than MKL's at 64 rows
(1536 x 8960; docs/speculative.md). Results differ from MKL's by float32 rounding.

``Int8Linear`` (``dtype="int8"``, opt-in): a step streams the weights once, and these are a
quarter of fp32's bytes. fbgemm's dynamically quantized product (int8 weights per output
channel, the input quantized to int8 per call) ran the 0.5B's head (896 x 151936) 4 times
faster than the packed fp32 one, at about 1-2% relative error per product. Each input row
is scaled to its own peak before the call quantizes them, so one row's size no longer sets
the others' precision, though rows of one call (a batch, a prefill, a verify) still share
the range's ends: a row's result differs slightly from the same row stepped alone. The
input channels that run large are smoothed into the weights (SmoothQuant, calibrated on one
read of ``CALIBRATION``). The real pair in int8 ran 2.5 times faster than in fp32
(docs/real_pair.md).
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

import torch

SMOOTH_ALPHA = 0.5
"""How far ``smoothing`` moves the inputs' outliers into the weights (SmoothQuant's 0.5)."""
CALIBRATION = ("Explain how a hash map works, then write a short Python function.",
               "A hash map stores pairs of keys and values. It hashes each key to pick a "
               "bucket, so looking one up takes about the same time however many there are.\n\n"
               "```python\ndef count_words(text: str) -> dict[str, int]:\n    counts = {}\n"
               "    for word in text.lower().split():\n        counts[word] = counts.get(word, 0) + 1\n"
               "    return counts\n```\n\nIt was a quiet, grey morning; the café opened at 7, and "
               "«bonjour» was the first word I heard. 日本語もあります。 Thanks! 🙂")
"""A chat prompt and a reply (prose, code, numbers, other scripts) that an int8 model reads
once while it is quantized, to find which input channels run large (``quantize_linears``)."""


class PackedLinear(torch.nn.Module):
    """``linear``'s product on a oneDNN-packed copy of its weight (its bias kept dense)."""

    def __init__(self, linear: torch.nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.register_buffer("packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach()))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


class Int8Linear(torch.nn.Module):
    """``linear``'s product on int8 weights (symmetric, one scale per output channel) with
    the input quantized per call: fbgemm's ``quantized::linear_dynamic`` (its bias fp32)."""

    def __init__(self, linear: torch.nn.Linear, smooth: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        weight = linear.weight.detach().float()
        self.register_buffer("smooth", smooth)
        if smooth is not None:  # (x / s) @ (W * s).T == x @ W.T
            weight = weight * smooth
        scales = (weight.abs().amax(1) / 127).clamp_min(1e-12).double()
        zeros = torch.zeros(self.out_features, dtype=torch.long)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float().clone())
        # torch marks quantized tensors deprecated; fbgemm's product is what runs fast here
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            q = torch.quantize_per_channel(weight, scales, zeros, 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(q, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # fbgemm quantizes its whole input by one range, from its lowest to its highest value;
        # each row scaled to a peak of 1 first keeps one row from setting that range for all
        # (a prompt's first token, whose activations run hundreds of times the others', would
        # otherwise flatten every other row). Rows still share the range's ends (one row's
        # -1, another's +1), so a row's result differs slightly with its neighbours. Pinning
        # the range with an extra row made the 1.5B's steps 40% slower (fbgemm's one-row path).
        if self.smooth is not None:
            x = x / self.smooth
        peak = x.abs().amax(-1, keepdim=True).clamp_min(1e-12)
        # reduce_range: inputs on 7 bits, so AVX2's 8-bit multiply-adds cannot saturate (as torch's own module)
        y = torch.ops.quantized.linear_dynamic(x / peak, self._packed, True) * peak
        return y if self.bias is None else y + self.bias


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
    return _replace_linears(model, PackedLinear)


def smoothing(linear: torch.nn.Linear, inputs_peak: torch.Tensor, alpha: float = SMOOTH_ALPHA) -> torch.Tensor:
    """SmoothQuant's per-input-channel divisor for ``linear`` (Xiao et al. 2023): channels
    whose inputs run large are divided down and their weight columns multiplied up, which
    moves the outliers into the weights (quantized per output channel) and off the
    activations (quantized per row). ``inputs_peak``: ``[in]``, max |input| seen."""
    weight_peak = linear.weight.detach().abs().amax(0).float()
    s = inputs_peak.float().clamp_min(1e-5) ** alpha / weight_peak.clamp_min(1e-5) ** (1 - alpha)
    return s.clamp(1e-3, 1e3)


def quantize_linears(model: torch.nn.Module, calibration: list[int]) -> int:
    """Replace every ``nn.Linear`` in ``model`` with an ``Int8Linear``, in place, smoothed by
    the inputs each saw while ``model`` read the token ids ``calibration`` (``smoothing``);
    returns how many. Side effects as ``pack_linears`` (a tied head gets an int8 copy; the
    embedding stays fp32), and the model's outputs change by the int8 rounding (module
    docstring). No undo: load the model again. ``model`` is fp32 on the CPU, and every linear
    layer runs in the read of ``calibration`` (else ``KeyError``: it saw no input)."""
    peaks: dict[torch.nn.Module, torch.Tensor] = {}

    def note(linear, args):
        x = args[0].detach().abs().reshape(-1, linear.in_features).amax(0)
        peaks[linear] = torch.maximum(peaks[linear], x) if linear in peaks else x

    hooks = [m.register_forward_pre_hook(note) for m in model.modules() if type(m) is torch.nn.Linear]
    try:
        with torch.inference_mode():
            model(torch.tensor([calibration]))
    finally:
        for hook in hooks:
            hook.remove()
    return _replace_linears(model, lambda linear: Int8Linear(linear, smoothing(linear, peaks[linear])))


def _replace_linears(model: torch.nn.Module, kind: Callable[[torch.nn.Linear], torch.nn.Module]) -> int:
    """Every ``nn.Linear`` of ``model`` replaced by ``kind(linear)``; the other parameters
    copied off the weights file's memory map. Returns how many were replaced."""
    linears = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is torch.nn.Linear]
    for parent, name, child in linears:
        setattr(parent, name, kind(child))
    with torch.no_grad():  # the rest off the weights file's memory map, else it stays resident
        for param in model.parameters():
            param.data = param.data.clone()
    return len(linears)
