"""Quickstart: the embedded model generates, then generates again steered by a vector it
trains from a handful of contrastive pairs. Run with ``python -m max_jupyter.quickstart``."""
from __future__ import annotations

import time

import transformers

from max_jupyter.engines import TransformersEngine
from max_jupyter.orchestrator import generate
from max_jupyter.steering import train_vector

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
    engine = TransformersEngine.load()
    print(f"loaded {engine.identity.describe()} on {engine.device} in {time.perf_counter() - start:.1f} s\n")

    vector = train_vector(engine, JOYFUL, GLOOMY, layers=LAYERS, label="joyful-vs-gloomy")
    print(f"trained {vector}\n")

    options = dict(max_new_tokens=60)
    for title, steering in [("plain", None), (f"steered +{COEF} joyful", COEF * vector),
                            (f"steered -{COEF} joyful", -COEF * vector)]:
        print(f"--- {title} ---")
        result = generate(engine, PROMPT, steering=steering,
                          on_text=lambda piece: print(piece, end="", flush=True), **options)
        print(f"\n[{len(result.token_ids)} tokens, {result.tokens_per_s:.1f} tok/s, "
              f"{result.finish_reason}]\n")


if __name__ == "__main__":
    main()
