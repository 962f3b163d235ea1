"""Speculative decoding on the ExLlamaV2 backend (GPU only): the direct, graphed ``verify``
against per-token steps and transformers on the same (dequantised) weights, and greedy
speculative generation with the model drafting for itself.

Random 4-layer GPTQ models from the parity tests' builder. Run with the GPU suite
(``bash bench/gpu_session.sh tests``).
"""
from __future__ import annotations

import pytest
import torch

from test_exllamav2_parity import (
    QUANT_REL,
    QUANT_TOP1,
    Parity,
    build_model,
    copy_tokenizer,
    load_exl,
    reference,
    tokenizer_folder,  # noqa: F401 (a fixture)
)

pytestmark = [pytest.mark.gpu, pytest.mark.slow]  # skipped without CUDA or exllamav2 (conftest.py)
HIDDEN, VOCAB = 512, 49152
LENGTHS = (2, 5, 1, 3, 17, 5, 2)  # verify lengths in turn (1: a plain step), repeated


@pytest.fixture(scope="module")
def gptq(tmp_path_factory, tokenizer_folder):
    """(folder, the transformers reference on the dequantised weights) of a random GPTQ Llama."""
    from max_jupyter.testing import write_gptq_rtn

    tmp = tmp_path_factory.mktemp("spec-gptq")
    model = build_model("LlamaForCausalLM", tmp / "fp16", tokenizer_folder)
    write_gptq_rtn(model, tmp / "gptq")
    copy_tokenizer(tokenizer_folder, tmp / "gptq")
    return tmp / "gptq", reference(model, tmp / "gptq")


def verify_script(exl, ref, steps: Parity, verify: Parity, rounds: int) -> None:
    """Prefill 240 random tokens on both engines; then, ``rounds`` times over ``LENGTHS``:
    verify a random draft on ``exl`` (steered at layer 1, capturing layers 1 and 3) against
    the same tokens stepped one at a time on ``ref``, rewind a random rejected tail on both,
    and hold one direct step after it to ``ref`` too. Crosses the 256-position bucket."""
    g = torch.Generator().manual_seed(7)
    deltas = {1: (torch.randn(HIDDEN, generator=g) * 0.5).half().cuda()}
    prompt = torch.randint(0, VOCAB, (240,), generator=g).tolist()
    exl.prefill(prompt, deltas, (1, 3))
    ref.prefill(prompt, deltas, (1, 3))
    for n in LENGTHS * rounds:
        draft = torch.randint(0, VOCAB, (n,), generator=g).tolist()
        out = exl.verify(draft, deltas, (1, 3))
        assert out.all_logits.shape == (n, VOCAB) and out.hidden[3].shape == (n, HIDDEN)
        for j, token in enumerate(draft):
            want = ref.step(token, deltas, (1, 3))
            verify.add(type(want)(out.all_logits[j], {l: h[j:j + 1] for l, h in out.hidden.items()}),
                       want)
        rejected = int(torch.randint(0, n, (1,), generator=g))
        exl.rewind(rejected)
        ref.rewind(rejected)
        token = int(torch.randint(0, VOCAB, (1,), generator=g))
        steps.add(exl.step(token, deltas, (1, 3)), ref.step(token, deltas, (1, 3)))
        assert exl.seq_len == ref.seq_len


def test_graphed_verify_matches_steps_and_transformers(gptq):
    """Every verify row (lengths 1-17, eager the first time, replayed from its graph after)
    agrees with transformers stepping the same tokens on the dequantised weights within the
    arithmetic of the 4-bit kernels, as the direct steps do; so does the step after each
    rewind of a rejected tail, and an engine without graphs gives the same rows."""
    folder, ref = gptq
    exl = load_exl(folder)
    assert exl.direct and exl.use_graphs and exl.supports_verify
    steps, verify = Parity(), Parity()
    verify_script(exl, ref, steps, verify, rounds=3)
    verify_keys = {k[1] for k in exl._graphs if k[2]}
    assert {2, 3, 5, 17} <= verify_keys, verify_keys  # graphed per length
    verify.check("gptq verify rows (graphed) vs transformers steps", QUANT_REL, QUANT_TOP1)
    steps.check("gptq steps after rewinds vs transformers", QUANT_REL, QUANT_TOP1)
    eager = load_exl(folder, use_graphs=False)
    eager_steps, eager_verify = Parity(), Parity()
    verify_script(eager, ref, eager_steps, eager_verify, rounds=1)
    eager_verify.check("gptq verify rows (eager) vs transformers steps", QUANT_REL, QUANT_TOP1)
    assert not eager._graphs
    for engine in (exl, eager):
        engine.unload()


