"""The ExLlamaV3 backend on the GPU (marker ``exl3``: skipped without CUDA or exllamav3,
failed instead under ``MAX_JUPYTER_REQUIRE_GPU=1``).

One random Qwen2 model (4 layers, hidden 512, GQA 8/2, biases) is built with transformers
and converted to EXL3 (4 bits, head 6) by exllamav3's own converter, once per process. The
reference is exllamav3's own ``Model.forward`` on the same weights: cached (whole prompts
and one token at a time) and uncached, its ``export_state_layers`` residuals (the same
layer convention as ours, HF ``hidden_states[i + 1]``) and its modules run by hand with a
delta added or an ablation or clamp applied (``intervention.apply``'s torch ops).
Tolerances (relative L2 error of logits or residual rows): the same kernels over the same
rows agree to 2e-3 (exllamav3's kernels are deterministic: its forward and its modules run
by hand agreed exactly on an H100). EXL3's arithmetic differs between paths: a head over 1
row and over 40 differed by 6.7e-3, a decode step against the uncached forward by 2.3e-2
(H100); so where ours and the reference take different paths, ours is held to 1.5 times
what exllamav3's own forward shows between those paths, measured in the test (at least
2e-2).
"""
from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = [pytest.mark.exl3, pytest.mark.slow]
SAME_KERNELS, OTHER_KERNELS = 2e-3, 2e-2  # relative L2 error of logits / residual rows
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                   "special_tokens_map.json")


def tokenizer_source() -> Path:
    env = os.environ.get("MAX_JUPYTER_TOKENIZER")
    if env:
        return Path(env)
    from max_jupyter.models import resolve_hf_folder

    return resolve_hf_folder()


