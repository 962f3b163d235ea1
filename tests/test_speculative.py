"""Speculative decoding on the CPU.

Greedy: the embedded model verifies drafts from a second instance of itself (acceptance 1),
from a copy with a little weight noise (partial acceptance) and from one with as much noise
as weight (a bad drafter: falls back to plain); with judges the trace equals the plain one.
These tests draft by acceptance alone (``pace_speculation`` off: wall-clock pacing would
make the draft lengths depend on this machine's speed); pacing has tests of its own.
Sampling: on a tiny random Llama (its head scaled up so its distributions are peaked, top-k
4), the tokens of thousands of seeded generations follow the big model's distribution,
computed exactly by enumeration, as closely as those of plain sampling do."""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import assert_mirrors
from max_jupyter.engines import TransformersEngine, residual
from max_jupyter.engines.cpu_linear import pack_linears
from max_jupyter.errors import BackendUnavailableError, BadArgumentError
from max_jupyter.models import resolve_hf_folder
from max_jupyter.orchestrator import (
    CognitiveOrchestrator,
    FunctionJudge,
    JudgeContext,
    Never,
    ProbeJudge,
    Sampler,
    SamplingConfig,
    TraceConfig,
    Verdict,
    speculative,
)
from max_jupyter.orchestrator.judges import NO_MIXES, Judge
from max_jupyter.orchestrator.speculative import DraftLength
from max_jupyter.steering import Mix, SteeringVector
from max_jupyter.steering.mix import MixEntry, Schedule
from max_jupyter.testing import build_tiny_model
from max_jupyter.tokenizer import Tokenizer

pytestmark = [pytest.mark.slow,  # the embedded model drafting for itself
              pytest.mark.usefixtures("unpaced")]

PROMPT = "Write one sentence about the weather."
LAYERS = (10, 15)  # the layers of the conftest ``vector``


def noised(sigma: float, path: str | None = None, head: float = 1.0) -> TransformersEngine:
    """A model (default: the embedded one) with its output head scaled by ``head`` and
    Gaussian noise of ``sigma`` times each weight's std added, in fp32 on the CPU with its
    linear layers packed afterwards (as ``TransformersEngine.load`` leaves them). Its
    identity is the clean model's (taken before the noise), so its residual norms are known."""
    folder = resolve_hf_folder(path)
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    engine = TransformersEngine(model, Tokenizer.from_folder(folder))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        model.lm_head.weight.mul_(head)
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * p.std() * sigma)
    pack_linears(model)
    return engine


@pytest.fixture(scope="module")
def near(engine) -> TransformersEngine:
    return noised(0.05)


@pytest.fixture(scope="module")
def bad(engine) -> TransformersEngine:
    return noised(1.0)


@pytest.fixture()
def ctrl(engine, vector) -> Mix:
    c = Mix(engine.identity)
    c.set("happy", vector, 0.6)
    return c


def pair(orch: CognitiveOrchestrator, speculate: int, **options):
    """The same generation without and with speculation, and the caches each left:
    (result, big seq_len, small seq_len) twice."""
    runs = []
    for k in (0, speculate):
        r = orch.generate(PROMPT, speculate=k, **options)
        runs.append((r, orch.big.seq_len, orch.small.seq_len))
    return runs


