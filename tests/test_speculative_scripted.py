"""Speculative decoding on scripted engines: a drafter (``ScriptedEngine(agreement=a)``, the
big model's weights with a second token on top in about ``1 - a`` of contexts) drafts for
the big model. Greedy gives the plain loop's tokens whatever the agreement, with judges and
steering too; each block's acceptance is the drafted prefix the big model kept; both caches
end holding the context (rejected tails rewound), also when EOS, a stop string or an
interrupt ends a block."""
from __future__ import annotations

import pytest

from max_jupyter.orchestrator import CognitiveOrchestrator, FunctionJudge
from max_jupyter.orchestrator.speculative import PACE_BASELINE, PACE_BLOCKS, PACE_PAUSE
from max_jupyter.session import Session
from max_jupyter.steering import SteeringVector
from max_jupyter.testing import ScriptedEngine

PROMPT = "Tell me about rain."


@pytest.fixture(scope="module")
def big() -> ScriptedEngine:
    return ScriptedEngine(seed=0)


@pytest.fixture(autouse=True)
def no_hooks(big):
    yield
    big.before_forward = None


def orchestrator(big, drafter, **args) -> CognitiveOrchestrator:
    orch = CognitiveOrchestrator(big, drafter, **args)
    orch.pace_speculation = False  # draft by acceptance alone: the same blocks on any machine
    return orch


def check_blocks(result) -> int:
    """Each block's ``accepted`` is the length of the drafted prefix that the generation's
    tokens then followed; returns the number of blocks."""
    tokens, blocks = result.token_ids, 0
    for i, record in enumerate(result.steps):
        if not record.drafted:
            continue
        blocks += 1
        following = [r.token for r in result.steps[i:i + len(record.drafted) + 1]]
        agree = 0
        while agree < min(len(record.drafted), len(following)) and record.drafted[agree] == following[agree]:
            agree += 1
        assert record.accepted == agree, (i, record)
    assert len(tokens) <= len(result.steps)
    return blocks


@pytest.mark.parametrize("early", [False, True], ids=["feed-if-kept", "feed-during-verify"])
@pytest.mark.parametrize("agreement", [1.0, 0.7, 0.3, 0.0])
def test_greedy_speculation_gives_the_plain_tokens(agreement, early):
    """``early``: engines that launch asynchronously, whose drafter gets its last draft
    token while the big model verifies (taken back on a rejection)."""
    big = ScriptedEngine(seed=0, launches_async=early)
    drafter = ScriptedEngine(seed=0, agreement=agreement, launches_async=early)
    plain = CognitiveOrchestrator(big).generate(PROMPT, max_new_tokens=48)
    spec = orchestrator(big, drafter).generate(PROMPT, max_new_tokens=48, speculate=4)
    assert spec.speculate_off is None
    assert spec.token_ids == plain.token_ids and spec.text == plain.text
    blocks = check_blocks(spec)
    assert drafter.cached_ids == spec.small_ids == spec.prompt_ids + spec.token_ids
    assert big.cached_ids == (spec.prompt_ids + spec.token_ids)[:big.seq_len]
    assert big.seq_len >= len(spec.prompt_ids) + len(spec.token_ids) - 1
    if agreement == 1.0:  # every draft kept, each block one longer up to the limit
        assert spec.accepted_tokens == spec.drafted_tokens > 30 and blocks < 15
    elif agreement == 0.0:  # every draft rejected at once, each one shorter; then none
        assert spec.accepted_tokens == 0 and spec.drafted_tokens == 4 + 3 + 2 + 1
    else:
        assert 0 < spec.accepted_tokens < spec.drafted_tokens


def test_acceptance_follows_the_drafters_agreement(big):
    rates = []
    for agreement in (0.9, 0.5):
        spec = orchestrator(big, ScriptedEngine(seed=0, agreement=agreement)).generate(
            PROMPT, max_new_tokens=120, speculate=3)
        rates.append(spec.acceptance_rate)
    assert rates[0] > rates[1] > 0