@functools.cache
def exl3_folder() -> Path:
    """A random 4-layer Qwen2 converted to EXL3 by exllamav3's converter (~25 s on an
    H100), once per process; its fp16 source beside it (``<folder>-hf``)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    root = Path(tempfile.mkdtemp(prefix="exl3-"))
    src, dst = root / "qwen2-hf", root / "qwen2-exl3"
    config = Qwen2Config(vocab_size=49152, hidden_size=512, intermediate_size=1536,
                         num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=2,
                         max_position_embeddings=4096, initializer_range=0.05, rope_theta=1e6,
                         tie_word_embeddings=False, architectures=["Qwen2ForCausalLM"])
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float16).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".bias"):
                p.normal_(0, 0.05)
    model.save_pretrained(src)
    del model
    tok = tokenizer_source()
    for name in TOKENIZER_FILES:
        if (tok / name).is_file():
            shutil.copy(tok / name, src / name)
    subprocess.run([sys.executable, "-m", "exllamav3.conversion.convert_model", "-i", str(src),
                    "-o", str(dst), "-w", str(root / "work"), "-b", "4", "-cr", "16", "-cc", "256"],
                   check=True, capture_output=True, timeout=300)
    torch.cuda.empty_cache()
    return dst


@pytest.fixture(scope="module")
def eng():
    from max_jupyter.engines.exllamav3 import ExLlamaV3Engine

    engine = ExLlamaV3Engine.load(exl3_folder(), cache_tokens=1024)
    yield engine
    engine.unload()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cuda(), b.float().cuda()
    return float((a - b).norm() / b.norm())


def reference(eng, ids: list[int], cached: bool, **extra) -> tuple[torch.Tensor, dict]:
    """exllamav3's own ``Model.forward`` over ``ids`` from position 0: ``[n, vocab]`` fp32
    logits and its params (``export_states``). ``cached`` uses the engine's cache (which
    the caller then resets), else the uncached attention."""
    params = (eng._params(0) if cached else {"attn_mode": "flash_attn_nc"}) | extra
    logits = eng.model.forward(torch.tensor([ids]), params)
    return logits[0, :, :eng.identity.vocab_size].float(), params


def ids_of(eng, n: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, eng.identity.vocab_size, (n,), generator=g).tolist()


def test_prefill_and_verify_match_exllamav3_forward(eng):
    ids = ids_of(eng, 40)
    last, _ = reference(eng, ids, cached=True, last_tokens_only=1)  # its head over 1 row, as ours
    ref, _ = reference(eng, ids, cached=True)  # every row
    eng.reset()
    assert rel(eng.prefill(ids).logits, last[-1]) < SAME_KERNELS
    eng.reset()
    got = eng.verify(ids).all_logits
    assert got.shape == ref.shape and rel(got, ref) < SAME_KERNELS


def own_steps(eng, ids: list[int], start: int) -> torch.Tensor:
    """exllamav3's own cached forward: ``ids[:start]`` at once, then one token at a time;
    ``[len(ids) - start, vocab]`` logits of the steps (the caller resets the engine)."""
    reference(eng, ids[:start], cached=True, last_tokens_only=1)
    rows = []
    for j in range(start, len(ids)):
        params = eng._params(j)
        rows.append(eng.model.forward(torch.tensor([ids[j:j + 1]]), params)[0, -1, :eng.identity.vocab_size])
    return torch.stack(rows).float()


def test_steps_rewind_and_verify_follow_exllamav3(eng):
    ids = ids_of(eng, 48, seed=1)
    uncached, _ = reference(eng, ids, cached=False)
    steps = own_steps(eng, ids[:38], 30)
    # EXL3's own arithmetic between its decode path and its uncached forward
    bound = max(OTHER_KERNELS, 1.5 * max(rel(steps[k], uncached[30 + k]) for k in range(8)))
    eng.reset()
    eng.prefill(ids[:30])
    for j in range(30, 38):  # teacher-forced steps: exllamav3's decode path, ours
        got = eng.step(ids[j]).logits
        assert rel(got, steps[j - 30]) < SAME_KERNELS
        assert rel(got, uncached[j]) < bound
    eng.rewind(3)  # drop ids[35:38]
    assert eng.seq_len == 35
    out = eng.verify(ids[35:43])
    assert rel(out.all_logits, uncached[35:43]) < bound
    eng.rewind(5)
    assert rel(eng.step(ids[38]).logits, uncached[38]) < bound


def test_captures_are_exllamav3s_exported_states(eng):
    ids = ids_of(eng, 32, seed=2)
    _, params = reference(eng, ids, cached=False, export_state_layers={1, 3})
    exported = dict(zip((1, 3), params["export_states"]))  # fp16, in layer order
    out = eng.prefill(ids, capture={1, 3})
    for i in (1, 3):
        assert out.hidden[i].shape == (32, eng.identity.hidden_size)
        assert out.hidden[i].dtype == torch.float32
        assert rel(out.hidden[i], exported[i][0]) < OTHER_KERNELS
    # the logit lens of the last layer is the forward's logits
    assert rel(eng.unembed(out.hidden[3][-1:])[0], out.logits) < SAME_KERNELS


def hand_run(eng, ids: list[int], ops: dict) -> torch.Tensor:
    """exllamav3's modules run by hand, uncached and with no deferred residual add, with
    ``ops`` (layer -> a delta or an ``Intervention``, ``intervention.apply``'s torch
    arithmetic) at the output of their blocks: the last row's logits."""
    from max_jupyter.engines.intervention import apply

    params = {"attn_mode": "flash_attn_nc", "layer_instance": 0}
    x = eng.model.prepare_inputs(torch.tensor([ids]), params)
    for i, (module, _, _) in enumerate(eng.model.fwd_modules):
        x = module.forward(module.prepare_for_device(x, params), params)
        if i - 1 in ops:  # fwd_modules[0] is the embedding
            x = apply(x, ops[i - 1])
    return x[0, -1, :eng.identity.vocab_size].float()


def test_a_delta_moves_logits_as_in_exllamav3s_modules(eng):
    ids = ids_of(eng, 24, seed=3)
    plain = eng.prefill(ids, capture={1})
    delta = torch.randn(eng.identity.hidden_size, device="cuda")
    delta *= 2 * plain.hidden[1].norm(dim=-1).median() / delta.norm()
    steered = eng.prefill(ids, deltas={1: delta}, capture={1, 2})
    # the delta shows at its own layer as itself
    assert rel(steered.hidden[1] - plain.hidden[1], delta.expand_as(plain.hidden[1])) < SAME_KERNELS
    ref = hand_run(eng, ids, {1: delta})
    assert rel(steered.logits, ref) < OTHER_KERNELS
    moved, ref_moved = steered.logits - plain.logits, ref - hand_run(eng, ids, {})
    assert torch.nn.functional.cosine_similarity(moved, ref_moved, dim=0) > 0.99
    # decode steps take the same delta (deferred residual add kept)
    eng.prefill(ids[:-1], deltas={1: delta})
    assert rel(eng.step(ids[-1], deltas={1: delta}).logits, ref) < OTHER_KERNELS


