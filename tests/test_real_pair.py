"""The real tier: the two-model features on real weights, Qwen2.5-Coder-1.5B-Instruct (big)
with -0.5B-Instruct (small, same tokenizer), fetched by ``make real-pair``.

Skipped (saying so) unless the pair is fetched, ``MAX_JUPYTER_REAL=1`` or ``CI=true``; in
the last two cases the fixture fetches what is missing (``pair.fetch``) and never skips.
Generations stay short (1-24 tokens): the tier runs in minutes on a 2-core CPU.
"""
from __future__ import annotations

import itertools
import os

import pytest
import torch

from conftest import assert_mirrors
from max_jupyter import pair
from max_jupyter.engines import TransformersEngine
from max_jupyter.engines.cpu_linear import Int8Linear
from max_jupyter.loading import resolve_name
from max_jupyter.orchestrator import ProbeJudge, TraceConfig
from max_jupyter.session import Session
from max_jupyter.steering.mix import Mix
from max_jupyter.steering.training import read_reply_states, train_vector

pytestmark = [pytest.mark.real, pytest.mark.slow]  # the real pair: minutes of CPU (make test-fast leaves it out)

REQUIRED = os.environ.get("MAX_JUPYTER_REAL") == "1" or os.environ.get("CI", "").lower() == "true"
CODE = "Write a Python function is_prime(n) that tests whether n is prime."
PROSE = "Explain in two sentences why the sky is blue."

# Sentiment pairs: the probe for the small model and the vector for the big one.
HAPPY = ["I am so happy today, everything is wonderful.", "What a delightful, joyful surprise!",
         "This is the best day of my life.", "I love this beautiful sunny morning.",
         "The party was fantastic and everyone smiled.", "I feel cheerful and grateful.",
         "Great news: we won, and I am thrilled!", "Such a lovely, warm and happy moment."]
SAD = ["I am so sad today, everything is awful.", "What a miserable, painful shock.",
       "This is the worst day of my life.", "I hate this gloomy, cold morning.",
       "The party was a disaster and everyone cried.", "I feel gloomy and bitter.",
       "Bad news: we lost, and I am heartbroken.", "Such a bleak, cold and lonely moment."]
# Held out: prompts whose answers the labels call happy (1) or sad (0).
JUDGED = [("Write one sentence about a wedding day that went perfectly.", 1),
          ("Write one sentence about winning a prize you had hoped for.", 1),
          ("Write one sentence about a child laughing at a puppy.", 1),
          ("Write one sentence about a surprise party your friends threw for you.", 1),
          ("Write one sentence about the first warm day of spring.", 1),
          ("Write one sentence about getting your dream job.", 1),
          ("Write one sentence about a funeral on a rainy day.", 0),
          ("Write one sentence about losing your job unexpectedly.", 0),
          ("Write one sentence about a lonely old man whose dog died.", 0),
          ("Write one sentence about failing an exam you studied hard for.", 0),
          ("Write one sentence about a house destroyed by a flood.", 0),
          ("Write one sentence about being betrayed by a close friend.", 0)]
# Held out for the vector: next-token mood after neutral openings (raw text, no chat).
OPENINGS = ["My visit to the museum yesterday was", "The new neighbours next door are",
            "Honestly, the weekend at my aunt's house was", "The meeting this morning felt"]
GOOD = [" wonderful", " great", " lovely", " amazing", " fantastic", " delightful", " nice"]
BAD = [" terrible", " awful", " horrible", " bad", " boring", " sad", " miserable"]
PROBE_LAYER, VECTOR_LAYERS = 14, (10, 11, 12, 13, 14, 15, 16, 17)


@pytest.fixture(scope="module")
def session():
    fetched = all(pair.gguf_path(m).is_file() for m in pair.PINNED.values())
    if not (fetched or REQUIRED):
        pytest.skip("the real pair is not fetched: run `make real-pair` (or set MAX_JUPYTER_REAL=1 "
                    "to fetch it here, ~1.6 GB)")
    for model in pair.PINNED.values():
        pair.fetch(model)
    with Session.load("qwen2.5-coder-1.5b", small="qwen2.5-coder-0.5b", store=None,
                      progress=False) as s:
        yield s


@pytest.fixture(scope="module")
def happy(session):
    return session.train("happy", HAPPY, SAD, layers=VECTOR_LAYERS, progress=False)


def int8_linears(engine) -> bool:
    """Whether ``engine``'s linear layers run on int8 weights (``dtype="int8"``)."""
    return any(isinstance(m, Int8Linear) for m in engine.model.modules())