def test_judges_and_steering_give_the_plain_tokens(big):
    """A pre-step judge switching a mix mid-block and a post-step judge re-running steps:
    the blocks end where the decision changes, and every token is the plain loop's."""
    token = big.tokenizer.encode(" the")[0]
    push = SteeringVector({2: big.direction(token, 30.0)}, big.identity, "push")
    live = SteeringVector({1: big.direction(big.tokenizer.encode(" st")[0], 3.0)}, big.identity, "live")

    def judges():
        return [FunctionJudge(lambda ctx: 9 <= ctx.step < 14, mix="push", name="pre"),
                FunctionJudge(lambda ctx: ctx.step in (20, 27), post_step=True, mix="push", name="post")]

    args = dict(mixes={"push": push}, steering=live)
    plain = CognitiveOrchestrator(big, judges=judges(), **args).generate(PROMPT, max_new_tokens=40)
    drafter = ScriptedEngine(seed=0, agreement=0.8)
    spec = orchestrator(big, drafter, judges=judges(), **args).generate(PROMPT, max_new_tokens=40,
                                                                        speculate=5)
    assert spec.token_ids == plain.token_ids
    assert [(r.mixes_on, r.rerun, r.unsteered_token) for r in spec.steps] \
        == [(r.mixes_on, r.rerun, r.unsteered_token) for r in plain.steps]
    assert spec.drafted_tokens > 0 and check_blocks(spec) > 2
    assert drafter.cached_ids == spec.small_ids


def interrupt_at(n: int):
    """A ``before_forward`` hook raising ``KeyboardInterrupt`` at the ``n``-th pass."""
    calls = []

    def hook(ids):
        calls.append(ids)
        if len(calls) == n:
            raise KeyboardInterrupt
    return hook


@pytest.mark.parametrize("end", ["eos", "stop", "interrupted"])
def test_an_end_inside_a_block_rewinds_both_caches(end):
    ids = ScriptedEngine().tokenizer.chat(PROMPT)
    eos_at = len(ids) + 13 if end == "eos" else None
    big = ScriptedEngine(eos_at=eos_at)
    drafter = ScriptedEngine(agreement=1.0, eos_at=eos_at, seed=0)
    free = CognitiveOrchestrator(big).generate(PROMPT, max_new_tokens=30)
    stop = [free.text[len(free.text) // 2:len(free.text) // 2 + 2]] if end == "stop" else []
    if end == "interrupted":
        big.before_forward = interrupt_at(5)
    spec = orchestrator(big, drafter).generate(PROMPT, max_new_tokens=30, speculate=6, stop=stop)
    assert spec.finish_reason == end
    assert spec.token_ids == free.token_ids[:len(spec.token_ids)]
    assert any(r.drafted for r in spec.steps)
    assert drafter.cached_ids == spec.small_ids
    assert drafter.cached_ids == (spec.prompt_ids + free.token_ids)[:drafter.seq_len]
    assert big.cached_ids == (spec.prompt_ids + free.token_ids)[:big.seq_len]
    assert big.seq_len <= len(spec.prompt_ids) + len(spec.token_ids) + 1


def test_speculation_is_off_and_says_why_where_it_cannot_run(big):
    alone = CognitiveOrchestrator(big).generate(PROMPT, max_new_tokens=4, speculate=4)
    assert alone.speculate_off == "there is no small model to draft" and alone.drafted_tokens == 0
    other = ScriptedEngine(seed=3, vocab_size=290)
    mirrored = CognitiveOrchestrator(big, other).generate(PROMPT, max_new_tokens=4, speculate=4)
    assert mirrored.speculate_off == "the small model's vocabulary differs from the big model's"
    assert mirrored.token_ids == alone.token_ids


def test_a_session_keeps_the_pace_so_speculation_that_does_not_pay_stays_paused(monkeypatch):
    """Where a verify costs per token fed (a CPU's: here 4 ms a token on a clock the engines
    advance, so the machine's load cannot blur it), drafting does not pay: the first
    generation times plain steps, then blocks, and pauses it; the Session keeps that pace,
    so the next generation starts paused instead of timing it all again."""
    clock = [0.0]
    monkeypatch.setattr(CognitiveOrchestrator, "pace_clock", staticmethod(lambda: clock[0]))
    big, small = ScriptedEngine(seed=0), ScriptedEngine(seed=0, agreement=0.5)
    big.before_forward = lambda ids: clock.__setitem__(0, clock[0] + 0.004 * len(ids))
    small.before_forward = lambda ids: clock.__setitem__(0, clock[0] + 0.001 * len(ids))
    with Session(big, small, vectors={}) as s:
        first = s.generate(PROMPT, max_new_tokens=40, ignore_eos=True, speculate=4)
        blocks = [r.step for r in first.steps if r.drafted]
        assert blocks and blocks[0] == 1 + PACE_BASELINE  # timed plain steps, then drafted
        # each timed (no CUDA graph to capture first); shorter drafts lose too, then paused
        assert len(blocks) >= PACE_BLOCKS and s._pace.cap == 1
        left = s._pace.paused
        assert 0 < left <= PACE_PAUSE  # paused, and not yet served in full
        second = s.generate(PROMPT, max_new_tokens=left, ignore_eos=True, speculate=4)
        assert not any(r.drafted for r in second.steps) and second.token_ids == first.token_ids[:left]