def assert_same(plain, spec) -> None:
    """Same tokens, text, ending, trace (judges' scores, steering, re-runs included) and
    caches as the non-speculative run."""
    (a, big_a, small_a), (b, big_b, small_b) = plain, spec
    assert b.token_ids == a.token_ids and b.text == a.text
    assert b.finish_reason == a.finish_reason
    assert b.small_ids == a.small_ids and (big_b, small_b) == (big_a, small_a)
    for field in ("token", "sampler_prob", "steered", "live_coefs", "mixes_on", "rerun",
                  "unsteered_token"):
        assert [getattr(r, field) for r in b.steps] == [getattr(r, field) for r in a.steps], field
    assert [list(r.scores) for r in b.steps] == [list(r.scores) for r in a.steps]
    for name, scores in a.scores.items():
        torch.testing.assert_close(b.scores[name], scores, atol=1e-3, rtol=1e-4, equal_nan=True)
    for top in ("big_topk", "first_pass_topk"):
        assert torch.equal(getattr(b, top).ids[:, 0], getattr(a, top).ids[:, 0])
        torch.testing.assert_close(getattr(b, top).logits, getattr(a, top).logits, atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(b.small_topk.logits, a.small_topk.logits, atol=1e-3, rtol=1e-4)
    for layer, rows in a.big_hidden.items():
        torch.testing.assert_close(b.big_hidden[layer], rows, atol=1e-3, rtol=1e-4)
    assert b.deltas.keys() == a.deltas.keys()
    for layer, rows in a.deltas.items():
        torch.testing.assert_close(b.deltas[layer], rows)
    assert a.drafted_tokens == 0 and a.acceptance_rate is None and b.speculate_off is None


def assert_caches(orch: CognitiveOrchestrator, r, small: bool = True, big: bool = True) -> None:
    """The caches hold what the result says they saw (checked against fresh prefills; a
    steered cache has none to compare with)."""
    if small:
        assert_mirrors(orch.small, r.small_ids)
    if big:
        assert_mirrors(orch.big, (r.prompt_ids + r.token_ids)[:orch.big.seq_len])


def block_of(r, step: int) -> tuple[int, int] | None:
    """(first step, accepted) of the speculative block that handed out ``step``, if any."""
    for s in r.steps:
        if s.drafted and s.step <= step <= s.step + s.accepted:
            return s.step, s.accepted
    return None


# ---------------------------------------------------------------- the engine's verify


def test_verify_rows_equal_per_token_steps(engine, ctrl):
    ids = engine.tokenizer.chat(PROMPT)
    draft = engine.tokenizer.encode(" It is sunny today")[:4]
    deltas = ctrl.deltas(engine)
    engine.prefill(ids)
    out = engine.verify(draft, deltas, capture=LAYERS)
    assert engine.seq_len == len(ids) + len(draft)
    assert out.all_logits.shape == (len(draft), engine.identity.vocab_size)
    assert torch.equal(out.logits, out.all_logits[-1])
    engine.rewind(len(draft))
    for j, token in enumerate(draft):
        step = engine.step(token, deltas, capture=LAYERS)
        torch.testing.assert_close(out.all_logits[j], step.logits, atol=1e-4, rtol=1e-4)
        for layer in LAYERS:
            torch.testing.assert_close(out.hidden[layer][j], step.hidden[layer][0], atol=1e-4, rtol=1e-4)
    assert engine.seq_len == len(ids) + len(draft)  # steered positions: no unsteered prefill to compare


def test_verify_refused_without_support(engine, monkeypatch):
    engine.prefill([1, 2, 3])
    monkeypatch.setattr(engine, "supports_verify", False)
    with pytest.raises(BackendUnavailableError, match="speculate=0"):
        engine.verify([4, 5])
    assert engine.seq_len == 3


# ---------------------------------------------------------------- greedy identity


@pytest.mark.parametrize("steered", [False, True])
def test_self_draft_equals_greedy(engine, small, ctrl, steered):
    orch = CognitiveOrchestrator(engine, small, steering=ctrl if steered else None)
    trace = TraceConfig(big_layers=LAYERS, small_layers=(5,))
    plain, spec = pair(orch, 4, max_new_tokens=10, ignore_eos=True, trace=trace)
    assert_same(plain, spec)
    r = spec[0]
    if steered:  # the drafter is not steered: it disagrees somewhere, the output does not
        assert r.acceptance_rate < 1 and any(s.rejected for s in r.steps)
    else:  # blocks at steps 1 (4 drafted) and 6 (3: up to the last step)
        assert r.acceptance_rate == 1.0 and r.drafted_tokens == 7
        assert r.steps[1].drafted == tuple(r.token_ids[1:5]) and r.steps[1].accepted == 4
    assert all(s.steered for s in r.steps) == steered
    assert_caches(orch, r, big=not steered)


@pytest.mark.parametrize("early", [False, True], ids=["feed-if-kept", "feed-during-verify"])
def test_noised_drafter_partial_acceptance_equals_greedy(engine, near, early, monkeypatch):
    """``early``: the engines claim to launch asynchronously, so the last draft token is fed
    while the verify runs and taken back on a rejection (the GPU schedule); otherwise it is
    fed only when the whole draft is kept. The small model's forwards show which ran."""
    for e in (engine, near):
        monkeypatch.setattr(e, "launches_async", early)
    orch = CognitiveOrchestrator(engine, near, overlap=False)
    calls = near.forward_calls
    plain, spec = pair(orch, 4, max_new_tokens=16, ignore_eos=True)
    assert_same(plain, spec)
    r = spec[0]
    assert 0 < r.acceptance_rate < 1
    rejected = [s for s in r.steps if s.rejected]
    assert rejected, "the noised copy should disagree somewhere"
    for s in rejected:  # the big model's own token follows the accepted prefix
        assert r.steps[s.step + s.accepted].token != s.rejected[0]
    blocks = [s for s in r.steps if s.drafted]
    plain_steps = len(r.steps) - sum(s.accepted + 1 for s in blocks)
    per_block = sum(len(s.drafted) - 1 + (early or not s.rejected) + 1 for s in blocks)
    assert near.forward_calls - calls == (1 + len(plain[0].steps)) + 1 + plain_steps + per_block
    assert_caches(orch, r)


@pytest.mark.parametrize("end", ["eos", "stop", "aborted"])
def test_ending_inside_a_block_leaves_the_caches_of_greedy(engine, small, end):
    orch = CognitiveOrchestrator(engine, small)
    options = {"max_new_tokens": 30, "stop": ["."] if end == "stop" else ()}
    if end == "aborted":
        options["on_event"] = lambda e: e.record and e.record.step == 10 and orch.abort()
    plain, spec = pair(orch, 6, **options)
    assert_same(plain, spec)
    r = spec[0]
    assert r.finish_reason == end
    first, accepted = block_of(r, r.steps[-1].step)
    assert r.steps[-1].step < first + accepted, "the generation should end inside a block"
    assert_caches(orch, r)


def test_closing_the_stream_at_the_eos_event_keeps_the_caches_of_greedy(engine, small):
    """A consumer that stops iterating at the EOS event (the generator closed there) leaves
    both caches as the run to the end does: EOS never reaches the small model."""
    orch = CognitiveOrchestrator(engine, small)
    whole = orch.generate(PROMPT, max_new_tokens=30, speculate=6)
    assert whole.finish_reason == "eos"
    lengths = (engine.seq_len, small.seq_len)
    stream = orch.stream(PROMPT, max_new_tokens=30, speculate=6)
    for event in stream:
        if event.record is not None and event.record.token in engine.tokenizer.eos_ids:
            stream.close()
            break
    assert (engine.seq_len, small.seq_len) == lengths
    assert_caches(orch, whole)


# ---------------------------------------------------------------- adaptive draft length


def test_bad_drafter_falls_back_to_plain_steps(engine, bad):
    orch = CognitiveOrchestrator(engine, bad)
    before = bad.forward_calls
    plain = orch.generate(PROMPT, max_new_tokens=16, ignore_eos=True)
    plain_calls, before = bad.forward_calls - before, bad.forward_calls
    r = orch.generate(PROMPT, max_new_tokens=16, ignore_eos=True, speculate=4)
    assert r.token_ids == plain.token_ids and r.small_ids == plain.small_ids
    lengths = [len(s.drafted) for s in r.steps if s.drafted]
    assert lengths[:4] == [4, 3, 2, 1] and r.acceptance_rate < 0.2
    in_blocks = sum(1 for s in r.steps if block_of(r, s.step))
    assert len(r.steps) - in_blocks >= 6  # mostly plain steps once k fell to 0
    assert bad.forward_calls - before <= plain_calls + 8  # the drafts wasted a few forwards
    assert_caches(orch, r, small=False)  # its noisy activations exceed the prefill tolerance


# ---------------------------------------------------------------- refused or off


def test_speculate_refused_out_of_range(engine, small):
    orch = CognitiveOrchestrator(engine, small)
    for value in (-1, 17, 1.5, True):
        with pytest.raises(BadArgumentError, match="speculate"):
            next(orch.stream(PROMPT, speculate=value))  # refused before the prefill


def test_speculate_off_where_it_cannot_draft(engine, small, tiny, monkeypatch):
    cases = {"no small model": CognitiveOrchestrator(engine),
             "vocabulary differs": CognitiveOrchestrator(engine, tiny)}
    for reason, orch in cases.items():
        r = orch.generate(PROMPT, max_new_tokens=3, speculate=4)
        assert reason in r.speculate_off and r.drafted_tokens == 0
    monkeypatch.setattr(engine, "supports_verify", False)
    r = CognitiveOrchestrator(engine, small).generate(PROMPT, max_new_tokens=3, speculate=4)
    assert "no verify forward" in r.speculate_off and r.drafted_tokens == 0


def test_speculation_replaces_overlap(engine, near):
    """A generation that speculates does not issue big steps ahead of the judges (overlap):
    it drafts, and gives the tokens and trace of the overlapped run without speculation."""
    orch = CognitiveOrchestrator(engine, near, Never(), overlap=True)
    plain, spec = pair(orch, 4, max_new_tokens=16, ignore_eos=True)
    assert_same(plain, spec)
    assert spec[0].drafted_tokens > 0 and spec[0].ahead_misses == 0


def test_the_session_passes_speculate_through(engine, small):
    from max_jupyter import Session

    with Session(engine, small) as s:
        plain = s.generate("Name three colours.", max_new_tokens=12)
        fast = s.generate("Name three colours.", max_new_tokens=12, speculate=4)
    assert fast.token_ids == plain.token_ids and fast.drafted_tokens > 0


def test_an_int8_small_model_drafts_for_the_fp32_model_and_keeps_greedy():
    """``Session.load(dtype=(None, "int8"))``: the big model fp32 (packed), the small one
    int8 (engines/cpu_linear.py). Its drafts are mostly kept, and the tokens, with and
    without steering, are the big model's plain greedy ones."""
    from max_jupyter import Session
    from max_jupyter.engines.cpu_linear import Int8Linear, PackedLinear

    with Session.load(small="same", dtype=(None, "int8"), store=None, progress=False) as s:
        kinds = lambda e: {type(m) for m in e.model.modules()}  # noqa: E731
        assert PackedLinear in kinds(s.big) and Int8Linear not in kinds(s.big)
        assert Int8Linear in kinds(s.small) and PackedLinear not in kinds(s.small)
        s.train("happy", ["I love this, what a joy."], ["I hate this, how awful."], progress=False)
        for steering in (None, {"happy": 0.4}):
            alone = s.generate(PROMPT, max_new_tokens=24, ignore_eos=True, mirror=False, steering=steering)
            fast = s.generate(PROMPT, max_new_tokens=24, ignore_eos=True, speculate=4, steering=steering)
            assert fast.token_ids == alone.token_ids
            assert fast.drafted_tokens > 0 and (steering or fast.acceptance_rate > 0.5)


# ---------------------------------------------------------------- speculative sampling

TINY_PROMPT = [5, 6, 7, 8]
TINY_SAMPLING = {"temperature": 1.0, "top_k": 4}
N_TOKENS, N_SAMPLES, N_JUDGED, ALPHA = 4, 3000, 2000, 1e-4
VIEWS = {"token 0": (0,), "token 1": (1,), "token 2": (2,), "token 3": (3,),
         "tokens 0-1": (0, 1), "tokens 0-2": (0, 1, 2), "tokens 1-3": (1, 2, 3),
         "tokens 0-3": (0, 1, 2, 3)}


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, TransformersEngine]:
    """The tiny random Llama with its head scaled x30 (peaked distributions) as the big
    model, and noised copies of it as drafters: "near" (acceptance about 0.45) and "bad"."""
    folder = str(build_tiny_model(tmp_path_factory.mktemp("tiny-spec")))
    return {name: noised(sigma, folder, head=30.0)
            for name, sigma in (("big", 0.0), ("near", 0.15), ("bad", 1.0))}


