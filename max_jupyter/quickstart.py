"""Quickstart: a Session on the embedded model generates, then generates again steered by
a vector it trains from a handful of contrastive pairs. Run with
``python -m max_jupyter.quickstart``."""
from __future__ import annotations

import time

import transformers

from max_jupyter import Session

JOYFUL = [
    "I feel wonderful, everything today is bright and full of joy.",
    "What a delightful morning, I can't stop smiling!",
    "We laughed and danced all night, it was pure happiness.",
    "The sun is shining and my heart is light and cheerful.",
    "I am thrilled, this is the best news I've ever had!",
    "Life is beautiful and I'm grateful for every moment.",
    "Her laughter filled the room with warmth and delight.",
    "I'm overjoyed, everything worked out perfectly.",
]
GLOOMY = [
    "I feel terrible, everything today is dark and full of sorrow.",
    "What a miserable morning, I can't stop crying.",
    "We sat in silence all night, it was pure despair.",
    "The sky is grey and my heart is heavy and sad.",
    "I am devastated, this is the worst news I've ever had.",
    "Life is bleak and I dread every moment.",
    "Her sobbing filled the room with cold and grief.",
    "I'm heartbroken, everything went wrong.",
]
PROMPT = "Describe your walk in the park this morning in two sentences."
LAYERS = range(12, 16)
COEF = 0.35


def main() -> None:
    transformers.utils.logging.disable_progress_bar()
    start = time.perf_counter()
    session = Session.load(store=None)  # vectors in memory here; by default they persist
    print(f"loaded {session.big.identity.describe()} on {session.big.device} in "
          f"{time.perf_counter() - start:.1f} s\n")

    vector = session.train("joyful", JOYFUL, GLOOMY, layers=LAYERS)
    print(f"trained {vector}\n")

    for title, coef in [("plain", 0.0), (f"steered +{COEF} joyful", COEF),
                        (f"steered -{COEF} joyful", -COEF)]:
        print(f"--- {title} ---")
        result = session.generate(PROMPT, max_new_tokens=60, steering={"joyful": coef},
                                  on_text=lambda piece: print(piece, end="", flush=True))
        print(f"\n[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s, "
              f"{result.finish_reason}]\n")
    session.close()


if __name__ == "__main__":
    main()
