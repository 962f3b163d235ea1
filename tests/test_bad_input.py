"""Every bad input of issue 8 (and more) refused before compute, with one typed line.

Each case of the table runs one wrong call on the real embedded model and asserts: the
error type, a fragment of its message (the argument, the value or the fix), one line, no
forward pass ran (``engine.forward_calls``), the live mix is unchanged, and the next
steered generation equals one made on a freshly loaded engine.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from max_jupyter import models
from max_jupyter.engines import TransformersEngine
from max_jupyter.errors import (BadArgumentError, ContextOverflowError, CorruptFileError,
                                MaxJupyterError, ModelMismatchError)
from max_jupyter.orchestrator import SamplingConfig, generate
from max_jupyter.orchestrator.sampling import check_generation_args
from max_jupyter.steering import Mix, SteeringVector, train_vector
from max_jupyter.orchestrator.options import GenerationOptions

PROMPT = "Name three colours."
CHECK_TOKENS = 3


@dataclass
class Ctx:
    engine: TransformersEngine
    vector: SteeringVector
    mix: Mix
    tmp: Path

    @property
    def ident(self):
        return self.engine.identity

    def saved(self) -> Path:
        """A freshly saved copy of the vector."""
        path = self.tmp / "v.safetensors"
        self.vector.save(path)
        return path


def steered_mix(vector: SteeringVector) -> Mix:
    mix = Mix(vector.model)
    mix.set("happy", vector, 4.0)
    return mix


def check_generation(engine: TransformersEngine, mix: Mix) -> list[int]:
    return generate(engine, PROMPT, max_new_tokens=CHECK_TOKENS, ignore_eos=True,
                    steering=mix).token_ids


@pytest.fixture(scope="module")
def reference(vector) -> list[int]:
    """The check generation on a freshly loaded engine with a fresh mix."""
    fresh = TransformersEngine.load(device="cpu")
    return check_generation(fresh, steered_mix(vector))


@pytest.fixture(scope="module")
def mix(vector) -> Mix:
    return steered_mix(vector)


@pytest.fixture
def ctx(engine, vector, mix, tmp_path, monkeypatch) -> Ctx:
    monkeypatch.setenv("MAX_JUPYTER_CACHE", str(tmp_path / "cache"))  # no conversion leaks out
    return Ctx(engine, vector, mix, tmp_path)


def altered_payload(c: Ctx) -> Path:
    path = c.saved()
    data = bytearray(path.read_bytes())
    data[-4:] = struct.pack("<f", 1234.5)  # the last float of the last direction
    path.write_bytes(bytes(data))
    return path


def with_metadata(c: Ctx, tensors: dict, **meta: str) -> Path:
    path = c.tmp / "odd.safetensors"
    save_file(tensors, str(path), metadata=meta or None)
    return path


def identity_json(c: Ctx, **changes) -> str:
    return json.dumps({**dataclasses.asdict(c.ident), **changes})


def truncated_gguf(c: Ctx) -> Path:
    path = c.tmp / "truncated.gguf"
    with models.embedded_gguf_path().open("rb") as src, path.open("wb") as dst:
        dst.write(src.read(40_000_000))
    return path


def unwritable_place(c: Ctx) -> Path:
    """A folder this process cannot create files in (root ignores permission bits: /sys)."""
    if os.geteuid() == 0:
        return Path("/sys")
    folder = c.tmp / "read-only"
    folder.mkdir()
    folder.chmod(0o500)
    return folder


@dataclass(frozen=True)
class Case:
    id: str
    call: Callable[[Ctx], object]
    error: type[Exception]
    fragment: str


def zeros(*shape):
    return torch.zeros(*shape)


E, V = lambda c: c.engine, lambda c: c.vector  # noqa: E731
CASES = [
    # --- the engine contract (Engine.forward / prefill / step) ---
    Case("forward-scalar-delta", lambda c: E(c).forward([1], {3: torch.tensor(2.0)}),
         BadArgumentError, r"deltas\[3\] is a tensor of shape \[\], not \[576\]"),
    Case("forward-rows-delta", lambda c: E(c).forward([1], {3: zeros(2, 576)}),
         BadArgumentError, r"shape \[2, 576\].*never broadcast"),
    Case("forward-delta-layer-float", lambda c: E(c).forward([1], {10.5: zeros(576)}),
         BadArgumentError, r"holds 10.5 \(float\), not an int layer"),
    Case("forward-delta-layer-bool", lambda c: E(c).forward([1], {True: zeros(576)}),
         BadArgumentError, r"holds True \(bool\)"),
    Case("forward-delta-layer-30", lambda c: E(c).forward([1], {30: zeros(576)}),
         BadArgumentError, r"\[30\] out of range.*use 0\.\.29"),
    Case("forward-capture-str", lambda c: E(c).forward([1], capture=["3"]),
         BadArgumentError, r"capture=\['3'\] holds '3' \(str\)"),
    Case("forward-capture-out-of-range", lambda c: E(c).forward([1], capture=[-1]),
         BadArgumentError, r"capture=\[-1\] has layer"),
    Case("forward-empty-ids", lambda c: E(c).forward([]), BadArgumentError, r"ids=\[\] is empty"),
    Case("prefill-empty-ids", lambda c: E(c).prefill([]), BadArgumentError, r"ids=\[\] is empty"),
    Case("forward-id-negative", lambda c: E(c).forward([-5]),
         BadArgumentError, r"id -5 outside the vocabulary; use ids 0\.\.49151"),
    Case("forward-id-vocab", lambda c: E(c).forward([49152]),
         BadArgumentError, r"id 49152 outside the vocabulary"),
    Case("step-bool-id", lambda c: E(c).step(True), BadArgumentError, r"holds True \(bool\)"),
    Case("step-float-id", lambda c: E(c).step(3.0), BadArgumentError, r"holds 3.0 \(float\)"),
    Case("forward-bytes", lambda c: E(c).forward(b"hi"), BadArgumentError, r"is a bytes"),
    Case("forward-overflow", lambda c: E(c).prefill([1] * 8193),
         ContextOverflowError, "exceed the context of 8192"),
    # --- loading ---
    Case("load-max-seq-len-0", lambda c: TransformersEngine.load(max_seq_len=0),
         BadArgumentError, r"max_seq_len=0 is out of range; use an int >= 1"),
    Case("load-max-seq-len-negative", lambda c: TransformersEngine.load(max_seq_len=-5),
         BadArgumentError, r"max_seq_len=-5"),
    Case("load-max-seq-len-float", lambda c: TransformersEngine.load(max_seq_len=100.5),
         BadArgumentError, r"max_seq_len=100.5 is a float"),
    Case("load-device-bogus", lambda c: TransformersEngine.load(device="bogus"),
         BadArgumentError, r"device='bogus' is not a device torch knows"),
    Case("load-device-absent", lambda c: TransformersEngine.load(device="cuda:7"),
         BadArgumentError, r"device='cuda:7' is not present"),
    Case("load-dtype-int8", lambda c: TransformersEngine.load(dtype=torch.int8),
         BadArgumentError, r"dtype=torch.int8 is not a supported"),
    Case("load-truncated-gguf", lambda c: TransformersEngine.load(truncated_gguf(c), device="cpu"),
         CorruptFileError, r"truncated\.gguf is damaged or truncated"),
    Case("load-not-gguf", lambda c: TransformersEngine.load(
        (c.tmp / "fake.gguf").write_bytes(b"hello world") and c.tmp / "fake.gguf"),
         CorruptFileError, r"fake\.gguf is not a GGUF file"),
    # --- vectors ---
    Case("vector-shape-2x288", lambda c: SteeringVector({10: zeros(2, 288)}, c.ident),
         BadArgumentError, r"shape \[2, 288\].*never flattened"),
    Case("vector-layer-float", lambda c: SteeringVector({10.5: zeros(576)}, c.ident),
         BadArgumentError, r"directions=\[10.5\] holds 10.5 \(float\)"),
    Case("vector-layer-bool", lambda c: SteeringVector({True: zeros(576)}, c.ident),
         BadArgumentError, r"holds True \(bool\)"),
    Case("vector-layer-str", lambda c: SteeringVector({"3": zeros(576)}, c.ident),
         BadArgumentError, r"holds '3' \(str\)"),
    Case("vector-nan", lambda c: SteeringVector({3: torch.full((576,), float("nan"))}, c.ident),
         BadArgumentError, "holds NaN or inf"),
    Case("vector-times-1e30", lambda c: 1e30 * V(c), BadArgumentError,
         r"coefficient=1e\+30 is out of range.*swamps the residual stream"),
    Case("vector-divided-by-zero", lambda c: V(c) / 0, BadArgumentError, r"divisor=0 is zero"),
    Case("vector-select-str", lambda c: V(c).select("10"), BadArgumentError, r"layers='10' is a str"),
    Case("vector-save-missing-folder", lambda c: V(c).save(c.tmp / "nope" / "v.safetensors"),
         BadArgumentError, r"nope/v\.safetensors' is in a folder that does not exist"),
    Case("vector-save-unwritable", lambda c: V(c).save(unwritable_place(c) / "v.safetensors"),
         BadArgumentError, r"v\.safetensors' cannot be written \(.*\); choose a folder you can write to"),
    Case("vector-load-altered-payload", lambda c: SteeringVector.load(altered_payload(c)),
         CorruptFileError, r"v\.safetensors: the directions do not match the checksum"),
    Case("vector-load-unexpected-key", lambda c: SteeringVector.load(with_metadata(
        c, {"foo": zeros(576)}, model=identity_json(c), sha256="0" * 64)),
         CorruptFileError, r"odd\.safetensors is not a valid.*unexpected tensor 'foo'"),
    Case("vector-load-bad-layer-key", lambda c: SteeringVector.load(with_metadata(
        c, {"direction.x": zeros(576)}, model=identity_json(c), sha256="0" * 64)),
         CorruptFileError, r"unexpected tensor 'direction\.x'"),
    Case("vector-load-metadata-not-json", lambda c: SteeringVector.load(with_metadata(
        c, {"direction.3": zeros(576)}, model="{not json", sha256="0" * 64)),
         CorruptFileError, r"odd\.safetensors is not a valid.*JSONDecodeError"),
    Case("vector-load-identity-fields", lambda c: SteeringVector.load(with_metadata(
        c, {"direction.3": zeros(576)}, model=identity_json(c, num_layers="30"), sha256="0" * 64)),
         CorruptFileError, r"field num_layers is '30'"),
    Case("vector-load-no-metadata", lambda c: SteeringVector.load(with_metadata(
        c, {"direction.3": zeros(576)})),
         CorruptFileError, r"not a max_jupyter steering vector \(no model or sha256"),
    Case("vector-load-garbage", lambda c: SteeringVector.load(
        (c.tmp / "g.safetensors").write_bytes(b"\x05" * 64) and c.tmp / "g.safetensors"),
         CorruptFileError, r"g\.safetensors is not a safetensors file"),
    Case("vector-load-missing", lambda c: SteeringVector.load(c.tmp / "absent.safetensors"),
         BadArgumentError, r"absent\.safetensors' is not a file"),
    # --- the mix ---
    Case("mix-set-coef-1e30", lambda c: c.mix.set_coef("happy", 1e30),
         BadArgumentError, r"coef for 'happy'=1e\+30 is out of range"),
    Case("mix-set-coef-nan", lambda c: c.mix.set_coef("happy", float("nan")),
         BadArgumentError, r"coef for 'happy'=nan is not finite"),
    Case("mix-set-coef-str", lambda c: c.mix.set_coef("happy", "2"),
         BadArgumentError, r"coef for 'happy'='2' is a str, not a number"),
    Case("mix-set-coef-bool", lambda c: c.mix.set_coef("happy", True),
         BadArgumentError, r"is a bool, not a number"),
    Case("mix-set-inf", lambda c: c.mix.set("happy", V(c), float("inf")),
         BadArgumentError, r"coef for 'happy'=inf is not finite"),
    Case("mix-set-layers-str", lambda c: c.mix.set("happy", V(c), 1.0, layers=["10"]),
         BadArgumentError, r"layers=\['10'\] holds '10' \(str\)"),
    Case("mix-set-layers-missing", lambda c: c.mix.set("happy", V(c), 1.0, layers=[11]),
         BadArgumentError, r"names layer\(s\) \[11\] that vector 'happy' has no direction at"),
    Case("mix-set-not-a-vector", lambda c: c.mix.set("happy", {10: zeros(576)}),
         BadArgumentError, r"vector=.* is a dict, not a SteeringVector"),
    Case("mix-set-other-model", lambda c: c.mix.set("happy", SteeringVector(
        {3: zeros(576)}, dataclasses.replace(c.ident, fingerprint="0" * 64))),
         ModelMismatchError, "was made for"),
    # --- sampling ---
    Case("sampling-seed-float", lambda c: SamplingConfig(seed=1.5),
         BadArgumentError, r"seed=1.5 is a float, not an int"),
    Case("sampling-seed-2**64", lambda c: SamplingConfig(seed=2**64),
         BadArgumentError, r"seed=18446744073709551616 is out of range"),
    Case("sampling-seed-bool", lambda c: SamplingConfig(seed=True), BadArgumentError, r"seed=True is a bool"),
    Case("sampling-top-k-float", lambda c: SamplingConfig(top_k=2.5),
         BadArgumentError, r"top_k=2.5 is a float"),
    Case("sampling-temperature-inf", lambda c: SamplingConfig(temperature=float("inf")),
         BadArgumentError, r"temperature=inf is not finite"),
    Case("sampling-temperature-1e30", lambda c: SamplingConfig(temperature=1e30),
         BadArgumentError, r"temperature=1e\+30 is out of range.*uniform noise"),
    Case("sampling-top-p-0", lambda c: SamplingConfig(top_p=0), BadArgumentError, r"top_p=0.0 is out"),
    Case("sampling-top-p-str", lambda c: SamplingConfig(top_p="0.9"),
         BadArgumentError, r"top_p='0.9' is a str"),
    # --- generation options, checked by GenerationOptions itself ---
    Case("options-max-new-tokens-2.5", lambda c: GenerationOptions(max_new_tokens=2.5),
         BadArgumentError, r"max_new_tokens=2.5 is a float"),
    Case("options-sampling-dict", lambda c: GenerationOptions(sampling={"temperature": 1.0}),
         BadArgumentError, r"sampling=.* is a dict.*SamplingConfig\(\*\*d\)"),
    Case("options-stop-str", lambda c: GenerationOptions(stop="\n"),
         BadArgumentError, r"stop='\\n' is a str, not a list.*stop=\['\\n'\]"),
    Case("options-chat-int", lambda c: GenerationOptions(chat=1), BadArgumentError, r"chat=1 is a int"),
    Case("options-speculate-99", lambda c: GenerationOptions(speculate=99),
         BadArgumentError, r"speculate=99 is out of range"),
    Case("options-steering-coef-nan", lambda c: GenerationOptions(steering={"happy": float("nan")}),
         BadArgumentError, r"steering\['happy'\]=nan is not finite"),
    Case("options-judges-int", lambda c: GenerationOptions(judges=[3]),
         BadArgumentError, r"judges\[0\]=3 is a int"),
    Case("options-unknown-name", lambda c: GenerationOptions().replace(temprature=0.5),
         BadArgumentError, r"unknown generation option 'temprature'; did you mean 'temperature'\?"),
    # --- generation options, through the public generate ---
    Case("generate-max-new-tokens-2.5", lambda c: generate(E(c), PROMPT, max_new_tokens=2.5),
         BadArgumentError, r"max_new_tokens=2.5 is a float"),
    Case("generate-max-new-tokens-bool", lambda c: generate(E(c), PROMPT, max_new_tokens=True),
         BadArgumentError, r"max_new_tokens=True is a bool"),
    Case("generate-max-new-tokens-0", lambda c: generate(E(c), PROMPT, max_new_tokens=0),
         BadArgumentError, r"max_new_tokens=0 is out of range"),
    Case("generate-sampling-none", lambda c: generate(E(c), PROMPT, sampling=None),
         BadArgumentError, r"sampling=None is a NoneType, not a SamplingConfig"),
    Case("generate-sampling-dict", lambda c: generate(E(c), PROMPT, sampling={"temperature": 1.0}),
         BadArgumentError, r"is a dict, not a SamplingConfig"),
    Case("generate-stop-str", lambda c: generate(E(c), PROMPT, stop="."),
         BadArgumentError, r"stop='\.' is a str, not a list of strings; wrap it in a list"),
    Case("generate-stop-none-item", lambda c: generate(E(c), PROMPT, stop=[None]),
         BadArgumentError, r"stop\[0\]=None is a NoneType, not a string"),
    Case("generate-stop-empty-item", lambda c: generate(E(c), PROMPT, stop=[""]),
         BadArgumentError, r"stop\[0\]='' is an empty string"),
    Case("generate-prompt-bytes", lambda c: generate(E(c), b"Hello"),
         BadArgumentError, r"prompt=b'Hello' is a bytes.*decode"),
    Case("generate-prompt-id-negative", lambda c: generate(E(c), [-5]),
         BadArgumentError, r"prompt=\[-5\] holds id -5 outside the vocabulary"),
    Case("generate-prompt-id-vocab", lambda c: generate(E(c), [1, 49152]),
         BadArgumentError, r"holds id 49152 outside the vocabulary"),
    Case("generate-prompt-empty-str", lambda c: generate(E(c), ""), BadArgumentError, r"prompt='' is empty"),
    Case("generate-prompt-empty-list", lambda c: generate(E(c), []), BadArgumentError, r"prompt=\[\] is empty"),
    Case("generate-message-without-content", lambda c: generate(E(c), [{"role": "user"}]),
         BadArgumentError, r"messages\[0\]=\{'role': 'user'\} has no 'content'"),
    Case("generate-message-content-none", lambda c: generate(
        E(c), [{"role": "user", "content": None}]),
         BadArgumentError, r"messages\[0\]\['content'\]=None is not a str"),
    Case("generate-message-not-dict", lambda c: generate(E(c), [{"role": "user", "content": "a"}, "b"]),
         BadArgumentError, r"messages\[1\]='b' is a str, not a dict"),
    Case("generate-lone-surrogate", lambda c: generate(E(c), "Hi \ud800 there"),
         BadArgumentError, r"lone surrogate '\\ud800' at index 3"),
    Case("generate-context-overflow", lambda c: generate(E(c), [1] * 8190, max_new_tokens=10),
         ContextOverflowError, "exceed the context of 8192"),
    Case("generate-steering-other-model", lambda c: generate(E(c), PROMPT, steering=SteeringVector(
        {3: zeros(576)}, dataclasses.replace(c.ident, fingerprint="0" * 64))),
         ModelMismatchError, "this mix is for .* the engine runs"),
    # --- training ---
    Case("train-positive-str", lambda c: train_vector(E(c), "I am happy", "I am sad"),
         BadArgumentError, r"positive='I am happy' is a str, not a list.*\['I am happy'\]"),
    Case("train-negative-str-item", lambda c: train_vector(E(c), ["a", "b"], ["c", 4]),
         BadArgumentError, r"negative\[1\]=4 is a int, not a string"),
    Case("train-empty-text", lambda c: train_vector(E(c), ["a"], [""]),
         BadArgumentError, r"negative\[0\]='' is an empty string"),
    Case("train-layers-empty", lambda c: train_vector(E(c), ["a"], ["b"], layers=[]),
         BadArgumentError, r"layers=\[\] is empty"),
    Case("train-layers-str", lambda c: train_vector(E(c), ["a"], ["b"], layers=["3"]),
         BadArgumentError, r"layers=\['3'\] holds '3' \(str\)"),
    Case("train-layers-float", lambda c: train_vector(E(c), ["a"], ["b"], layers=[10.5]),
         BadArgumentError, r"holds 10.5 \(float\)"),
    Case("train-identical-pairs", lambda c: train_vector(E(c), ["same", "text"], ["same", "text"]),
         BadArgumentError, r"equals positive in every pair, so the vector would be all zeros"),
    Case("train-method", lambda c: train_vector(E(c), ["a"], ["b"], method="ica"),
         BadArgumentError, r"method='ica' is unknown"),
    # --- the tokenizer ---
    Case("tokenizer-encode-surrogate", lambda c: E(c).tokenizer.encode("\udfff"),
         BadArgumentError, r"text='\\udfff' holds a lone surrogate"),
    Case("tokenizer-encode-bytes", lambda c: E(c).tokenizer.encode(b"abc"),
         BadArgumentError, r"text=b'abc' is a bytes, not a str"),
    Case("tokenizer-chat-role-missing", lambda c: E(c).tokenizer.chat([{"content": "hi"}]),
         BadArgumentError, r"has no 'role'"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_refused_before_compute(case: Case, ctx: Ctx, reference: list[int]):
    engine = ctx.engine
    engine.prefill([1, 2, 3])  # a cache the refused call must leave as it is
    calls, seq_len, version = engine.forward_calls, engine.seq_len, ctx.mix.version
    with pytest.raises(case.error, match=case.fragment) as info:
        case.call(ctx)
    assert isinstance(info.value, MaxJupyterError)
    assert "\n" not in str(info.value), "the message is one line"
    assert engine.forward_calls == calls, "no forward pass ran"
    assert engine.seq_len == seq_len, "the cache is as it was"
    assert ctx.mix.version == version and ctx.mix.entries["happy"].coef == 4.0
    assert check_generation(engine, ctx.mix) == reference


def test_device_refused_before_any_conversion(ctx: Ctx, capsys):
    """A bad device on a GGUF that is not converted yet fails before the conversion starts
    (it announces itself on stdout) and leaves no cache behind."""
    gguf = ctx.tmp / "copy.gguf"
    shutil.copy(models.embedded_gguf_path(), gguf)
    with pytest.raises(BadArgumentError, match="device='bogus'"):
        TransformersEngine.load(gguf, device="bogus")
    assert "converting" not in capsys.readouterr().out
    assert not (ctx.tmp / "cache").exists()


def test_truncated_gguf_is_refused_before_conversion(ctx: Ctx, capsys):
    with pytest.raises(CorruptFileError, match="truncated.gguf is damaged or truncated"):
        TransformersEngine.load(truncated_gguf(ctx), device="cpu")
    assert "converting" not in capsys.readouterr().out
    assert not (ctx.tmp / "cache").exists()


def test_saved_vector_carries_its_checksum_and_round_trips(ctx: Ctx):
    path = ctx.saved()
    loaded = SteeringVector.load(path)
    assert loaded.checksum() == ctx.vector.checksum()
    assert all(torch.equal(loaded.directions[l], ctx.vector.directions[l]) for l in loaded.layers)
    assert [p.name for p in ctx.tmp.iterdir()] == ["v.safetensors"]  # no temporary file left


def test_some_identical_pairs_warn(engine):
    with pytest.warns(UserWarning, match=r"pairs \[1\] have the same positive and negative"):
        v = train_vector(engine, ["I love it", "same"], ["I hate it", "same"], layers=[5],
                         method="mean_diff")
    assert v.norms()[5] > 0