@pytest.fixture()
def one_thread():
    """One torch thread: the tiny model's forwards are overhead-bound, and the machine shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact(logits: Callable[[tuple[int, ...]], torch.Tensor], n: int) -> dict[tuple[int, ...], float]:
    """The probability of every sequence of ``n`` tokens under ``TINY_SAMPLING``, by
    enumeration: ``logits(prefix)`` gives the big model's logits after each prefix."""
    sampler = Sampler(SamplingConfig(**TINY_SAMPLING))
    dist: dict[tuple[int, ...], float] = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for seq, prob in dist.items():
            p = sampler.probabilities(logits(seq))
            for token in p.nonzero().flatten().tolist():
                nxt[seq + (token,)] = prob * float(p[token])
        dist = nxt
    return dist


def draw(orch: CognitiveOrchestrator, speculate: int, seeds: range
         ) -> tuple[list[tuple[int, ...]], float | None]:
    """The tokens of one seeded generation per seed, and the acceptance over all of them."""
    seqs, drafted, accepted = [], 0, 0
    for seed in seeds:
        r = orch.generate(TINY_PROMPT, max_new_tokens=N_TOKENS, ignore_eos=True, speculate=speculate,
                          sampling=SamplingConfig(seed=seed, **TINY_SAMPLING))
        seqs.append(tuple(r.token_ids))
        drafted, accepted = drafted + r.drafted_tokens, accepted + r.accepted_tokens
    return seqs, accepted / drafted if drafted else None


