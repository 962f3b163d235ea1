"""The validators every public entry point uses: types and ranges, checked before any
compute, each raising ``BadArgumentError`` with one line naming the argument, the value
and the fix.

Each returns the value normalised (``numpy.int64(3)`` -> ``3``, a list -> a tuple, ...), so
callers keep what it returns. ``bool`` is never accepted as a number.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import torch

from max_jupyter.errors import BackendUnavailableError, BadArgumentError


class ModelShape(Protocol):
    """What the checks read of a model: ``engines.base.ModelIdentity`` has it (named here
    by shape, so this bottom layer imports nothing above it)."""

    num_layers: int
    hidden_size: int

    def describe(self) -> str: ...


MAX_COEF = 16.0
"""Largest steering coefficient accepted. A coefficient counts typical residual norms
(``SteeringVector.deltas``; 0.1 mild, 0.5 clear, 1 strong: docs/vectors.md), so this is
``engines.residual.MAX_DELTA_RATIO``, the bound on what steering adds at a layer."""
MAX_TEMPERATURE = 100.0
"""Largest temperature accepted: far above it sampling is uniform noise over the vocabulary."""
MAX_SEED = 2**63 - 1
CHAT_ROLES = ("system", "user", "assistant")
"""The chat roles every entry point accepts (Python, magics, the server): one rule, here."""
ROLE_ALIASES = {"developer": "system"}
"""Other names of those roles (OpenAI's ``developer`` is a system turn)."""
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
INT8 = "int8"
"""The weight dtype of a CPU model whose linear layers hold int8 weights (the rest fp32;
``engines/cpu_linear.py``, ``Int8Linear``)."""


def show(value: Any, limit: int | None = 60) -> str:
    """``repr(value)`` cut to ``limit`` characters (None: whole), for messages."""
    text = repr(value)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def fail(name: str, value: Any, problem: str, fix: str, limit: int | None = 60) -> BadArgumentError:
    """The error for argument ``name``: ``"name=value problem; fix."`` (``value`` cut to
    ``limit`` characters; paths pass None to be shown whole)."""
    return BadArgumentError(f"{name}={show(value, limit)} {problem}; {fix}.")


def _type_name(value: Any) -> str:
    return type(value).__name__


def check_type(name: str, value: Any, kind: type, fix: str) -> Any:
    """``value`` if it is a ``kind``, else ``BadArgumentError`` ("is a X, not a Kind")."""
    if not isinstance(value, kind):
        raise fail(name, value, f"is a {_type_name(value)}, not a {kind.__name__}", fix)
    return value


def check_int(name: str, value: Any, *, low: int | None = None, high: int | None = None,
              fix: str = "") -> int:
    """``value`` as an ``int`` (any integral type but ``bool``) in ``low..high`` inclusive."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise fail(name, value, f"is a {_type_name(value)}, not an int",
                   fix or "pass a whole number such as 3")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        span = (f">= {low}" if high is None else f"<= {high}" if low is None
                else f"in {low}..{high}")
        raise fail(name, value, "is out of range", fix or f"use an int {span}")
    return value


def check_real(name: str, value: Any, *, low: float | None = None, high: float | None = None,
               low_open: bool = False, fix: str = "") -> float:
    """``value`` as a finite ``float`` (any real type but ``bool``) within ``low..high``
    (``low`` excluded when ``low_open``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise fail(name, value, f"is a {_type_name(value)}, not a number",
                   fix or "pass a number such as 0.5")
    value = float(value)
    if not math.isfinite(value):
        raise fail(name, value, "is not finite", fix or "pass a finite number")
    too_low = low is not None and (value <= low if low_open else value < low)
    if too_low or (high is not None and value > high):
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"<= {high:g}"
        raise fail(name, value, "is out of range", fix or f"use a number {' and '.join(filter(None, (lo, hi)))}")
    return value


def check_coef(name: str, value: Any) -> float:
    """A steering coefficient: a finite real number with ``|value| <= MAX_COEF``."""
    return check_real(name, value, low=-MAX_COEF, high=MAX_COEF,
                      fix=f"use a finite number within ±{MAX_COEF:g} (it counts typical residual "
                          f"norms: 0.1 is mild, 0.5 clear, 1 strong)")


def check_text(name: str, value: Any) -> str:
    """A ``str`` that encodes as UTF-8 (no lone surrogates such as ``'\\ud800'``)."""
    if not isinstance(value, str):
        raise fail(name, value, f"is a {_type_name(value)}, not a str",
                   "pass text (decode bytes with .decode('utf-8') first)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise fail(name, value, f"holds a lone surrogate {value[e.start]!r} at index {e.start}",
                   "remove it, or repair the text with "
                   "text.encode('utf-16', 'surrogatepass').decode('utf-16')") from None
    return value


def check_vector_name(name: str, value: Any) -> str:
    """A vector's name (in a library, a mix, a store): text without leading or trailing
    spaces, 1..200 characters."""
    value = check_text(name, value)
    if not value.strip() or value != value.strip() or len(value) > 200:
        raise fail(name, value, "is empty, has leading/trailing spaces or is over 200 characters",
                   "use a short name such as 'happy'")
    return value


def check_str_list(name: str, value: Any, *, allow_empty_list: bool = True) -> tuple[str, ...]:
    """A list or tuple of non-empty ``str`` (a bare ``str`` is refused: it is not a list)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
        raise fail(name, value, f"is a {_type_name(value)}, not a list of strings",
                   f"wrap it in a list: {name}=[{show(value, 30)}]" if isinstance(value, str)
                   else "pass a list of strings")
    if not value and not allow_empty_list:
        raise fail(name, value, "is empty", "give at least one string")
    for i, item in enumerate(value):
        if not isinstance(item, str):
            raise fail(f"{name}[{i}]", item, f"is a {_type_name(item)}, not a string",
                       "every item must be a str")
        check_text(f"{name}[{i}]", item)
        if not item:
            raise fail(f"{name}[{i}]", item, "is an empty string", "remove it or give some text")
    return tuple(value)


def check_role(name: str, role: Any) -> str:
    """A chat role: one of ``CHAT_ROLES`` (or an alias in ``ROLE_ALIASES``), as its name there."""
    if isinstance(role, str) and role in ROLE_ALIASES:
        return ROLE_ALIASES[role]
    if not isinstance(role, str) or role not in CHAT_ROLES:
        raise fail(name, role, "is not a chat role",
                   f"use one of {'/'.join(CHAT_ROLES)} "
                   f"({', '.join(f'{a} means {r}' for a, r in ROLE_ALIASES.items())})")
    return role


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Chat messages: a non-empty list of mappings, each with a ``role`` (``check_role``)
    and ``content`` str (text that encodes as UTF-8); extra keys pass through."""
    fix = "each message is {'role': 'user' | 'assistant' | 'system', 'content': str}"
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence) or not messages:
        raise fail("messages", messages, "is not a non-empty list of chat messages", fix)
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise fail(f"messages[{i}]", m, f"is a {_type_name(m)}, not a dict", fix)
        for key in ("role", "content"):
            if key not in m:
                raise fail(f"messages[{i}]", dict(m), f"has no {key!r}", fix)
        if not isinstance(m["content"], str):
            raise fail(f"messages[{i}]['content']", m["content"], "is not a str", fix)
        check_text(f"messages[{i}]['content']", m["content"])
        out.append({**m, "role": check_role(f"messages[{i}]['role']", m["role"])})
    return out


def check_stop(value: Any) -> tuple[str, ...]:
    """Stop strings: a list or tuple of non-empty str (None means none)."""
    return () if value is None else check_str_list("stop", value)


def check_layers(identity: ModelShape, layers: Any, what: str) -> tuple[int, ...]:
    """``layers`` (an iterable of ints, not bools; not text) as a tuple, each in
    ``0..num_layers-1``. ``what`` names the argument in the message (e.g. ``"capture"``).
    """
    if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
        raise fail(what, layers, f"is a {_type_name(layers)}, not a list of layer indices",
                   "pass a list of ints such as [10, 15]")
    layers = list(layers)
    if all(type(i) is int for i in layers) and (not layers or (
            min(layers) >= 0 and max(layers) < identity.num_layers)):
        return tuple(layers)  # the common case, fast: this runs at every decode step
    out = []
    for layer in layers:
        if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
            raise fail(what, layers, f"holds {layer!r} ({_type_name(layer)}), not an int layer",
                       f"use ints 0..{identity.num_layers - 1} (output of decoder block i)")
        out.append(int(layer))
    bad = sorted(i for i in out if not 0 <= i < identity.num_layers)
    if bad:
        raise fail(what, out, f"has layer(s) {bad} out of range for {identity.describe()}",
                   f"use 0..{identity.num_layers - 1} (output of decoder block i)")
    return tuple(out)


def check_token_ids(name: str, ids: Any, vocab_size: int) -> list[int]:
    """A non-empty list or tuple of ints (not bools) in ``0..vocab_size-1``."""
    if isinstance(ids, (str, bytes, bytearray)) or not isinstance(ids, Sequence):
        raise fail(name, ids, f"is a {_type_name(ids)}, not a list of token ids",
                   "pass a list of ints (text goes through the tokenizer)")
    if not ids:
        raise fail(name, ids, "is empty", "give at least one token id")
    if not all(type(t) is int for t in ids):  # fast path for plain ints
        bad = next((t for t in ids if isinstance(t, bool) or not isinstance(t, numbers.Integral)), None)
        if bad is not None:
            raise fail(name, ids, f"holds {bad!r} ({_type_name(bad)}), not an int token id",
                       "pass plain ints (int(t) for a tensor element)")
        ids = [int(t) for t in ids]
    low, high = min(ids), max(ids)
    if low < 0 or high >= vocab_size:
        raise fail(name, ids, f"holds id {low if low < 0 else high} outside the vocabulary",
                   f"use ids 0..{vocab_size - 1}")
    return list(ids)


def check_deltas(identity: ModelShape, deltas: Any) -> dict[int, torch.Tensor]:
    """Per-layer deltas: a mapping of known int layers to tensors of shape exactly
    ``[hidden]`` (no scalars, no ``[n, hidden]``: never broadcast)."""
    if deltas is None:
        return {}
    if not isinstance(deltas, Mapping):
        raise fail("deltas", deltas, f"is a {_type_name(deltas)}, not a mapping layer -> tensor",
                   "pass {layer: tensor of shape [hidden]}")
    layers = check_layers(identity, deltas.keys(), "deltas")
    hidden = identity.hidden_size
    for layer, d in deltas.items():
        if not isinstance(d, torch.Tensor) or d.dim() != 1 or d.shape[0] != hidden:
            what = f"a tensor of shape {list(d.shape)}" if isinstance(d, torch.Tensor) else f"a {_type_name(d)}"
            raise BadArgumentError(f"deltas[{layer}] is {what}, not [{hidden}]; give one [{hidden}] "
                                   f"tensor per layer (deltas are never broadcast).")
    return dict(zip(layers, deltas.values()))


def check_hidden_rows(identity: ModelShape, hidden: Any) -> torch.Tensor:
    """Residual rows for ``Engine.unembed``: a floating-point tensor of shape exactly
    ``[n, hidden]`` with ``n >= 1`` and every value finite."""
    width = identity.hidden_size
    if not isinstance(hidden, torch.Tensor):
        raise fail("hidden", hidden, f"is a {_type_name(hidden)}, not a tensor",
                   f"pass a [n, {width}] tensor (e.g. a captured residual)")
    if hidden.dim() != 2 or hidden.shape[0] == 0 or hidden.shape[1] != width:
        raise BadArgumentError(f"hidden has shape {list(hidden.shape)}, not [n, {width}] with n >= 1; "
                               f"pass one row per position (a single row as hidden[None]).")
    if not hidden.is_floating_point():
        raise BadArgumentError(f"hidden has dtype {hidden.dtype}, not a floating-point dtype; "
                               f"pass residuals as float16/bfloat16/float32.")
    if not torch.isfinite(hidden).all():
        raise BadArgumentError(f"hidden holds {int((~torch.isfinite(hidden)).sum())} non-finite "
                               f"value(s) (inf/NaN); pass finite residuals.")
    return hidden


def check_max_seq_len(value: Any, limit: int | None = None) -> int | None:
    """``None`` -> ``limit``; else an int >= 1, capped at ``limit`` (the model's positions)
    where it is known."""
    if value is None:
        return limit
    value = check_int("max_seq_len", value, low=1,
                      fix="use an int >= 1, or None for every position the model has")
    return value if limit is None else min(value, limit)


def check_device(device: Any, name: str = "device") -> torch.device | None:
    """``None`` or a device torch knows and this machine has (``"cpu"``, ``"cuda"``, ``"cuda:1"``);
    ``name``: the argument, as the error names it."""
    if device is None:
        return None
    if not isinstance(device, (str, torch.device)):
        raise fail(name, device, f"is a {_type_name(device)}", 'pass "cpu", "cuda" or "cuda:N"')
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise fail(name, device, "is not a device torch knows", 'use "cpu", "cuda" or "cuda:N"') from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if (dev.index or 0) >= count:
            raise fail(name, device, f"is not present (this machine has {count} CUDA device(s))",
                       'use "cpu" or an existing "cuda:N"')
    elif dev.type not in ("cpu", "mps"):
        raise fail(name, device, "is not supported", 'use "cpu" or "cuda"')
    return dev


def default_device(device: torch.device | None) -> torch.device:
    """``device``, or where None the default one: CUDA where present, else the CPU."""
    return device or torch.device("cuda" if torch.cuda.is_available() else "cpu")


def check_int8_device(dtype: Any, device: torch.device | None) -> None:
    """``INT8`` weights run on the CPU only (``device``; None: CUDA where present), with
    torch's fbgemm int8 products: refused elsewhere, before anything is read."""
    if dtype != INT8:
        return
    device = default_device(device)
    if device.type != "cpu":
        raise fail("dtype", INT8, f"asks for int8 weights on {device}, which run on the CPU only",
                   "use float16 or bfloat16 on a GPU, or device='cpu'")
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        raise BackendUnavailableError("dtype='int8' needs torch's fbgemm int8 products, which this "
                                      "torch build lacks; load in float32 instead.")


def check_dtype(dtype: Any, name: str = "dtype") -> torch.dtype | str | None:
    """``None``, a float dtype (``torch.float32/float16/bfloat16`` or its name), or ``INT8``
    (``"int8"`` or ``torch.int8``: int8 linear layers, on the CPU)."""
    if dtype is None:
        return None
    if dtype == INT8 or dtype is torch.int8:
        return INT8
    if isinstance(dtype, str) and dtype in DTYPES:
        return DTYPES[dtype]
    if isinstance(dtype, torch.dtype) and dtype in DTYPES.values():
        return dtype
    raise fail(name, dtype, "is not a supported weight dtype",
               'use torch.float32, torch.float16, torch.bfloat16 (or their names) or "int8" (CPU)')
