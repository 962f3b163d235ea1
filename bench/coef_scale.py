"""What a steering coefficient does, per model: the table behind docs/vectors.md's
"Coefficients" section.

Trains the quickstart's joyful/gloomy vector (``svd_diff``) on a model, then, per
coefficient, generates the quickstart prompt greedily and reads a held-out mood measure
(log P(happy word) - log P(sad word) after neutral openings, as tests/test_real_pair.py).
Prints one row per coefficient: the mood shift from the unsteered run, the text's
degeneracy (evaluation/degeneracy.py; >= 0.5 is collapsed) and the text.

    python bench/coef_scale.py                       # the embedded SmolLM2-135M
    python bench/coef_scale.py qwen2.5-coder-1.5b    # needs `make real-pair`
"""
from __future__ import annotations

import argparse

import torch
import transformers

from max_jupyter import Session
from max_jupyter.evaluation.degeneracy import degeneracy
from max_jupyter.jupyter.render import token_pieces
from max_jupyter.orchestrator.trace import TraceConfig
from max_jupyter.quickstart import GLOOMY, JOYFUL, PROMPT

OPENINGS = ["My visit to the museum yesterday was", "The new neighbours next door are",
            "Honestly, the weekend at my aunt's house was", "The meeting this morning felt"]
GOOD = [" wonderful", " great", " lovely", " amazing", " fantastic", " delightful", " nice"]
BAD = [" terrible", " awful", " horrible", " bad", " boring", " sad", " miserable"]
LAYERS = {"qwen2.5-coder-1.5b": range(10, 18)}
"""Steered layers per model (the middle of the stack); others: the quickstart's 12..15."""


def mood(session: Session, steering) -> float:
    """Mean over ``OPENINGS`` of the next token's log-odds of a happy word over a sad one."""
    ids = [[session.big.tokenizer.encode(w)[0] for w in words] for words in (GOOD, BAD)]
    total = 0.0
    for opening in OPENINGS:
        r = session.generate(opening, max_new_tokens=1, chat=False, steering=steering,
                             trace=TraceConfig(full_logits=True))
        logp = torch.log_softmax(r.big_logits[0].float(), -1)
        total += float(torch.logsumexp(logp[ids[0]], 0) - torch.logsumexp(logp[ids[1]], 0))
    return total / len(OPENINGS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", nargs="?", default=None, help="a model name (default: embedded)")
    parser.add_argument("--coefs", default="0,0.1,0.25,0.5,0.75,1,1.5,2,-0.5,-1")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--layers", default=None, help="e.g. 12-15 (default: per model)")
    args = parser.parse_args()
    transformers.utils.logging.disable_progress_bar()
    with Session.load(args.model, store=None, progress=False) as session:
        if args.layers:
            first, _, last = args.layers.partition("-")
            layers = range(int(first), int(last or first) + 1)
        else:
            layers = LAYERS.get(args.model, range(12, 16))
        vector = session.train("joyful", JOYFUL, GLOOMY, layers=layers, progress=False)
        norms = session.big.residual_norms
        raw = sum(n / norms[l] for l, n in vector.norms().items())
        print(f"{session.big.identity.describe()}; joyful (svd_diff) at layers {list(vector.layers)}; "
              f"raw coefficient 1 = {raw:.2f} here; prompt {PROMPT!r}, greedy, {args.tokens} tokens")
        base = mood(session, None)
        print(f"{'coef':>6} {'mood':>6} {'degen':>6}  text")
        for coef in [float(c) for c in args.coefs.split(",")]:
            steering = {"joyful": coef} if coef else None
            r = session.generate(PROMPT, max_new_tokens=args.tokens, steering=steering)
            score = degeneracy(token_pieces(session.big.tokenizer, r.token_ids)).score
            shift = mood(session, steering) - base
            print(f"{coef:>+6g} {shift:>+6.2f} {score:>6.2f}  {r.text!r}", flush=True)


if __name__ == "__main__":
    main()