def project(dist: dict[tuple[int, ...], float], view: Sequence[int]) -> dict[tuple[int, ...], float]:
    """The distribution of the tokens at positions ``view``."""
    out: dict[tuple[int, ...], float] = {}
    for seq, prob in dist.items():
        key = tuple(seq[i] for i in view)
        out[key] = out.get(key, 0.0) + prob
    return out


def chi_square_p(observed: list[float], expected: list[float], df: int) -> float:
    """Pearson's chi-square p-value with ``df`` degrees of freedom."""
    stat = sum((o - e) ** 2 / e for o, e in zip(observed, expected))
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def pooled(cells: list, weight: Callable, least: float) -> list:
    """``cells`` minus the rarest ones, pooled until they (and each cell left) weigh ``least``."""
    cells, total, i = sorted(cells, key=weight), 0.0, 0
    while i < len(cells) and (total < least or weight(cells[i]) < least):
        total, i = total + weight(cells[i]), i + 1
    return cells[i:]


def fit_p(seqs: list[tuple[int, ...]], dist: dict[tuple[int, ...], float]) -> tuple[float, float]:
    """The chi-square p-value of ``seqs`` drawn from ``dist`` (cells expecting < 5 pooled,
    impossible sequences among them) and the total-variation distance between the two."""
    n, counts = len(seqs), Counter(seqs)
    kept = pooled(list(dist), lambda c: dist[c] * n, 5)
    observed = [counts[c] for c in kept]
    expected = [dist[c] * n for c in kept]
    p = chi_square_p(observed + [n - sum(observed)], expected + [n - sum(expected)], len(kept))
    tv = sum(abs(counts[c] / n - dist.get(c, 0.0)) for c in {*counts, *dist}) / 2
    return p, tv


def same_p(a: list[tuple[int, ...]], b: list[tuple[int, ...]]) -> float:
    """The chi-square p-value that ``a`` and ``b`` come from one distribution (equal sizes;
    cells with < 10 draws in all pooled)."""
    ca, cb = Counter(a), Counter(b)
    kept = pooled(list({*ca, *cb}), lambda c: ca[c] + cb[c], 10)
    rows = [(ca[c], cb[c]) for c in kept]
    rows.append((len(a) - sum(x for x, _ in rows), len(b) - sum(y for _, y in rows)))
    observed = [x for row in rows for x in row]
    expected = [(x + y) / 2 for x, y in rows for _ in (0, 1)]
    return chi_square_p(observed, expected, len(rows) - 1)


def assert_distribution(truth: dict[tuple[int, ...], float], plain: list[tuple[int, ...]],
                        spec: list[tuple[int, ...]]) -> None:
    """Each view (a token's marginal, joints of several) of the plain and speculative
    samples fits ``truth`` and the two fit each other (chi-square, p >= ``ALPHA``)."""
    failed = []
    for name, view in VIEWS.items():
        want = project(truth, view)
        cut = [[tuple(s[i] for i in view) for s in seqs] for seqs in (plain, spec)]
        (p_plain, tv_plain), (p_spec, tv_spec) = fit_p(cut[0], want), fit_p(cut[1], want)
        p_same = same_p(*cut)
        print(f"{name}: cells {len(want)}; exact vs plain p={p_plain:.3g} TV={tv_plain:.3f}; "
              f"vs speculative p={p_spec:.3g} TV={tv_spec:.3f}; plain vs speculative p={p_same:.3g}")
        if min(p_plain, p_spec, p_same) < ALPHA:
            failed.append(name)
    assert not failed, f"the tokens do not follow the big model's distribution at {failed}"


def test_speculative_sampling_draws_the_big_models_distribution(tiny_models, one_thread):
    big, near = tiny_models["big"], tiny_models["near"]
    truth = exact(lambda seq: big.prefill(TINY_PROMPT + list(seq)).logits, N_TOKENS)
    plain, _ = draw(CognitiveOrchestrator(big), 0, range(N_SAMPLES))
    spec, acceptance = draw(CognitiveOrchestrator(big, near), 3, range(10**6, 10**6 + N_SAMPLES))
    print(f"acceptance {acceptance:.3f}")
    assert_distribution(truth, plain, spec)
    assert 0.3 < acceptance < 0.8, "the drafter should be partly right"


def tiny_mixes(big: TransformersEngine) -> dict[str, Mix]:
    """Two random directions at layer 0 of the tiny model, each adding a delta of norm 0.05
    (its coefficient is 0.05 typical residual norms of layer 0 over that norm), which moves
    the sampled distribution by a total variation of about a third."""
    g = torch.Generator().manual_seed(3)
    norm0 = (big.residual_norms or residual.measure(big))[0]
    return {name: Mix.of(SteeringVector({0: (d := torch.randn(64, generator=g)) / d.norm()},
                                        big.identity, name), 0.05 / norm0) for name in ("up", "down")}


def even(tokens: Sequence[int]) -> bool:
    """The pre-step rule of the judged test: steer "up" after an even token."""
    return bool(tokens) and tokens[-1] % 2 == 0


def unsure(logits: torch.Tensor) -> bool:
    """The post-step rule of the judged test: re-run with "down" below 0.35 top probability."""
    return float(torch.softmax(logits, -1).max()) < 0.35


def judged_logits(big: TransformersEngine, mixes: dict[str, Mix],
                  seq: tuple[int, ...]) -> torch.Tensor:
    """The big model's logits for the step after ``seq`` as the non-speculative loop steers
    it with the judges ``even`` and ``unsure``: each step's pass with its pre-step mix, and
    re-run with "down" added where ``unsure`` fires on it."""
    def deltas(names):
        return {0: sum(mixes[n].snapshot(big).deltas[0] for n in names)} if names else None

    for t in range(len(seq) + 1):
        names = ["up"] if even(seq[:t]) else []
        for again in (False, True):
            if t == 0:
                out = big.prefill(TINY_PROMPT, deltas(names))
            else:
                if again:
                    big.rewind(1)
                out = big.step(seq[t - 1], deltas(names))
            if again or not unsure(out.logits):
                break
            names.append("down")
    return out.logits


