"""Models built here, for tests and benchmarks without a model hub.

``write_gptq_rtn`` turns a model into a 4-bit GPTQ checkpoint (its dequantised weights
written back, so the model is the exact reference); ``write_random_exl3`` writes an EXL3
folder of random trellis codes for any Qwen2 shape (no conversion); ``build_tiny_model`` makes a tiny random
Llama with a tokenizer of its own; ``ScriptedEngine`` is the whole engine contract without a
neural network (logits and hidden states are cheap functions of the context), for fast tests
of the loop, speculative decoding, the Session and the server.
"""
from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Callable
from pathlib import Path

import torch

from max_jupyter.engines.base import Engine, ForwardResult, ModelIdentity
from max_jupyter.models import write_rope_theta
from max_jupyter.tokenizer import Tokenizer

GPTQ_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def write_gptq_rtn(model, folder: str | os.PathLike, group_size: int = 128) -> Path:
    """Quantise ``model``'s decoder linears to 4-bit GPTQ (symmetric round-to-nearest) and
    save a GPTQ checkpoint (``qweight``/``qzeros``/``scales``/``g_idx``, format ``gptq``) to
    ``folder``; embeddings, norms, biases and the head stay fp16.

    Side effect: each quantised weight of ``model`` is replaced by its dequantised 4-bit value,
    so ``model`` becomes the exact fp16 reference of the checkpoint (for parity tests and
    benchmarks on weights built in place; no calibration, no hub). Returns ``folder``.
    """
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {}
    quantised: set[str] = set()
    with torch.no_grad():
        for i, layer in enumerate(model.model.layers):
            for name in GPTQ_LINEARS:
                key = f"model.layers.{i}.{name}"
                linear = layer.get_submodule(name)
                q, scales, dequant = _rtn4(linear.weight.float(), group_size)  # [in, out] ...
                linear.weight.copy_(dequant.to(linear.weight.dtype))
                tensors[f"{key}.qweight"] = _pack4(q, dim=0).contiguous().cpu()  # [in/8, out]
                tensors[f"{key}.qzeros"] = _pack4(torch.full((scales.shape[0], q.shape[1]), 7,
                                                             dtype=torch.int64, device=q.device),
                                                  dim=1).contiguous().cpu()  # [groups, out/8]
                tensors[f"{key}.scales"] = scales.half().contiguous().cpu()  # [groups, out]
                tensors[f"{key}.g_idx"] = (torch.arange(q.shape[0], dtype=torch.int32)
                                           // group_size)  # [in]
                quantised.add(f"{key}.weight")
        for name, value in model.state_dict().items():
            if name not in quantised and not (name == "lm_head.weight" and model.config.tie_word_embeddings):
                tensors[name] = value.detach().half().contiguous().cpu()
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    model.config.save_pretrained(folder)
    write_rope_theta(folder)
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["torch_dtype"] = "float16"
    cfg["quantization_config"] = {"quant_method": "gptq", "bits": 4, "group_size": group_size,
                                  "desc_act": False, "sym": True, "checkpoint_format": "gptq"}
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return folder


EXL3_MUL1 = 0x83DCD12D - 2 ** 32
"""exllamav3's mul1 codebook marker (its multiplier, as the int32 its converter stores)."""


def write_random_exl3(folder: str | os.PathLike, shape: dict, tokenizer: str | os.PathLike | None = None,
                      vocab_size: int = 49152, seed: int = 0) -> Path:
    """An EXL3 folder of a Qwen2 model of ``shape`` (``hidden_size``, ``num_hidden_layers``,
    ``num_attention_heads``, ``num_key_value_heads``, ``intermediate_size``) with random
    weights: every linear is random trellis codes (any code is a valid EXL3 encoding: the
    kernels do a converted model's work; 4 bits, head 6) with random-sign scales, q/k/v
    biases, fp16 embeddings, unit norms; one shard per layer. ``tokenizer``: a folder whose
    tokenizer files are copied. For speed and memory measurements: no calibration, no
    converter (a 7B converts in far longer than it takes to write this)."""
    import json
    import shutil

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    # random codes drawn on the GPU where there is one (a 7B's 3.5 GB take minutes on a CPU)
    gen = torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)
    h, inter = shape["hidden_size"], shape["intermediate_size"]
    kv = shape["num_key_value_heads"] * (h // shape["num_attention_heads"])
    embedding = (torch.randn(vocab_size, h, generator=gen, device=gen.device) * 0.02).half().cpu()
    head = _random_exl3_linear(gen, "lm_head", h, vocab_size, 6, False)
    save_file({"model.embed_tokens.weight": embedding, "model.norm.weight": torch.ones(h, dtype=torch.float16),
               **head}, str(folder / "model-head.safetensors"))
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}"
        t = {f"{p}.{norm}.weight": torch.ones(h, dtype=torch.float16)
             for norm in ("input_layernorm", "post_attention_layernorm")}
        for name, n_in, n_out in (("self_attn.q_proj", h, h), ("self_attn.k_proj", h, kv),
                                  ("self_attn.v_proj", h, kv), ("self_attn.o_proj", h, h),
                                  ("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter),
                                  ("mlp.down_proj", inter, h)):
            t |= _random_exl3_linear(gen, f"{p}.{name}", n_in, n_out, 4, name[-6:] in ("q_proj", "k_proj", "v_proj"))
        save_file(t, str(folder / f"model-{i:03d}.safetensors"))
    config = dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2", vocab_size=vocab_size,
                  max_position_embeddings=32768, rms_norm_eps=1e-6, hidden_act="silu",
                  rope_theta=1e6, torch_dtype="float16", tie_word_embeddings=False, **shape,
                  quantization_config=dict(quant_method="exl3", version="1.6.5", bits=4.0,
                                           head_bits=6, codebook="mul1"))
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if tokenizer is not None and (Path(tokenizer) / name).is_file():
            shutil.copy(Path(tokenizer) / name, folder / name)
    return folder