def test_speculative_generation_drafting_for_itself(gptq):
    """The model drafting for itself (a second engine on the same folder) on the graphed
    direct path: almost every draft token is accepted, the big model ran far fewer passes
    than tokens, each emitted token is the big model's greedy choice when teacher-forced
    (up to the 4-bit kernels' top-1 noise), and both caches hold exactly the context."""
    from max_jupyter.orchestrator import CognitiveOrchestrator

    folder, _ = gptq
    big, small = load_exl(folder), load_exl(folder)
    orch = CognitiveOrchestrator(big, small)
    orch.pace_speculation = False  # draft by acceptance alone: this tests the tokens, not the pace
    calls = big.forward_calls
    r = orch.generate("Tell me a story.", max_new_tokens=96, speculate=4, ignore_eos=True)
    passes = big.forward_calls - calls
    print(f"\nself-draft: acceptance {r.acceptance_rate:.3f}, {r.drafted_tokens} drafted, "
          f"{passes} big passes for {len(r.token_ids)} tokens")
    assert r.speculate_off is None and len(r.token_ids) == 96
    assert r.acceptance_rate >= 0.9
    assert passes <= 96 // 3
    assert big.seq_len == len(r.prompt_ids) + 95 and small.seq_len == big.seq_len + 1
    logits, agree = big.prefill(r.prompt_ids).logits, 0  # teacher-forced, one step a token
    for token in r.token_ids:
        agree += int(logits.argmax()) == token
        logits = big.step(token).logits
    assert agree / len(r.token_ids) >= QUANT_TOP1, agree
    for engine in (big, small):
        engine.unload()


def test_speculative_sampling_with_a_judge_on_the_gpu(gptq):
    """Sampling and a probe judge steering the big model, speculating on the graphed path:
    the run drafts and accepts, the judge's decision varies and ends blocks where it
    changes, every token has the big model's probability, and both caches hold the context."""
    from max_jupyter.orchestrator import CognitiveOrchestrator, ProbeJudge, SamplingConfig
    from max_jupyter.steering import SteeringVector

    folder, _ = gptq
    big, small = load_exl(folder), load_exl(folder)
    g = torch.Generator().manual_seed(3)
    probe = SteeringVector({2: torch.randn(HIDDEN, generator=g)}, small.identity, "probe")
    steer = SteeringVector({1: torch.randn(HIDDEN, generator=g) * 0.5}, big.identity, "steer")
    never = ProbeJudge(probe, threshold=float("inf"), mix="steer", name="probe")
    scout = CognitiveOrchestrator(big, small, never, mixes={"steer": steer})
    threshold = float(scout.generate("Tell me a story.", max_new_tokens=48,
                                     ignore_eos=True).scores["probe"].median())
    judge = ProbeJudge(probe, threshold=threshold, mix="steer", name="probe")
    orch = CognitiveOrchestrator(big, small, judge, mixes={"steer": steer})
    orch.pace_speculation = False
    r = orch.generate("Tell me a story.", max_new_tokens=96, speculate=4, ignore_eos=True,
                      sampling=SamplingConfig(temperature=0.7, seed=5))
    steered = [s.steered for s in r.steps]
    print(f"\nsampling + judge: acceptance {r.acceptance_rate:.3f}, {r.drafted_tokens} drafted, "
          f"{sum(steered)}/{len(steered)} steps steered")
    assert r.speculate_off is None and len(r.token_ids) == 96 and r.accepted_tokens > 0
    assert 0 < sum(steered) < len(steered)
    assert all(0 < s.sampler_prob <= 1 for s in r.steps)
    assert big.seq_len == len(r.prompt_ids) + 95 and small.seq_len == big.seq_len + 1
    for engine in (big, small):
        engine.unload()