@pytest.mark.parametrize("ahead", [False, True], ids=["pre-step judged when emitted", "judged ahead"])
def test_speculative_sampling_with_judges_draws_the_judged_distribution(tiny_models, one_thread,
                                                                        ended, ahead):
    big, near = tiny_models["big"], tiny_models["near"]
    mixes = tiny_mixes(big)
    truth = exact(lambda seq: judged_logits(big, mixes, seq), N_TOKENS)

    def judges():  # stateless: judged ahead on drafted tokens, each row steered as its step
        return [FunctionJudge(lambda ctx: even(ctx.tokens), mix="up", name="even", stateless=ahead),
                FunctionJudge(lambda ctx: unsure(ctx.big_logits), post_step=True, mix="down",
                              name="unsure")]

    plain, _ = draw(CognitiveOrchestrator(big, None, judges(), mixes=mixes), 0,
                    range(N_JUDGED))
    orch = CognitiveOrchestrator(big, near, judges(), mixes=mixes)
    spec, acceptance = draw(orch, 3, range(10**6, 10**6 + N_JUDGED))
    print(f"acceptance {acceptance:.3f}")
    assert_distribution(truth, plain, spec)
    ended.clear()
    for seed in range(5):
        orch.generate(TINY_PROMPT, max_new_tokens=32, ignore_eos=True, speculate=3,
                      sampling=SamplingConfig(seed=seed, **TINY_SAMPLING))
    assert {(kind, row > 0) for kind, row, _ in ended} == {("steering", True), ("rerun", False),
                                                          ("rerun", True)}
    # judged ahead, a block ends at a changed decision only at its last row (its state
    # comes with the verify); judged when emitted, at any row
    assert all(row == drafted for kind, row, drafted in ended if kind == "steering") == ahead


def replay(r, limit: int) -> list[int]:
    """The draft lengths ``DraftLength(limit)`` gives for ``r``'s acceptances and, at plain
    steps, the small model's greedy guesses (its top logit in the trace)."""
    draft, lengths, step = DraftLength(limit, paced=False), [], 0
    while step < len(r.steps):
        k = min(draft.k, len(r.steps) - step - 1)
        if step > 0 and k > 0:
            lengths.append(k)
            draft.after_draft(k, r.steps[step].accepted)
            step += r.steps[step].accepted + 1
        else:
            draft.after_plain(int(r.small_topk.ids[step, 0]), r.steps[step].token)
            step += 1
    return lengths


def test_speculative_sampling_is_seeded_and_adapts_the_draft_length(tiny_models):
    big = tiny_models["big"]
    config = SamplingConfig(seed=7, **TINY_SAMPLING)
    for drafter in ("near", "bad"):
        orch = CognitiveOrchestrator(big, tiny_models[drafter])
        a, b = (orch.generate(TINY_PROMPT, max_new_tokens=32, ignore_eos=True, speculate=4,
                              sampling=config, trace=TraceConfig(full_logits=True)) for _ in range(2))
        assert b.token_ids == a.token_ids
        assert [(s.drafted, s.accepted, s.sampler_prob) for s in b.steps] == [(s.drafted, s.accepted, s.sampler_prob)
                                                                      for s in a.steps]
        p = Sampler(config).probabilities
        for s in a.steps:  # the big model's probability, from the verify row on block steps
            assert s.sampler_prob == pytest.approx(float(p(a.big_logits[s.step])[s.token]), rel=1e-5)
            model = torch.softmax(a.big_logits[s.step].double(), -1)[s.token]  # raw, temperature 1
            assert s.model_prob == pytest.approx(float(model), rel=1e-5)
        lengths = [len(s.drafted) for s in a.steps if s.drafted]
        assert lengths == replay(a, 4)
        if drafter == "near":
            assert 0.2 < a.acceptance_rate < 0.9 and 4 in lengths[1:] and min(lengths) < 4
        else:
            assert lengths[:4] == [4, 3, 2, 1] and a.acceptance_rate < 0.2
            assert sum(1 for s in a.steps if not block_of(a, s.step)) >= 16  # mostly plain
        assert_caches(orch, a)


# ---------------------------------------------------------------- judges during a block


def counting(fn: Callable[[JudgeContext], bool | Verdict], name: str, mix: str,
             post_step: bool = False) -> tuple[FunctionJudge, list[tuple[int, tuple[int, ...]]]]:
    """A judge deciding by ``fn`` that notes each call's step and the tokens it saw."""
    calls: list[tuple[int, tuple[int, ...]]] = []

    def judge(ctx: JudgeContext) -> bool | Verdict:
        calls.append((ctx.step, tuple(ctx.tokens)))
        return fn(ctx)

    return FunctionJudge(judge, post_step=post_step, mix=mix, name=name), calls


def per_run(calls: list[tuple[int, tuple[int, ...]]]) -> list[list[tuple[int, tuple[int, ...]]]]:
    """The calls split into generations (each begins at step 0)."""
    runs: list[list[tuple[int, tuple[int, ...]]]] = []
    for call in calls:
        if call[0] == 0:
            runs.append([])
        runs[-1].append(call)
    return runs


@pytest.fixture()
def ended(monkeypatch) -> list[tuple[str, int, int]]:
    """Where speculative blocks end early, noted as they end: (kind, the row they end at,
    rows drafted); kind "steering" where the pre-step judges steer the row's step otherwise
    than the row ran, "rerun" where a post-step judge re-runs it."""
    seen: list[tuple[str, int, int]] = []
    cut = speculative.Block.cut

    def noted(block, big, mirror, fed):
        seen.append(("rerun" if fed else "steering", block.next, len(block.drafted)))
        return cut(block, big, mirror, fed)

    monkeypatch.setattr(speculative.Block, "cut", noted)
    return seen