def test_the_pair_loads_with_one_vocabulary(session):
    """By name on the CPU: the 1.5B in fp32 (the GGUF's weights), the 0.5B in int8
    (``pair.SMALL_CPU_DTYPE``)."""
    assert int8_linears(session.small) and not int8_linears(session.big)
    big, small = session.big.identity, session.small.identity
    assert (big.num_layers, big.hidden_size, small.num_layers, small.hidden_size) == (28, 1536, 24, 896)
    assert big.vocab_size == small.vocab_size and 151645 in session.big.tokenizer.eos_ids
    assert session.big.tokenizer.chat(CODE) == session.small.tokenizer.chat(CODE)
    r = session.generate(CODE, max_new_tokens=24)
    assert "def is_prime(n" in r.text, r.text


@pytest.fixture(scope="module")
def fp32_small_session(session):
    """The same 1.5B watched by the 0.5B in fp32, its GGUF's weights (``Session.load(...,
    dtype=(None, "float32"))`` loads this pair; here the big engine is shared, so it is not
    loaded twice). The cache checks against fresh prefills run here: an int8 model's rows
    differ with their neighbours (``Int8Linear``: up to about 1.4 in the 0.5B's logits
    between a step and a prefill), fp32's by rounding."""
    small = TransformersEngine.load(resolve_name("qwen2.5-coder-0.5b"), device="cpu", dtype=torch.float32)
    with Session(session.big, small, vectors=session.vectors) as s:
        yield s


def test_the_mirror_stays_in_step(fp32_small_session):
    s = fp32_small_session
    r = s.generate(PROSE, max_new_tokens=12, trace=TraceConfig(small_layers=(PROBE_LAYER,)))
    assert r.small_ids == r.prompt_ids + r.token_ids
    assert r.small_hidden[PROBE_LAYER].shape == (len(r.steps), 896)
    assert_mirrors(s.small, r.small_ids)
    assert_mirrors(s.big, r.prompt_ids + r.token_ids[:-1])


@pytest.mark.parametrize("steered", [False, True])
def test_greedy_speculation_equals_plain_greedy(fp32_small_session, happy, unpaced, steered):
    s, steering = fp32_small_session, {"happy": 1.0} if steered else None
    plain = s.generate(CODE, max_new_tokens=24, ignore_eos=True, steering=steering)
    fast = s.generate(CODE, max_new_tokens=24, ignore_eos=True, steering=steering, speculate=4)
    assert fast.token_ids == plain.token_ids and fast.text == plain.text
    assert fast.small_ids == plain.small_ids and fast.speculate_off is None
    assert all(st.steered for st in fast.steps) == steered
    assert fast.drafted_tokens > 0 and fast.acceptance_rate > 0.3, fast.acceptance_rate
    print(f"\nspeculate=4 {'steered' if steered else 'plain'}: acceptance {fast.acceptance_rate:.2f}")
    assert_mirrors(s.small, fast.small_ids)
    if not steered:  # a steered cache has no unsteered prefill to compare with
        assert_mirrors(s.big, fast.prompt_ids + fast.token_ids[:-1])


@pytest.mark.parametrize("steered", [False, True])
def test_the_int8_small_model_drafts_and_keeps_greedy(session, happy, unpaced, steered):
    """The int8 0.5B (the default on the CPU) mirrors and drafts for the fp32 1.5B: the
    tokens are plain greedy's (without a small model at all), the small cache holds every
    token once, the big cache is exact, and its drafts are kept about as often as the fp32
    0.5B's (0.5-0.9 here, by the prompt)."""
    steering = {"happy": 1.0} if steered else None
    plain = session.generate(CODE, max_new_tokens=24, ignore_eos=True, steering=steering, mirror=False)
    fast = session.generate(CODE, max_new_tokens=24, ignore_eos=True, steering=steering, speculate=4)
    assert fast.token_ids == plain.token_ids and fast.speculate_off is None
    assert fast.small_ids == fast.prompt_ids + fast.token_ids and session.small.seq_len == len(fast.small_ids)
    assert fast.drafted_tokens > 0 and fast.acceptance_rate > 0.3, fast.acceptance_rate
    print(f"\nint8 small model, speculate=4 {'steered' if steered else 'plain'}: acceptance {fast.acceptance_rate:.2f}")
    if not steered:
        assert_mirrors(session.big, fast.prompt_ids + fast.token_ids[:-1])


def auroc(scores: list[float], labels: list[int]) -> float:
    """P(a random positive scores above a random negative), ties counting half."""
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    return sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))


def reply_scores(small, texts: list[str], unit: torch.Tensor) -> torch.Tensor:
    """Per text, with it as the reply to a chat prompt: the mean over its tokens of the
    small model's residual at ``PROBE_LAYER`` projected on ``unit`` (what the judge scores
    at each step)."""
    return read_reply_states(small, texts, [PROBE_LAYER])[:, 0] @ unit


