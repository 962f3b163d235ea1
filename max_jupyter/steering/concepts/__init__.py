"""The concept library: named concepts shipped with the package (``joy``, ``formal``, ...),
each with contrastive training pairs, a disjoint set of labelled scoring texts, and neutral
held-out prompts; written for this project (one JSON file per concept beside this module).

A concept is data, not a vector: the Session trains its vector on first use for the model
it has loaded (at ``CONCEPT_LAYERS``, read as ``CONCEPT_READ``) and keeps it in the vector
library; its scoring texts train the probe that reads it (``steering.probe``); its prompts
and ``system`` line feed ``Session.evaluate`` (the prompting baseline asks for the concept
with ``system``).
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

from max_jupyter.errors import UnknownNameError, did_you_mean

FOLDER = Path(__file__).parent
PROMPTS_FILE = "prompts.json"
CONCEPT_LAYERS = (0.4, 0.55)
"""The band of layers a concept's vector is trained at, as fractions of the model's depth
(start included, end excluded): layers 12-15 of 30 on the embedded model, the middle of the
residual stream, where steering changes what is said without breaking how."""
CONCEPT_METHOD = "svd_diff"
"""The training method of a concept's vector (``train_vector``'s ``method``)."""
CONCEPT_READ = "reply"
"""Where a concept's pairs are read (``train_vector``'s ``read``): as chat replies, averaged
over their tokens, the way the probes that score the concept read. On the real Qwen pair
this turned honest and refusing from losses to the random control into wins; with the
probe's pulled scale (``steering.probe.SCALE_SHRINK``) it beats random on all twelve
concepts there (formal narrowly) and on the embedded model (docs/evaluation.md)."""


@dataclass(frozen=True)
class Concept:
    """One concept of the library.

    ``pairs``: ``(positive, negative)`` training texts (the same content with and without
    the concept, ``opposite`` being the negative pole); ``scoring_positive`` /
    ``scoring_negative``: labelled texts, disjoint from the pairs, that train and test the
    probe; ``prompts``: neutral instructions to generate from (the library's shared set
    unless the concept lists its own); ``system``: the system line that asks for the concept
    (the prompting baseline).
    """

    name: str
    opposite: str
    description: str
    system: str
    pairs: tuple[tuple[str, str], ...]
    scoring_positive: tuple[str, ...]
    scoring_negative: tuple[str, ...]
    prompts: tuple[str, ...]

    @property
    def positive(self) -> list[str]:
        return [p for p, _ in self.pairs]

    @property
    def negative(self) -> list[str]:
        return [n for _, n in self.pairs]

    def __repr__(self) -> str:
        return (f"Concept({self.name!r} vs {self.opposite!r}: {len(self.pairs)} pairs, "
                f"{len(self.scoring_positive)}+{len(self.scoring_negative)} scoring texts, "
                f"{len(self.prompts)} prompts)")


def concept_layers(num_layers: int) -> list[int]:
    """The layers a concept's vector is trained at on a model of ``num_layers`` layers."""
    start, end = (round(f * num_layers) for f in CONCEPT_LAYERS)
    return list(range(start, max(end, start + 1)))


@functools.cache
def library() -> dict[str, Concept]:
    """Every concept of the library by name (read once from the package's JSON files)."""
    shared = tuple(json.loads((FOLDER / PROMPTS_FILE).read_text(encoding="utf-8"))["prompts"])
    concepts = {}
    for path in sorted(FOLDER.glob("*.json")):
        if path.name == PROMPTS_FILE:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        concepts[data["name"]] = Concept(
            name=data["name"], opposite=data["opposite"], description=data["description"],
            system=data["system"], pairs=tuple(tuple(p) for p in data["pairs"]),
            scoring_positive=tuple(data["scoring"]["positive"]),
            scoring_negative=tuple(data["scoring"]["negative"]),
            prompts=tuple(data.get("prompts", shared)))
    return concepts


def outdated(vectors, key: str, name: str) -> bool:
    """Whether the library ``vectors`` keeps under ``key`` concept ``name``'s vector from an
    earlier recipe: a VectorStore entry tagged ``concept``, trained on the concept's pairs,
    with another method than ``CONCEPT_METHOD`` read as ``CONCEPT_READ``. A vector trained
    on other pairs or not tagged ``concept`` (yours) never is, nor anything in a dict."""
    from max_jupyter.steering.training import stored_method

    info = getattr(vectors, "info", None)
    if info is None or key not in vectors:
        return False
    found = info(key)
    return ("concept" in found.tags and found.pairs == concept(name).pairs
            and found.method != stored_method(CONCEPT_METHOD, CONCEPT_READ))


def is_concept(name: object) -> bool:
    return isinstance(name, str) and name in library()


def concept(name: str) -> Concept:
    """The concept ``name``; ``UnknownNameError`` naming the library's concepts if none."""
    concepts = library()
    if not is_concept(name):
        raise UnknownNameError(f"no concept named {name!r}{did_you_mean(str(name), concepts)}; the "
                               f"library has {', '.join(concepts)}.")
    return concepts[name]


__all__ = ["CONCEPT_LAYERS", "CONCEPT_METHOD", "CONCEPT_READ", "Concept", "concept", "concept_layers", "is_concept",
           "library", "outdated"]