def test_pre_step_judges_end_a_block_where_they_change_their_mind(engine, near, ctrl, vector, ended):
    probe = SteeringVector({15: vector.directions[15]}, near.identity, "happy-probe")
    never = ProbeJudge(probe, threshold=math.inf, mix="happy", name="probe")
    scout = CognitiveOrchestrator(engine, near, never, mixes={"happy": ctrl}).generate(
        PROMPT, max_new_tokens=24)
    threshold = float(scout.scores["probe"].median())
    count, calls = counting(lambda ctx: False, "count", "happy")
    judges = [ProbeJudge(probe, threshold=threshold, cooldown=1, mix="happy", name="probe"), count]
    orch = CognitiveOrchestrator(engine, near, judges, mixes={"happy": ctrl})
    plain, spec = pair(orch, 4, max_new_tokens=24, ignore_eos=True,
                       trace=TraceConfig(big_layers=LAYERS, small_layers=(15,)))
    assert_same(plain, spec)
    r = spec[0]
    assert 0 < int(r.steered.sum()) < len(r.steps), "the probe should flip during the generation"
    assert any(kind == "steering" for kind, _, _ in ended), "a changed decision should end a block"
    first, second = per_run(calls)
    assert second == first and [step for step, _ in first] == list(range(24))
    assert_caches(orch, r, big=False)


class EveryThird(Judge):
    """Turns ``mix`` on at every third call of a generation; keeps the steps it was called
    at (its state, checkpointed: what calls on drafts that were not emitted did is undone)."""

    def __init__(self, mix: str):
        self.name, self.turns_on, self.calls = "every-third", (mix,), []

    def decide(self, ctx: JudgeContext) -> Verdict:
        if ctx.step == 0:
            self.calls.clear()
        self.calls.append(ctx.step)
        return Verdict(len(self.calls), frozenset(self.turns_on) if len(self.calls) % 3 == 0 else NO_MIXES)

    def checkpoint(self) -> object:
        return len(self.calls)

    def restore(self, checkpoint: object) -> None:
        del self.calls[checkpoint:]


def test_checkpointed_judges_steer_each_row_of_a_block_as_its_step(engine, near, ctrl, vector, ended):
    """Judges whose state is checkpointed judge drafted tokens ahead: each verify row runs
    with its own step's steering, so a change of decision ends no block at a drafted row,
    and their state is put back where drafts were rejected (the probe's cooldown and
    hysteresis, and the counting judge, make each decision depend on the calls before)."""
    probe = SteeringVector({15: vector.directions[15]}, near.identity, "happy-probe")
    never = ProbeJudge(probe, threshold=math.inf, mix="happy", name="probe")
    scout = CognitiveOrchestrator(engine, near, never, mixes={"happy": ctrl}).generate(
        PROMPT, max_new_tokens=32)
    threshold = float(scout.scores["probe"].median())
    third = EveryThird("sad")
    judges = [ProbeJudge(probe, threshold=threshold, hysteresis=0.05 * abs(threshold), cooldown=1,
                         mix="happy", name="probe"), third]
    sad = Mix(engine.identity)
    sad.set("sad", vector, -0.6)
    orch = CognitiveOrchestrator(engine, near, judges, mixes={"happy": ctrl, "sad": sad})
    plain, spec = pair(orch, 4, max_new_tokens=32, ignore_eos=True,
                       trace=TraceConfig(big_layers=LAYERS, small_layers=(15,)))
    assert_same(plain, spec)
    r = spec[0]
    changes = [s.step for s, before in zip(r.steps[1:], r.steps) if s.mixes_on != before.mixes_on]
    inside = [c for c in changes if (b := block_of(r, c)) and b[0] < c]
    assert inside, "the probe should change its decision inside a block"
    assert r.accepted_tokens < r.drafted_tokens, "some drafts should be rejected"
    assert all(row == drafted for _, row, drafted in ended), f"blocks ended at drafted rows: {ended}"
    assert third.calls == list(range(32)), "once per emitted step, net of what was undone"
    assert_caches(orch, r, big=False)


def test_scheduled_steering_applies_at_its_steps_inside_blocks(engine, near, vector, ended):
    """An entry scheduled for steps 5-10 (``@after:5 @first:11``) steers those rows of a
    block and no others: the verify resolves each row at its own step, so the trace is the
    plain loop's and no block ends where the schedule starts or stops."""
    mix = Mix(engine.identity)
    mix.assign({"happy": MixEntry(vector, 0.6, None, schedule=Schedule(first=11, after=5))})
    orch = CognitiveOrchestrator(engine, near, steering=mix)
    plain, spec = pair(orch, 4, max_new_tokens=24, ignore_eos=True, trace=TraceConfig(big_layers=LAYERS))
    assert_same(plain, spec)
    r = spec[0]
    assert [s.step for s in r.steps if s.steered] == list(range(5, 11))
    def spanned(t: int) -> bool:  # handed out by a block begun before step t
        block = block_of(r, t)
        return block is not None and block[0] < t

    assert spanned(5) or spanned(11), "a block should span a switch of the schedule"
    assert not ended