@pytest.mark.parametrize("small_dtype", ["fp32", "int8"])
def test_a_small_models_probe_judges_the_big_models_text(request, small_dtype):
    """The probe is trained on the 0.5B alone, then reads the 0.5B's mirror of what the
    1.5B writes for held-out prompts; the 0.5B in int8 (the default), and in fp32
    (``fp32_small_session``).
    Floor 0.8: with 6 + 6 generations, labels shuffled at random reach it with probability
    0.047 (exact, over the 924 splits, printed). Measured in fp32: AUROC 1.0 (p = 0.001);
    the judge fired on 0.81 of happy steps and 0.32 of sad steps."""
    session = request.getfixturevalue("session" if small_dtype == "int8" else "fp32_small_session")
    probe = train_vector(session.small, HAPPY, SAD, layers=[PROBE_LAYER], method="mean_diff")
    unit = probe.directions[PROBE_LAYER].float() / probe.directions[PROBE_LAYER].float().norm()
    # The threshold: midway between the training sentences' scores read as replies (bare
    # sentences read at their last token sit far from where the judge reads generated text).
    threshold = float(reply_scores(session.small, HAPPY, unit).mean()
                      + reply_scores(session.small, SAD, unit).mean()) / 2
    judge = ProbeJudge(probe, threshold=threshold, name="happy-probe", mix="watch")
    session.mixes["watch"] = Mix(session.big.identity)  # empty: firing changes no token
    means, fired, labels = [], [], []
    for prompt, label in JUDGED:
        r = session.generate(prompt, max_new_tokens=12, judges=[judge])
        scores = r.scores["happy-probe"][1:]  # step 0 reads the prompt's end, not the reply
        means.append(float(scores.mean()))
        fired.append(float((scores > threshold).float().mean()))
        labels.append(label)
    area = auroc(means, labels)
    chance = sum(auroc(means, [int(i in pos) for i in range(len(labels))]) >= area
                 for pos in itertools.combinations(range(len(labels)), sum(labels))) / 924
    fired_on = [sum(f for f, y in zip(fired, labels) if y == c) / labels.count(c) for c in (1, 0)]
    print(f"\n{small_dtype} probe@{PROBE_LAYER} on the 1.5B's text: held-out AUROC {area:.3f} (chance p={chance:.3f}); "
          f"fires on {fired_on[0]:.2f} of happy steps, {fired_on[1]:.2f} of sad steps; "
          f"threshold {threshold:.2f}, mean scores {[round(m, 2) for m in means]}")
    assert area >= 0.8
    assert fired_on[0] > 0.5 > fired_on[1]  # on for most happy steps, off for most sad ones


def mood(session, opening: str, steering) -> float:
    """log P(a happy word) - log P(a sad word) for the big model's next token after ``opening``."""
    r = session.generate(opening, max_new_tokens=1, chat=False, steering=steering,
                         trace=TraceConfig(full_logits=True))
    logp = torch.log_softmax(r.big_logits[0].float(), -1)
    ids = lambda words: [session.big.tokenizer.encode(w)[0] for w in words]
    return float(torch.logsumexp(logp[ids(GOOD)], 0) - torch.logsumexp(logp[ids(BAD)], 0))


def test_a_vector_trained_on_the_big_model_moves_a_held_out_measure(session, happy):
    """Trained on sentences, measured on openings it never saw: +happy raises the odds of a
    happy next word over a sad one at every opening, -happy lowers them."""
    rows = [(mood(session, o, {"happy": -1.0}), mood(session, o, None), mood(session, o, {"happy": 1.0}))
            for o in OPENINGS]
    print("\nlog-odds happy/sad word (-happy, none, +happy): " +
          "; ".join(" ".join(f"{v:+.2f}" for v in row) for row in rows))
    assert all(minus < base < plus for minus, base, plus in rows)


def test_the_small_models_french_probe_reads_the_big_models_english_as_english(session):
    """The concept probe, fitted on the 0.5B from short labelled sentences, reads the 1.5B's
    answers (chat openings, lists, off the sentences' domain) by their language: English
    unprompted, French when asked for French. Scaling each feature by its own spread
    (``SCALE_SHRINK = 0``) read these English answers as P(french) 0.5 on average."""
    from max_jupyter.steering.concepts import concept

    found, probe, reader = concept("french"), session.probe("french"), session.reader
    prompts = list(found.prompts[:6])

    def p_french(system):
        results = session.generate_batch(prompts, max_new_tokens=24, system=system, progress=False)
        # read after the user's prompt alone, as the evaluation reads prompting's answers
        readings = session.run(lambda s: [probe.read(reader, reader.tokenizer.chat(p), r.token_ids)
                                          for p, r in zip(prompts, results)])
        return [float(reading[-1]) for reading in readings]

    english, french = p_french(None), p_french(found.system)
    print(f"\nP(french) of the 1.5B's answers: unprompted {english}, asked for French {french}")
    assert max(english) < 0.5 and sum(english) / len(english) < 0.2
    assert min(french) > 0.5 and sum(french) / len(french) > 0.8