def test_ablation_and_clamp_hold_and_move_logits_as_exllamav3s_modules(eng):
    from max_jupyter.engines.intervention import Intervention
    from test_interventions_gpu import projection_ratio

    ids = ids_of(eng, 24, seed=4)
    plain = eng.prefill(ids, capture={1, 2})
    u = plain.hidden[1].mean(0)
    u /= u.norm()  # a direction the residual has: every row projects on it
    assert projection_ratio(plain.hidden[1], u) > 0.05

    def ablate(target: float) -> dict:
        return {1: Intervention(ablate=u[None], targets=torch.tensor([target], device="cuda"))}

    # prefill: the projection is set at every row, and the logits are exllamav3's modules'
    # with the same ablation (and a delta at layer 0, whose add stays deferred)
    delta = 0.5 * plain.hidden[1].norm(dim=-1).median() * torch.nn.functional.normalize(
        torch.randn(eng.identity.hidden_size, device="cuda"), dim=0)
    ops = {0: delta} | ablate(0.0)
    out = eng.prefill(ids, deltas=ops, capture={1})
    assert projection_ratio(out.hidden[1], u) <= 1e-3
    ref = hand_run(eng, ids, ops)
    assert rel(out.logits, ref) < OTHER_KERNELS
    moved, ref_moved = out.logits - plain.logits, ref - hand_run(eng, ids, {})
    assert torch.nn.functional.cosine_similarity(moved, ref_moved, dim=0) > 0.99
    # decode steps with changing targets, then a verify of 5 rows
    eng.prefill(ids[:16], deltas=ablate(0.0))
    for j, target in zip(range(16, 19), (0.0, 2.5, -1.0)):
        step = eng.step(ids[j], deltas=ablate(target), capture={1})
        assert projection_ratio(step.hidden[1], u, target) <= 1e-3, (j, target)
    verified = eng.verify(ids[19:], deltas=ablate(0.0), capture={1})
    assert verified.hidden[1].shape[0] == 5 and projection_ratio(verified.hidden[1], u) <= 1e-3
    # a clamp to [-0.5, 0.5] then an add of 0.5 u: every projection in [0, 1]
    norm = float(plain.hidden[2].norm(dim=-1).median())
    clamp = {2: Intervention(add=0.5 * u, clamp=u[None], low=torch.tensor([-0.5], device="cuda"),
                             high=torch.tensor([0.5], device="cuda"))}
    out = eng.prefill(ids, deltas=clamp, capture={2})
    projections = out.hidden[2] @ u
    assert (projections >= -1e-3 * norm).all() and (projections <= 1 + 1e-3 * norm).all()
    assert rel(out.logits, hand_run(eng, ids, clamp)) < OTHER_KERNELS


def test_identity_and_tokenizer_are_the_source_models(eng):
    from max_jupyter.engines import TransformersEngine

    hf = TransformersEngine.load(str(exl3_folder().parent / "qwen2-hf"), device="cpu")
    assert eng.identity == hf.identity  # fp16 embedding fingerprint, shape, architecture
    chat = [{"role": "user", "content": "Hello"}]
    assert eng.tokenizer.chat(chat) == hf.tokenizer.chat(chat)