@pytest.mark.parametrize("ahead", [False, True], ids=["pre-step judged when emitted", "judged ahead"])
def test_post_step_judges_rerun_inside_a_block(engine, near, ctrl, vector, ended, ahead):
    sad = Mix(engine.identity)
    sad.set("sad", vector, -0.6)
    mixes = {"happy": ctrl, "sad": sad}

    def top(ctx: JudgeContext) -> float:
        return float(torch.softmax(ctx.big_logits, -1).max())

    scout = CognitiveOrchestrator(engine, near, FunctionJudge(lambda c: Verdict(top(c)), post_step=True,
                                                              mix="sad", name="unsure"),
                                  mixes=mixes).generate(PROMPT, max_new_tokens=24)
    ranked = sorted(scout.scores["unsure"].tolist())
    threshold = (ranked[5] + ranked[6]) / 2  # between two scores: no tie to round across
    unsure, post_calls = counting(
        lambda c: Verdict(top(c), frozenset({"sad"}) if top(c) < threshold else NO_MIXES),
        "unsure", "sad", post_step=True)
    count, pre_calls = counting(lambda ctx: ctx.step % 7 == 3, "count", "happy")
    if ahead:  # checkpointed: what it judged past a re-run step is undone
        count = EveryThird("happy")
    orch = CognitiveOrchestrator(engine, near, [count, unsure], mixes=mixes)
    plain, spec = pair(orch, 4, max_new_tokens=24, ignore_eos=True, trace=TraceConfig(big_layers=LAYERS))
    assert_same(plain, spec)
    r = spec[0]
    assert any(kind == "rerun" and row > 0 for kind, row, _ in ended), \
        "a post-step judge should re-run a step inside a block"
    assert r.drafted_tokens > 0 and any(s.rerun for s in r.steps)
    for calls in (post_calls,) if ahead else (pre_calls, post_calls):
        first, second = per_run(calls)
        assert second == first and [step for step, _ in first] == list(range(24))
    if ahead:
        assert count.calls == list(range(24)), "once per emitted step, net of what was undone"
    assert_caches(orch, r, big=False)


# ---------------------------------------------------------------- pacing by wall time


def paced_run(block_s: float, plain_s: float, steps: int, spike: int | None = None,
              pace: speculative.Pace | None = None, warm_up: bool = True, accepted: bool = True,
              agree: bool = True, block=None) -> tuple[DraftLength, list[int], float]:
    """Drive a paced ``DraftLength(4, pace=pace, warm_up=warm_up)`` as the orchestrator does,
    with a fake wall clock: a block of ``k`` drafts takes ``block_s * (k + 1)`` (the block
    begun at step ``spike`` 10x longer) and yields ``k + 1`` tokens (``accepted``) or 1, or
    where ``block`` is given, ``block(k)`` is its (seconds, drafts kept, tokens handed out);
    a plain step takes
    ``plain_s``, the small model's guess right where ``agree``. Returns the draft length,
    the k of every unit and the wall seconds per token."""
    draft, now, step, ks = DraftLength(4, pace=pace or speculative.Pace(), warm_up=warm_up), 0.0, 1, []
    while step < steps:
        draft.clock(now, step)
        k = draft.k
        draft.begin(now, step, k)
        ks.append(k)
        if k:
            kept = k if accepted else 0
            seconds, kept, tokens = block(k) if block else (block_s * (k + 1), kept, kept + 1)
            draft.after_draft(k, kept)
            now += seconds * (10 if step == spike else 1)
            step += tokens
        else:
            draft.after_plain(1 if agree else 0, 1)
            now += plain_s
            step += 1
    return draft, ks, now / (step - 1)


def test_pacing_keeps_speculation_that_pays_and_pauses_what_does_not():
    fast, ks, _ = paced_run(block_s=0.004, plain_s=0.010, steps=200, spike=19)
    assert ks[:speculative.PACE_BASELINE] == [0] * speculative.PACE_BASELINE  # timing plain first
    assert all(k == 4 for k in ks[speculative.PACE_BASELINE:]) and not fast.pace.paused  # one slow block: kept
    slow, ks, _ = paced_run(block_s=0.012, plain_s=0.010, steps=300)
    blocks = [k for k in ks[speculative.PACE_BASELINE:] if k]
    # each length's first block is not timed (it may capture graphs); each length that does
    # not pay gives way to one a draft shorter, and where one draft does not pay either:
    assert blocks == [k for k in (4, 3, 2, 1) for _ in range(1 + speculative.PACE_BLOCKS)]
    # paused for good: even every draft kept (the guesses all right) cannot pay for blocks
    # this slow, so the pause is renewed untimed, not doubled
    assert slow.pace.paused and slow.pace.pause == 2 * speculative.PACE_PAUSE and slow.pace.cap == 1
    assert DraftLength(4, paced=False).k == 4  # unpaced: drafts from the first step


def test_pacing_drafts_shorter_where_long_drafts_do_not_pay():
    """Every draft accepted, but a judge that switches often ends each block after 3 tokens
    (the rest of the block is dropped): 4 drafts cost more per token than plain steps, 3
    less. The pace drafts 3 instead of pausing, and beats plain steps overall."""
    def block(k):  # 7 ms a row of the verify with its draft step; 3 tokens handed out at most
        return 0.007 * (k + 1), k, min(k + 1, 3)
    assert block(4)[0] / 3 > 0.010 * (1 + speculative.PACE_MARGIN) > block(3)[0] / 3
    draft, ks, per_token = paced_run(block_s=0, plain_s=0.010, steps=300, warm_up=False, block=block)
    settled = ks[speculative.PACE_BASELINE + speculative.PACE_BLOCKS:]
    assert ks[speculative.PACE_BASELINE:][:speculative.PACE_BLOCKS] == [4] * speculative.PACE_BLOCKS
    assert settled == [3] * len(settled) and draft.pace.cap == 3 and not draft.pace.paused
    assert per_token < 0.010


def test_a_retry_that_did_not_pay_doubles_the_pause():
    """Guesses right but drafts rejected (the evidence misleads): the pause ends in a
    timed retry, which pauses again for twice as long."""
    _, ks, _ = paced_run(block_s=0.006, plain_s=0.010, steps=400, warm_up=False, accepted=False)
    pauses = [len(run) for run in "".join("b" if k else "p" for k in ks).split("b") if len(run) > 1]
    assert pauses[1:3] == [speculative.PACE_PAUSE, 2 * speculative.PACE_PAUSE]