def _random_exl3_linear(gen: torch.Generator, key: str, n_in: int, n_out: int, bits: int,
                        bias: bool) -> dict[str, torch.Tensor]:
    """One EXL3 linear's tensors: trellis ``[in/16, out/16, 16 * bits]`` int16 of random codes,
    input scales ``suh`` of random sign and size 1/sqrt(in), output scales ``svh`` of random
    sign and size 0.5 (each linear shrinks its input's RMS about 2x), the codebook marker."""
    device = gen.device

    def signs(n: int, size: float) -> torch.Tensor:
        return ((torch.randint(0, 2, (n,), generator=gen, device=device) * 2 - 1) * size).half().cpu()

    trellis = torch.randint(-2 ** 15, 2 ** 15, (n_in // 16, n_out // 16, 16 * bits), generator=gen,
                            device=device, dtype=torch.int32).to(torch.int16).cpu()
    t = {f"{key}.trellis": trellis, f"{key}.suh": signs(n_in, n_in ** -0.5),
         f"{key}.svh": signs(n_out, 0.5), f"{key}.mul1": torch.tensor(EXL3_MUL1, dtype=torch.int32)}
    if bias:
        t[f"{key}.bias"] = (torch.randn(n_out, generator=gen, device=device) * 0.05).half().cpu()
    return t


def _rtn4(weight, group_size: int):
    """Symmetric 4-bit round-to-nearest of ``weight`` ``[out, in]`` per (input group, output).

    Returns ``q`` ``[in, out]`` int64 in 0..15 (zero point 8), ``scales`` ``[in/group, out]``
    and the dequantised weight ``[out, in]``.
    """
    w = weight.t()  # [in, out]
    n_in, n_out = w.shape
    if n_in % group_size or n_out % 8:
        raise ValueError(f"GPTQ needs in-features divisible by {group_size} and out-features by 8; "
                         f"got {n_in}x{n_out}.")
    groups = w.reshape(n_in // group_size, group_size, n_out)  # [groups, group, out]
    scales = (groups.abs().amax(dim=1) / 7).clamp(min=1e-6).half().float()  # [groups, out]
    q = (groups / scales[:, None]).round().clamp(-8, 7) + 8  # [groups, group, out]
    dequant = ((q - 8) * scales[:, None]).reshape(n_in, n_out).t()  # [out, in]
    return q.reshape(n_in, n_out).long(), scales, dequant


def _pack4(values, dim: int):
    """Pack 4-bit ``values`` (int64, 0..15) eight to an int32 along ``dim`` (low nibble first)."""
    v = values.movedim(dim, 0)
    v = v.reshape(v.shape[0] // 8, 8, *v.shape[1:])  # [n/8, 8, ...]
    shifts = (torch.arange(8, device=v.device) * 4).reshape(1, 8, *([1] * (v.dim() - 2)))
    packed = (v << shifts).sum(dim=1)  # [n/8, ...] int64 in 0..2^32-1
    packed = packed - (packed >= 2**31).long() * 2**32  # two's complement, int32 range
    return packed.to(torch.int32).movedim(0, dim)


TINY_TEXT = [
    "The weather today is sunny with a light breeze from the west.",
    "Once upon a time there was a small cat who loved to read stories.",
    "Steering a language model means adding a direction to its residual stream.",
    "The quick brown fox jumps over the lazy dog, and then it rests in the shade.",
    "Numbers like 12, 345 and 6789 appear in text; so do symbols: (a + b) * c.",
    "A question? An answer! Some lines end here.\nOthers continue on the next line.",
]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
          "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
"""A ChatML chat template (SmolLM2's and Qwen's turn markers)."""


def build_tiny_tokenizer(vocab_size: int = 320, chat: bool = False):
    """A byte-level BPE of about ``vocab_size`` tokens trained on ``TINY_TEXT`` in-process (a
    few milliseconds), as a HF ``PreTrainedTokenizerFast``: EOS ``<|endoftext|>``; with
    ``chat``, also ``<|im_start|>`` / ``<|im_end|>`` and the ``CHATML`` template. Any text
    encodes (bytes are in the alphabet)."""
    from tokenizers import Tokenizer as BPETokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|endoftext|>", *(["<|im_start|>", "<|im_end|>"] if chat else [])]
    bpe = BPETokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(TINY_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|endoftext|>",
                                   chat_template=CHATML if chat else None)


def build_tiny_model(folder: str | os.PathLike, seed: int = 0) -> Path:
    """Train a ~300-token byte-level BPE on ``TINY_TEXT`` and save it with a randomly
    initialised 2-layer Llama (hidden 64) as a HF folder; return ``folder``.

    A small model whose tokenizer differs from the embedded one, built here with no
    download (for the text-level mirror, its tests and benchmarks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tiny_tokenizer(320)
    folder = Path(folder)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=4096, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


@functools.lru_cache(maxsize=None)
def scripted_tokenizer(vocab_size: int = 320) -> Tokenizer:
    """The tokenizer of ``ScriptedEngine``s of this vocabulary size (one object per size, so
    engines of one size share it): ``build_tiny_tokenizer(vocab_size, chat=True)``."""
    return Tokenizer(build_tiny_tokenizer(vocab_size, chat=True))


class ScriptedEngine(Engine):
    """The engine contract without a network: deterministic, exact and cheap (microseconds a
    token), for tests of everything above the engines.

    The KV cache is the list of fed ids with, per position, a hash ``c_p`` of the ids up to
    it and the sum of the deltas fed up to it. A position's residual at layer ``i`` is
    ``h0(p) * (1 + i / num_layers)``, plus the deltas at layers ``0..i`` fed with it, plus
    a tenth of the mean of what earlier positions got at layers below ``i`` (an "attention"): a
    cache that lost, repeated or mis-steered a position changes later outputs, as in a real
    model; ``h0(p)`` sums a token embedding and a row chosen by ``c_p``. The logits are
    ``head @ h_last`` plus a fixed bias: a delta ``d`` fed with a position moves its logits
    by exactly ``head @ d`` (``direction(token)`` gives a delta that favours ``token``). The
    bias holds EOS ids 20 logits down and tokens that do not decode to printable ASCII 10
    (so greedy text is readable); with ``eos_at``, the position that makes the context
    ``eos_at`` long predicts the first EOS id (20 logits up). All weights come from ``seed``.

    ``agreement`` (a drafter): in about ``1 - agreement`` of contexts (chosen by ``c_p``) a
    second token gets the top logit, so an engine with ``agreement < 1`` and the same seed
    drafts for one with ``agreement == 1``, agreeing on that fraction of greedy tokens.
    ``before_forward(ids)``, if set, is called before each pass (checked arguments, cache
    untouched): a test can raise there (an interrupt) or sleep (a slow model).
    ``cached_ids`` is what the cache holds. ``launches_async`` claims the asynchronous
    launch of ``Engine.launches_async`` (each pass still runs at once), so callers take the
    schedule they take on such engines (the overlap, feeding the drafter during a verify).
    """

    supports_verify = True

    def __init__(self, *, seed: int = 0, vocab_size: int = 320, num_layers: int = 4,
                 hidden_size: int = 16, max_seq_len: int = 4096, agreement: float = 1.0,
                 eos_at: int | None = None, launches_async: bool = False):
        self.tokenizer = scripted_tokenizer(vocab_size)
        vocab = self.tokenizer.vocab_size
        self.device, self.dtype, self.max_seq_len = torch.device("cpu"), torch.float32, max_seq_len
        self.agreement, self.eos_at, self.launches_async = agreement, eos_at, launches_async
        g = torch.Generator().manual_seed(seed)
        self.embed = torch.randn(vocab, hidden_size, generator=g)  # [vocab, hidden]
        self.context_rows = torch.randn(4096, hidden_size, generator=g)  # [4096, hidden]
        head = torch.randn(vocab, hidden_size, generator=g)
        self.head = head / head.norm(dim=1, keepdim=True)  # [vocab, hidden], unit rows
        self._eos = sorted(self.tokenizer.eos_ids)
        self._bias = torch.tensor([0.0 if _readable(self.tokenizer.decode([i])) else -10.0
                                   for i in range(vocab)])  # [vocab]: readable text wins
        self._bias[self._eos] = -20.0
        fingerprint = hashlib.sha256(repr((seed, vocab, num_layers, hidden_size, agreement,
                                           eos_at)).encode()).hexdigest()
        self.identity = ModelIdentity("ScriptedEngine", num_layers, hidden_size, vocab, fingerprint)
        self.before_forward: Callable[[list[int]], None] | None = None
        self._ids: list[int] = []
        self._hashes: list[int] = []  # per position: the hash of the ids up to it
        self._sums: list[torch.Tensor] = []  # per position: [layers, hidden] deltas added up to it

    @property
    def cached_ids(self) -> list[int]:
        return list(self._ids)

    @property
    def seq_len(self) -> int:
        return len(self._ids)

    def reset(self) -> None:
        self._ids, self._hashes, self._sums = [], [], []

    def _rewind(self, n: int) -> None:
        keep = len(self._ids) - n
        del self._ids[keep:], self._hashes[keep:], self._sums[keep:]

    def direction(self, token: int, norm: float = 1.0) -> torch.Tensor:
        """A ``[hidden]`` delta of length ``norm`` along ``token``'s head row: fed with a
        position, it raises ``token``'s logit by ``norm`` and every other's by less (the
        rows have unit length); large enough, it makes ``token`` the greedy choice."""
        return self.head[token] * norm

    def _forward(self, ids: list[int], deltas: dict[int, torch.Tensor],
                 capture: frozenset[int]) -> ForwardResult:
        logits, hidden = self._pass(ids, deltas, capture)
        return ForwardResult(logits=logits[-1], hidden=hidden)

    def _verify(self, ids: list[int], deltas: dict[int, torch.Tensor],
                capture: frozenset[int]) -> ForwardResult:
        logits, hidden = self._pass(ids, deltas, capture)
        return ForwardResult(logits=logits[-1], hidden=hidden, all_logits=logits)

    def _unembed(self, hidden: torch.Tensor) -> torch.Tensor:
        """``head @ h`` plus the fixed bias: a forward's logits without the context's script
        (``eos_at``, a drafter's disagreements), which a residual alone does not carry."""
        return (hidden[:, None, :] * self.head).sum(-1) + self._bias  # as _pass sums, to the bit

    def _pass(self, ids: list[int], deltas: dict[int, torch.Tensor], capture: frozenset[int]
              ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Append ``ids`` (fed with ``deltas``); ``[n, vocab]`` logits and the captured rows."""
        if self.before_forward is not None:
            self.before_forward(ids)
        n_layers, width = self.identity.num_layers, self.identity.hidden_size
        hashes, c = [], self._hashes[-1] if self._hashes else 0
        for token in ids:
            c = _mix(c, token)
            hashes.append(c)
        h0 = self.embed[ids] + self.context_rows[[c % 4096 for c in hashes]]  # [n, hidden]
        added = torch.zeros(n_layers, width)  # [layers, hidden]: what the deltas add at each output
        for layer, delta in deltas.items():
            added[layer:] += delta  # a delta at layer i reaches every later block's output
        sums, total = [], self._sums[-1] if self._sums else torch.zeros(n_layers, width)
        carry = torch.zeros(len(ids), n_layers, width)
        for row in range(len(ids)):  # one position at a time: the same rounding as single steps
            earlier = len(self._ids) + row
            if earlier:  # attention: the mean of what earlier positions got below each layer
                carry[row, 1:] = 0.1 * total[:-1] / earlier
            total = total + added
            sums.append(total)
        scale = 1 + torch.arange(n_layers, dtype=torch.float32) / n_layers  # [layers]
        states = h0[:, None, :] * scale[None, :, None] + added + carry  # [n, layers, hidden]
        last = states[:, -1]  # [n, hidden]
        logits = (last[:, None, :] * self.head).sum(-1)  # [n, vocab]; per row, so exact in any batch
        self._script(logits, hashes, len(self._ids))
        self._ids.extend(ids)
        self._hashes.extend(hashes)
        self._sums.extend(sums)
        return logits, {i: states[:, i].clone() for i in capture}

    def _script(self, logits: torch.Tensor, hashes: list[int], before: int) -> None:
        """The bias (EOS and unreadable tokens held down), EOS at ``eos_at`` and the
        drafter's disagreements, in place."""
        logits += self._bias
        for row, c in enumerate(hashes):
            if before + row + 1 == self.eos_at:
                logits[row, self._eos[0]] += 40.0
            elif (c >> 20) % 1000 >= self.agreement * 1000:
                second = int(logits[row].topk(2).indices[1])
                logits[row, second] = logits[row].max() + 1.0


def _readable(text: str) -> bool:
    return text.isascii() and text.isprintable()


def _mix(c: int, x: int) -> int:
    """One step of a 64-bit FNV-1a-style hash."""
    return ((c ^ (x + 1)) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF

