"""Text views of the vector library for ``%max_steer list / show / search``."""
from __future__ import annotations

from max_jupyter.errors import BadArgumentError
from max_jupyter.jupyter.steerspec import lookup_vector, spec_mix


def _store(session):
    """``session.vectors`` if it is a ``VectorStore`` (search needs its index)."""
    from max_jupyter.steering.store import VectorStore

    if not isinstance(session.vectors, VectorStore):
        raise BadArgumentError("search needs the vector library (a VectorStore); load with "
                               "%max_load --store default (or a path).")
    return session.vectors


def _model_tag(session, model) -> str:
    if model == session.big.identity:
        return "big" + ("+small" if session.small is not None and model == session.small.identity else "")
    if session.small is not None and model == session.small.identity:
        return "small"
    return "other model"


def vector_table(session) -> None:
    """Print one line per vector in the library: name, model, layers, norm, method, notes."""
    from max_jupyter.steering.store import VectorStore

    vectors = session.vectors
    if not len(vectors):
        print("the vector library is empty (train one: %max_steer train NAME --pos $P --neg $N)")
        return
    if isinstance(vectors, VectorStore):
        for info in vectors.list():
            layers = f"{info.layers[0]}-{info.layers[-1]}" if len(info.layers) > 1 else str(info.layers[0])
            print(f"{info.name:<24} v{info.version:<3} {_model_tag(session, info.model):<11} "
                  f"layers {layers:<7} {info.method or '':<20} {' '.join(info.tags)} {info.notes}".rstrip())
        return
    for name in sorted(vectors):
        v = vectors[name]
        print(f"{name:<24} {_model_tag(session, v.model):<11} layers {list(v.layers)}")


def vector_details(session, name: str) -> None:
    """Print a vector: its model, per-layer norms and, from a store, how it was made."""
    from max_jupyter.steering.store import VectorStore

    vector = lookup_vector(session.vectors, name)
    print(f"{name}: for {vector.model.describe()} ({_model_tag(session, vector.model)})")
    print("norms: " + ", ".join(f"{l}: {n:.3g}" for l, n in vector.norms().items()))
    if isinstance(session.vectors, VectorStore):
        info = session.vectors.info(name)
        print(f"version {info.version}, method {info.method}, source {info.source}, "
              f"coef {info.coef:g}, saved {info.created:%Y-%m-%d %H:%M} UTC")
        if info.tags or info.notes:
            print(f"tags: {', '.join(info.tags) or '-'}; notes: {info.notes or '-'}")
        if info.pairs:
            print(f"{len(info.pairs)} pairs, e.g. {info.pairs[0][0]!r} / {info.pairs[0][1]!r}")


def search(session, args) -> None:
    """``search SPEC [--layer L] [-k K]``: stored vectors nearest a vector (arithmetic of
    named vectors); ``search --active --layer L``: per step of the last result, the stored
    vectors nearest its hidden state (the layer must have been captured)."""
    store = _store(session)
    if args.active:
        result = session.last
        if result is None:
            raise BadArgumentError("search --active reads the last result; generate first "
                                   "(with --capture LAYER).")
        layer = args.layer if args.layer is not None else min(result.big_hidden, default=None)
        if layer is None:
            raise BadArgumentError("search --active: the last result captured no layers; "
                                   "generate with --capture LAYER.")
        active = store.active(result, layer=layer, k=args.k, model=session.big.identity)
        pieces = _pieces(session, result)
        for step, (names, scores) in enumerate(zip(active.names, active.scores)):
            hits = ", ".join(f"{n} {float(s):.2f}" for n, s in zip(names, scores))
            print(f"{step:>3} {pieces[step]!r:<14} {hits or '-'}")
        return
    if len(args.args) != 1:
        raise BadArgumentError("%max_steer search takes one vector spec (e.g. joy or 'joy - formal') "
                               "or --active.")
    query = spec_mix(args.args, session.vectors, session.big.identity).combined(session.big)
    layer = args.layer if args.layer is not None else query.layers[len(query.layers) // 2]
    for hit in store.nearest(query, model=session.big.identity, layer=layer, k=args.k):
        print(f"{hit.name:<24} v{hit.version:<3} layer {hit.layer}  cosine {hit.similarity:+.3f}")


def _pieces(session, result) -> list[str]:
    from max_jupyter.jupyter.render import token_pieces

    pieces = token_pieces(session.big.tokenizer, result.token_ids)
    return pieces + ["<eos>"] * (len(result.steps) - len(pieces))


def concept_table(session) -> None:
    """Print one line per library concept: its name and opposite, its texts, and whether the
    session's library has its vector for the big model yet (else it is trained on first use)."""
    from max_jupyter.steering.concepts import library

    for c in library().values():
        trained = ""
        if session is not None:
            trained = "trained" if session.concept_vector_name(c.name)[1] else "trained on first use"
        print(f"{c.name:<12} vs {c.opposite:<13} {len(c.pairs):>2} pairs, {len(c.scoring_positive)}+"
              f"{len(c.scoring_negative)} scoring texts, {len(c.prompts)} prompts  {trained}".rstrip())