def test_logits_match_transformers_on_the_dequantised_weights(eng):
    """Weights both backends load: exllamav3's own reconstruction of every EXL3 linear
    (``get_weight_tensor``) written into the fp16 source model, run by transformers. Ours
    against it: what is left is EXL3's kernels against fp16 matrix products on the same
    weights. Bound: 5e-2 relative and at most half of ours against the fp16 source (the
    quantisation's own error: a reconstruction that did not match the kernels' weights would
    be no closer than the source), top-1 >= 0.9; over a prefill's rows and 8 steps."""
    from transformers import AutoModelForCausalLM

    from max_jupyter.engines import TransformersEngine

    source = exl3_folder().parent / "qwen2-hf"
    ids, steps = ids_of(eng, 40, seed=7), ids_of(eng, 8, seed=8)

    def run(engine) -> torch.Tensor:
        engine.reset()
        rows = [engine.verify(ids).all_logits.float().cuda()]
        rows += [engine.step(t).logits.float().cuda()[None] for t in steps]
        return torch.cat(rows)

    def walk(module):
        yield module
        for child in module.modules:
            yield from walk(child)

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float16).cuda().eval()
    source_logits = run(TransformersEngine(model, eng.tokenizer))
    params, replaced = dict(model.named_parameters()), set()
    with torch.no_grad():
        for m in (m for top in eng.model.modules for m in walk(top)):
            if type(getattr(m, "inner", None)).__name__ != "LinearEXL3":
                continue
            rows = slice(m.first_out_feature, m.first_out_feature + m.out_features)
            cols = slice(m.first_in_feature, m.first_in_feature + m.in_features)
            params[m.key + ".weight"][rows, cols] = m.inner.get_weight_tensor().T  # [out, in]
            replaced.add(m.key)
    assert len(replaced) == 4 * 7 + 1, sorted(replaced)  # q, k, v, o, gate, up, down a layer; the head
    dequantised = run(TransformersEngine(model, eng.tokenizer))
    ours = run(eng)
    err, err_source = rel(ours, dequantised), rel(ours, source_logits)
    top1 = float((ours.argmax(-1) == dequantised.argmax(-1)).float().mean())
    print(f"ours vs transformers on the dequantised weights: rel err {err:.2e}, top-1 {top1:.2f}; "
          f"vs the fp16 source {err_source:.2e}")
    assert err < min(5e-2, 0.5 * err_source) and top1 >= 0.9


def test_memory_plan_holds_and_session_autodetects_exl3():
    import gc

    from max_jupyter import Session
    from max_jupyter.engines.exllamav2 import measured_peak
    from max_jupyter.engines.exllamav3 import ExLlamaV3Engine

    folder = exl3_folder()
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    s = Session.load(folder, small="same", max_vram_gb=4, cache_tokens=2048, store=None,
                     progress=False)
    try:
        assert isinstance(s.big, ExLlamaV3Engine) and isinstance(s.small, ExLlamaV3Engine)
        prompt = ids_of(s.big, 1500, seed=4)
        s.big.prefill(prompt), s.small.prefill(prompt)
        r = s.generate("Hello there.", max_new_tokens=16, ignore_eos=True)
        assert len(r.token_ids) == 16
        peak = measured_peak(held)
        print(s.plan.table(peak))
        assert peak.total <= s.plan.total <= 4 * 1024 ** 3
    finally:
        s.close()


@pytest.mark.parametrize("bits", [8, 4])
def test_quantised_cache_stays_within_its_plan_and_near_fp16(eng, bits):
    """``cache_bits``: exllamav3's quantised KV cache. The plan counts fewer cache bytes than
    fp16's, the measured peak stays under the plan, and decode logits stay near the fp16
    cache's (a cache that lost K/V would be as far off as a random model)."""
    import gc

    from max_jupyter.engines.exllamav2 import measured_peak
    from max_jupyter.engines.exllamav3 import load_engines

    prompt, steps = ids_of(eng, 300, seed=5), ids_of(eng, 16, seed=6)
    eng.prefill(prompt)
    expected = [eng.step(t).logits for t in steps]
    gc.collect()
    torch.cuda.empty_cache()
    held = torch.cuda.memory_reserved()
    torch.cuda.reset_peak_memory_stats()
    (quantised,), plan = load_engines([("q", exl3_folder())], cache_tokens=1024, cache_bits=bits)
    try:
        quantised.prefill(prompt)
        errors = [rel(quantised.step(t).logits, e) for t, e in zip(steps, expected)]
        peak = measured_peak(held)
        per_token = plan.models[0].cache_per_token
        fp16 = eng.model.config.num_hidden_layers * 2 * 128 * 2  # K and V of 2 heads x 64, fp16
        print(f"cache_bits={bits}: logits rel err vs fp16 cache max {max(errors):.2e}; cache "
              f"{per_token} bytes a position (fp16 {fp16}); peak {peak.total / 2 ** 30:.2f} GiB, "
              f"plan {plan.total / 2 ** 30:.2f}")
        assert fp16 * bits / 16 < per_token < fp16  # the bits, plus exllamav3's scales
        assert {type(layer).__name__ for layer in quantised.cache.layers.values()} == {"CacheLayer_quant"}
        assert peak.total <= plan.total
        # quantised: near, not equal (H100: 3.7e-2 at 8 bits, 0.30 at 4 on this random model;
        # a cache that lost K/V is as far off as another model, > 1)
        assert 0 < max(errors) < (0.1 if bits == 8 else 0.5)
    finally:
        quantised.unload()
        torch.cuda.set_per_process_memory_fraction(1.0)