def test_a_retry_is_not_timed_where_the_guesses_say_it_would_lose():
    """``Pace.retry_would_lose``: blocks costing 3 plain steps lose at a guess rate where
    ``1 + a + ... + a^k`` tokens are fewer than 3, pay above it, and without enough guesses
    (or no block timed) the retry is timed."""
    pace = speculative.Pace()
    pace.plain.extend([0.010] * 8)
    pace.blocks.extend([(0.030, 4)] * 3)
    pace.guesses.extend([False] * speculative.PACE_GUESSES)
    assert pace.retry_would_lose()  # 1 token a block for 3 steps' time
    pace.guesses.extend([True] * speculative.PACE_GUESSES)
    assert not pace.retry_would_lose()  # 5 tokens a block
    pace.guesses.extend([True, False] * (speculative.PACE_GUESSES // 2))
    assert pace.retry_would_lose()  # a = 1/2: 1.94 tokens a block, under 3
    pace.guesses.clear()
    pace.guesses.extend([False] * (speculative.PACE_GUESSES // 2 - 1))
    assert not pace.retry_would_lose()  # too few guesses: time it


def test_the_pace_is_the_cost_per_token_of_all_recent_blocks_not_of_the_median_one():
    """One-draft blocks yielding 1 or 2 tokens for 1.05 plain steps each pay 21% in all;
    the median block (a 1-token one) alone would say they lose 5%. A unit over
    ``PACE_OUTLIER`` times the median's time (a graph capture) is left out."""
    pace = speculative.Pace()
    pace.plain.extend([0.010] * 8)
    pace.spec.extend([(0.0105, 1), (0.0105, 2), (0.0105, 1)])
    assert pace.cost_ratio() == pytest.approx(0.0315 / 4 / 0.010)
    assert not pace.speculation_slower()
    pace.spec.append((0.0105 * (speculative.PACE_OUTLIER + 1), 2))  # a capture's block
    assert pace.cost_ratio() == pytest.approx(0.0315 / 4 / 0.010)
    pace.spec.extend([(0.0105, 1)] * 8)  # every recent block yields one token: they lose
    assert pace.speculation_slower()


def paused_pace(agree_before: float, block_s: float = 0.012) -> speculative.Pace:
    """A pace paused for a full ``PACE_PAUSE`` after one-draft blocks of ``block_s`` (1.2
    plain steps), when a share ``agree_before`` of the small model's guesses were right
    (the right ones last)."""
    pace = speculative.Pace(cap=1)
    pace.plain.extend([0.010] * 8)
    pace.blocks.extend([(block_s, 1)] * 3)
    right = round(agree_before * speculative.PACE_GUESSES)
    pace.guesses.extend([False] * (speculative.PACE_GUESSES - right) + [True] * right)
    pace.start_pause(speculative.PACE_PAUSE)
    return pace


def test_a_pause_ends_early_where_the_guesses_during_it_agree_far_more():
    """Paused where a third of the guesses were right (say, a steered prose prompt), then
    every guess right (a code prompt, unsteered): a one-draft block would yield 2 tokens
    for 1.2 steps, so within ``PACE_FRESH`` plain steps the pause ends and blocks are
    timed, though the paused generation's own wrong guesses came after the pause began.
    Where the guesses were right before the pause as well, they misled then (drafts were
    rejected), so the same guesses do not end it."""
    pace = paused_pace(1 / 3)
    for _ in range(12):  # wrong guesses in the paused generation: the next one's count alone
        pace.guess(False)
    _, ks, _ = paced_run(block_s=0.004, plain_s=0.010, steps=60, pace=pace, warm_up=False)
    # after j plain steps the last 8 guesses hold j right ones: 5/8 clears 11/32 + 0.2
    assert ks.index(1) == 5 and not pace.paused and sum(k > 0 for k in ks) > 10
    misled = paused_pace(1.0)
    _, ks, _ = paced_run(block_s=0.004, plain_s=0.010, steps=60, pace=misled, warm_up=False)
    assert ks == [0] * len(ks) and misled.paused
    assert not paused_pace(1 / 3).conditions_changed()  # no guess made during the pause yet
    dear = paused_pace(1 / 3, block_s=0.025)  # a one-draft block costs 2.5 steps: 2 tokens lose
    _, ks, _ = paced_run(block_s=0.004, plain_s=0.010, steps=30, pace=dear, warm_up=False)
    assert ks == [0] * len(ks) and dear.paused


def test_pacing_times_the_first_block_where_no_graph_is_captured():
    _, ks, _ = paced_run(block_s=0.012, plain_s=0.010, steps=200, warm_up=False)
    blocks = [i for i, k in enumerate(ks) if k]
    timed = 4 * speculative.PACE_BLOCKS  # lengths 4, 3, 2 and 1, each timed from its first block
    assert blocks[:timed] == list(range(3, 3 + timed))
    assert ks[3 + timed:][:speculative.PACE_PAUSE] == [0] * speculative.PACE_PAUSE


def test_a_kept_pace_starts_the_next_generation_where_the_last_left_off():
    pace = speculative.Pace()  # blocks that do not pay, guesses that say they would (a retry is timed)
    first, _, _ = paced_run(block_s=0.006, plain_s=0.010, steps=30, pace=pace, warm_up=False, accepted=False)
    left = pace.paused
    assert 0 < left < speculative.PACE_PAUSE  # paused in the first generation, part of it served
    _, ks, _ = paced_run(block_s=0.006, plain_s=0.010, steps=100, pace=pace, warm_up=False, accepted=False)
    # no new baseline: the rest of the pause, then a retry of one draft
    assert ks[:left] == [0] * left and ks[left] == 1
    fresh, ks, _ = paced_run(block_s=0.004, plain_s=0.010, steps=30, pace=speculative.Pace(), warm_up=False)
    assert ks[:speculative.PACE_BASELINE] == [0] * speculative.PACE_BASELINE and not fresh.pace.paused


def test_paced_generation_times_plain_steps_first_and_keeps_greedy(engine, small, monkeypatch):
    monkeypatch.setattr(CognitiveOrchestrator, "pace_speculation", True)
    orch = CognitiveOrchestrator(engine, small)
    plain, spec = pair(orch, 4, max_new_tokens=20, ignore_eos=True)
    assert_same(plain, spec)
    r = spec[0]
    first = min(s.step for s in r.steps if s.drafted)
    assert first == 1 + speculative.PACE_BASELINE  # steps 1-3 are timed plain steps
