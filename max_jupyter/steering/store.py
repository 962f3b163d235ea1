"""``VectorStore``: the vector library — named, versioned steering vectors in one SQLite file,
searchable by meaning with sqlite-vec.

- The file: ``VectorStore()`` opens ``$MAX_JUPYTER_STORE`` or ``vectors.sqlite`` in the user
  data folder; ``VectorStore(path)`` that file; ``VectorStore(":memory:")`` a throwaway one.
- A mapping ``name -> SteeringVector`` (the latest version): ``store[name]``, ``name in
  store``, ``iter(store)``, ``len(store)``, ``store[name] = vector`` (a new version),
  ``del store[name]`` (every version). ``save`` / ``load`` / ``info`` / ``list`` /
  ``versions`` / ``rename`` / ``delete`` give the rest.
- Safety: WAL, ``busy_timeout``, foreign keys; every write is one ``BEGIN IMMEDIATE``
  transaction, so several processes (a notebook kernel and a server) can share the file and
  a process killed mid-save leaves the old state or the new one, never a mix. One store
  object may be used from several threads (calls are serialised).
- Search: the float32 directions are the source of truth; a vec0 index (one table per
  width, partitioned by model and layer) holds the latest version of every name and can be
  rebuilt from them (``rebuild_index``). ``nearest`` finds the stored vectors closest
  (cosine) to a vector or a hidden state; ``active`` does so for each step of a generation.
"""
from __future__ import annotations

import json
import os
import threading
from collections.abc import Iterator, Mapping, MutableMapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import (
    BusyError,
    CorruptFileError,
    ModelMismatchError,
    SessionClosedError,
    UnknownNameError,
)
from max_jupyter.steering.storefile import connect, default_store_path, payload_checksum, sqlite_driver
from max_jupyter.steering.vector import SteeringVector
from max_jupyter.validation import check_coef, check_int, check_str_list, check_text, check_vector_name, fail

MAX_K = 4096  # sqlite-vec's largest k
LAYER_SPAN = 1 << 16  # index partition = model_id * LAYER_SPAN + layer
CHUNK = 64
"""vec0 rows per chunk. Each (model, layer) partition allocates whole chunks, so the default
1024 would make one 28-layer vector of width 3584 cost 400 MB of index; 64 costs 25 MB and
searches 1,000 vectors as fast."""


class UnknownVectorError(UnknownNameError):
    """No stored vector has this name (or this version); a ``KeyError`` for mapping use."""


@dataclass(frozen=True)
class VectorInfo:
    """What the store knows about one version of a named vector (no directions).

    ``pairs``: the contrastive pairs ``((positive, negative), ...)`` it was trained on, if
    given; ``created``: when this version was saved (UTC).
    """

    name: str
    version: int
    model: ModelIdentity
    layers: tuple[int, ...]
    method: str | None
    source: str | None
    pairs: tuple[tuple[str, str], ...] | None
    coef: float
    notes: str
    tags: tuple[str, ...]
    created: datetime


@dataclass(frozen=True)
class Neighbor:
    """A search hit: the latest version of ``name``, its direction at ``layer`` and its
    cosine ``similarity`` (-1..1) to the query."""

    name: str
    version: int
    layer: int
    similarity: float


@dataclass(frozen=True)
class ActiveVectors:
    """Per generated step, the stored vectors a hidden state at ``layer`` is most similar to.

    ``scores``: ``[steps, k]`` float32 cosine similarities, best first in each row (NaN
    where a step had fewer than ``k`` hits); ``names``: ``steps`` lists of the matching names.
    """

    layer: int
    scores: torch.Tensor
    names: list[list[str]]


class VectorStore(MutableMapping):
    """The vector library on one SQLite file (see the module docstring)."""

    def __init__(self, path: str | Path | None = None):
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise fail("path", path, f"is a {type(path).__name__}, not a path",
                       "pass a file path, \":memory:\", or None for the default store")
        self._db = sqlite_driver()
        default, path = path is None, str(default_store_path() if path is None else path)
        self.path = path if path == ":memory:" else str(Path(path).expanduser())
        self._conn = connect(self.path, self._db, create_folder=default)
        self._lock = threading.RLock()

    # -- the mapping ---------------------------------------------------------------------

    def __getitem__(self, name: str) -> SteeringVector:
        return self.load(name)

    def __setitem__(self, name: str, vector: SteeringVector) -> None:
        self.save(name, vector)

    def __delitem__(self, name: str) -> None:
        self.delete(name)

    def __iter__(self) -> Iterator[str]:
        with self._transaction() as c:
            names = [r[0] for r in c.execute("SELECT DISTINCT name FROM vectors ORDER BY name")]
        return iter(names)

    def __len__(self) -> int:
        with self._transaction() as c:
            return c.execute("SELECT count(DISTINCT name) FROM vectors").fetchone()[0]

    def __contains__(self, name: object) -> bool:
        if not isinstance(name, str):
            return False
        with self._transaction() as c:
            return c.execute("SELECT 1 FROM vectors WHERE name = ?", (name,)).fetchone() is not None

    # -- saving and reading --------------------------------------------------------------

    def save(self, name: str, vector: SteeringVector, *, method: str | None = None,
             pairs: Sequence[tuple[str, str]] | None = None, source: str | None = None,
             coef: float = 1.0, notes: str = "", tags: Sequence[str] = (),
             replace: bool = False) -> int:
        """Store ``vector`` as a new version of ``name`` and return its version number.

        Earlier versions stay retrievable (``load(name, version)``) unless ``replace``, which
        drops them. A name whose vectors were made for another model is refused unless
        ``replace``. ``method``: how it was trained; ``pairs``: the ``(positive, negative)``
        texts; ``source``: where it came from (a file, a dataset); ``coef``: the default
        coefficient to apply it with; ``notes``, ``tags``: free text and labels for ``list``.
        One transaction: on any failure nothing is stored.
        """
        name = check_vector_name("name", name)
        if not isinstance(vector, SteeringVector):
            raise fail("vector", vector, f"is a {type(vector).__name__}, not a SteeringVector",
                       "pass a trained or imported SteeringVector")
        fields, tags = check_save_fields(method=method, pairs=pairs, source=source, coef=coef,
                                         notes=notes, tags=tags)
        blobs = [(layer, d.numpy().astype("<f4").tobytes()) for layer, d in vector.directions.items()]
        checksum = payload_checksum(blobs)
        with self._transaction(write=True) as c:
            model_id = _model_id(c, vector.model, create=True)
            latest = c.execute("SELECT id, version, model_id FROM vectors WHERE name = ? "
                               "ORDER BY version DESC LIMIT 1", (name,)).fetchone()
            if latest:
                if latest[2] != model_id and not replace:
                    raise fail("name", name, f"holds vectors for {_model(c, latest[2]).describe()}, "
                               f"not {vector.model.describe()}", "save under another name, or "
                               "pass replace=True to drop its old versions")
                _unindex(c, latest[0])
                if replace:
                    c.execute("DELETE FROM vectors WHERE name = ?", (name,))
            version = latest[1] + 1 if latest else 1
            vector_id = c.execute(
                "INSERT INTO vectors (name, version, model_id, method, source, pairs, coef, "
                "notes, created, sha256) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (name, version, model_id, *fields, checksum)).lastrowid
            c.executemany("INSERT INTO tags (vector_id, tag) VALUES (?, ?)",
                          [(vector_id, t) for t in dict.fromkeys(tags)])
            c.executemany("INSERT INTO directions (vector_id, layer, data) VALUES (?, ?, ?)",
                          [(vector_id, layer, blob) for layer, blob in blobs])
            _index(c, vector_id)
        return version

    def load(self, name: str, version: int | None = None) -> SteeringVector:
        """The stored vector ``name`` (its latest version, or ``version``), labelled ``name``,
        bit-for-bit as saved; ``CorruptFileError`` if its directions no longer match the
        checksum saved with them."""
        with self._transaction() as c:
            row = _find(c, name, version)
            rows = self._verified(c, row[0], row[2], row[3])
            model = _model(c, row[1])
        directions = {layer: torch.from_numpy(np.frombuffer(data, "<f4").astype(np.float32))
                      for layer, data in rows}
        return SteeringVector(directions, model, name)

    def means(self, name: str) -> dict[int, float] | None:
        """The ablation means stored with the latest version of ``name`` (layer -> mean
        projection over neutral text; ``steering.means``), or None if none were measured."""
        with self._transaction() as c:
            row = _find(c, name, None)
            text = c.execute("SELECT means FROM vectors WHERE id = ?", (row[0],)).fetchone()[0]
        return None if text is None else {int(k): float(v) for k, v in json.loads(text).items()}

    def save_means(self, name: str, means: Mapping[int, float]) -> None:
        """Store ``means`` with the latest version of ``name`` (a new version has none)."""
        with self._transaction(write=True) as c:
            row = _find(c, name, None)
            c.execute("UPDATE vectors SET means = ? WHERE id = ?",
                      (json.dumps({str(k): float(v) for k, v in means.items()}), row[0]))

    def save_mix(self, name: str, expression: str, model: ModelIdentity) -> None:
        """Store a mix as its steering expression (docs/steering.md) for ``model`` under
        ``name``, replacing one of that name."""
        name = check_vector_name("name", name)
        expression = check_text("expression", expression)
        with self._transaction(write=True) as c:
            model_id = _model_id(c, model, create=True)
            c.execute("INSERT OR REPLACE INTO mixes (name, model_id, expression, created) "
                      "VALUES (?, ?, ?, ?)", (name, model_id, expression, _now()))

    def load_mix(self, name: str) -> tuple[str, ModelIdentity]:
        """The saved mix ``name``: its expression and model (``UnknownVectorError`` if none)."""
        with self._transaction() as c:
            row = c.execute("SELECT expression, model_id FROM mixes WHERE name = ?", (name,)).fetchone()
            if row is None:
                names = [r[0] for r in c.execute("SELECT name FROM mixes ORDER BY name")]
                raise UnknownVectorError(f"no saved mix is named {name!r}; the store has "
                                         f"{names or 'none'} (save one with %max_steer save NAME).")
            return row[0], _model(c, row[1])

    def mix_names(self) -> list[str]:
        """The names of the saved mixes."""
        with self._transaction() as c:
            return [r[0] for r in c.execute("SELECT name FROM mixes ORDER BY name")]

    def info(self, name: str, version: int | None = None) -> VectorInfo:
        """What is stored about ``name`` (latest version, or ``version``)."""
        with self._transaction() as c:
            return _info(c, _find(c, name, version))

    def list(self, model: ModelIdentity | None = None, tag: str | None = None,
             pattern: str | None = None) -> list[VectorInfo]:
        """The latest version of every name, sorted by name; optionally only those for
        ``model``, carrying ``tag``, or whose name matches the glob ``pattern`` (``*``, ``?``,
        ``[...]``; case-sensitive)."""
        if model is not None and not isinstance(model, ModelIdentity):
            raise fail("model", model, "is not a ModelIdentity", "pass engine.identity")
        tag = None if tag is None else check_text("tag", tag)
        pattern = None if pattern is None else check_text("pattern", pattern)
        with self._transaction() as c:
            model_id = None if model is None else _model_id(c, model, create=False)
            if model is not None and model_id is None:
                return []
            rows = c.execute(
                f"SELECT {_ROW} FROM vectors v WHERE "
                "v.version = (SELECT max(version) FROM vectors WHERE name = v.name) "
                "AND (?1 IS NULL OR v.model_id = ?1) "
                "AND (?2 IS NULL OR EXISTS (SELECT 1 FROM tags t WHERE t.vector_id = v.id "
                "AND t.tag = ?2)) AND (?3 IS NULL OR v.name GLOB ?3) ORDER BY v.name",
                (model_id, tag, pattern)).fetchall()
            return [_info(c, row) for row in rows]

    def versions(self, name: str) -> list[VectorInfo]:
        """Every stored version of ``name``, oldest first."""
        with self._transaction() as c:
            rows = c.execute(f"SELECT {_ROW} FROM vectors v WHERE v.name = ? ORDER BY v.version",
                             (name,)).fetchall()
            if not rows:
                raise _unknown(c, name)
            return [_info(c, row) for row in rows]

    def rename(self, old: str, new: str) -> None:
        """Give every version of ``old`` the name ``new`` (which must be free)."""
        new = check_vector_name("new", new)
        with self._transaction(write=True) as c:
            _find(c, old, None)
            if new != old and c.execute("SELECT 1 FROM vectors WHERE name = ?", (new,)).fetchone():
                raise fail("new", new, "is already a stored vector's name",
                           "pick a free name, or delete that vector first")
            c.execute("UPDATE vectors SET name = ? WHERE name = ?", (new, old))

    def delete(self, name: str, version: int | None = None) -> None:
        """Delete ``name`` (every version), or only its ``version``."""
        with self._transaction(write=True) as c:
            target = _find(c, name, version)
            latest = _find(c, name, None)
            _unindex(c, latest[0])
            if version is None:
                c.execute("DELETE FROM vectors WHERE name = ?", (name,))
            else:
                c.execute("DELETE FROM vectors WHERE id = ?", (target[0],))
                remaining = c.execute("SELECT id FROM vectors WHERE name = ? ORDER BY version "
                                      "DESC LIMIT 1", (name,)).fetchone()
                if remaining:
                    _index(c, remaining[0])

    # -- search --------------------------------------------------------------------------

    def nearest(self, query: SteeringVector | torch.Tensor | np.ndarray, *,
                model: ModelIdentity | None = None, layer: int | None = None,
                k: int = 5) -> list[Neighbor]:
        """The ``k`` stored vectors (latest versions) whose direction at ``layer`` is nearest
        (cosine) to ``query``, best first, among those for the same model and layer.

        ``query``: a ``SteeringVector`` (``model`` defaults to its model; ``layer`` may be
        left out when it has one layer) or a ``[hidden]`` tensor / array such as a captured
        hidden state (``model`` and ``layer`` required).
        """
        direction, model, layer = _query(query, model, layer)
        k = check_int("k", k, low=1, high=MAX_K)
        with self._transaction() as c:
            model_id = _model_id(c, model, create=False)
            if model_id is None:
                return []
            return [Neighbor(name, version, layer, 1.0 - dist)
                    for name, version, dist in _knn(c, model_id, layer, direction, k)]

    def active(self, result: Any, *, layer: int, k: int = 5,
               model: ModelIdentity | None = None) -> ActiveVectors:
        """"What is active here": for each step of ``result`` (a ``GenerationResult`` whose
        trace captured ``big_hidden[layer]``, ``[steps, hidden]``), the ``k`` stored vectors
        most cosine-similar to that step's hidden state.

        ``model``: the big model's identity (``session.big.identity``); it may be left out
        when the store holds vectors at ``layer`` of this width for one model only.
        """
        hidden = getattr(result, "big_hidden", None)
        if not isinstance(hidden, Mapping) or layer not in hidden:
            raise fail("layer", layer, "was not captured in this result",
                       f"generate with trace=TraceConfig(big_layers=({layer},))")
        states = hidden[layer].detach().to("cpu", torch.float32)
        k = check_int("k", k, low=1, high=MAX_K)
        with self._transaction() as c:
            model_id = _active_model(c, model, layer, states.shape[-1])
            hits = [_knn(c, model_id, layer, s, k) if model_id is not None and s.any() else []
                    for s in states]
        width = max((len(h) for h in hits), default=0)
        scores = torch.full((len(hits), width), float("nan"))
        for t, row in enumerate(hits):
            scores[t, : len(row)] = torch.tensor([1.0 - dist for _, _, dist in row])
        return ActiveVectors(layer, scores, [[name for name, _, _ in row] for row in hits])

    def rebuild_index(self) -> int:
        """Drop the search index and rebuild it from the stored directions (the latest
        version of every name); return how many directions it indexed. One transaction."""
        with self._transaction(write=True) as c:
            for table in _index_tables(c):
                c.execute(f"DROP TABLE {table}")
            latest = c.execute("SELECT v.id FROM vectors v WHERE v.version = "
                               "(SELECT max(version) FROM vectors WHERE name = v.name)").fetchall()
            return sum(_index(c, vector_id) for (vector_id,) in latest)

    def check(self) -> None:
        """Verify the file (SQLite's ``integrity_check``), every version's directions against
        its checksum, and that the index holds exactly
        the non-zero directions of every name's latest version; ``CorruptFileError`` if not
        (``rebuild_index`` repairs the index)."""
        with self._transaction() as c:
            problems = c.execute("PRAGMA integrity_check(1)").fetchone()[0]
            if problems != "ok":
                raise CorruptFileError(f"{self.path} is damaged (SQLite's integrity_check failed: "
                                       f"see the error's detail); restore a backup.", detail=problems)
            for vector_id, name, version in c.execute(
                    "SELECT id, name, version FROM vectors ORDER BY name, version").fetchall():
                self._verified(c, vector_id, name, version)
            expected = c.execute(
                "SELECT d.id, d.data FROM directions d JOIN vectors v ON v.id = d.vector_id "
                "WHERE v.version = (SELECT max(version) FROM vectors WHERE name = v.name)")
            want = {i for i, data in expected if np.frombuffer(data, "<f4").any()}
            have = set()
            for table in _index_tables(c):
                have.update(r[0] for r in c.execute(f"SELECT rowid FROM {table}"))
        if want != have:
            raise CorruptFileError(f"{self.path}: the search index disagrees with the stored "
                                   f"directions ({len(want ^ have)} rows); run rebuild_index().")

    def _verified(self, c, vector_id: int, name: str, version: int) -> list[tuple[int, bytes]]:
        """The ``(layer, data)`` rows of one version, checked against its saved checksum."""
        rows = c.execute("SELECT layer, data FROM directions WHERE vector_id = ? ORDER BY layer",
                         (vector_id,)).fetchall()
        saved = c.execute("SELECT sha256 FROM vectors WHERE id = ?", (vector_id,)).fetchone()[0]
        if saved != payload_checksum(rows):
            raise CorruptFileError(
                f"{self.path}: vector {name!r} version {version} does not match the checksum "
                f"saved with it (the file was altered or damaged); delete that version "
                f"(store.delete({name!r}, {version})) or restore the file from a backup.")
        return rows

    # -- lifetime ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the file (idempotent); later use raises ``SessionClosedError``."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    def __enter__(self) -> VectorStore:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._conn is None else f"{len(self)} names"
        return f"VectorStore({self.path!r}, {state})"

    @contextmanager
    def _transaction(self, write: bool = False):
        """One transaction (``BEGIN IMMEDIATE`` to write), committed on success and rolled
        back on any exception; SQLite errors become this package's errors."""
        with self._lock:
            conn = self._conn
            if conn is None:
                raise SessionClosedError(f"vector store {self.path} is closed; open it again "
                                         f"with VectorStore({self.path!r}).")
            try:
                conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
                try:
                    yield conn
                    conn.execute("COMMIT")
                except BaseException:
                    if conn.in_transaction:
                        conn.execute("ROLLBACK")
                    raise
            except self._db.OperationalError as e:
                if "locked" in str(e) or "busy" in str(e):
                    raise BusyError(f"vector store {self.path} stayed locked by another process "
                                    f"past the busy timeout ({e}); retry.") from e
                raise
            except self._db.DatabaseError as e:
                if isinstance(e, self._db.IntegrityError):
                    raise
                raise CorruptFileError(f"{self.path} is damaged ({e}); restore it from a "
                                       f"backup.") from e


# -- rows ------------------------------------------------------------------------------------

_ROW = "v.id, v.model_id, v.name, v.version, v.method, v.source, v.pairs, v.coef, v.notes, v.created"


def _find(c, name: str, version: int | None) -> tuple:
    """The ``_ROW`` of ``name`` at ``version`` (latest if None), or ``UnknownVectorError``."""
    if version is None:
        row = c.execute(f"SELECT {_ROW} FROM vectors v WHERE v.name = ? ORDER BY v.version "
                        f"DESC LIMIT 1", (name,)).fetchone()
    else:
        version = check_int("version", version, low=1)
        row = c.execute(f"SELECT {_ROW} FROM vectors v WHERE v.name = ? AND v.version = ?",
                        (name, version)).fetchone()
    if row is None:
        raise _unknown(c, name, version)
    return row


def _unknown(c, name: str, version: int | None = None) -> UnknownVectorError:
    versions = [r[0] for r in c.execute("SELECT version FROM vectors WHERE name = ? "
                                        "ORDER BY version", (name,))]
    if versions:
        return UnknownVectorError(f"vector {name!r} has no version {version}; it has "
                                  f"versions {versions}.")
    return UnknownVectorError(f"no stored vector is named {name!r}; store.list() shows the "
                              f"names (or save one first).")


def _info(c, row: tuple) -> VectorInfo:
    vector_id, model_id, name, version, method, source, pairs, coef, notes, created = row
    layers = tuple(r[0] for r in c.execute(
        "SELECT layer FROM directions WHERE vector_id = ? ORDER BY layer", (vector_id,)))
    tags = tuple(r[0] for r in c.execute(
        "SELECT tag FROM tags WHERE vector_id = ? ORDER BY rowid", (vector_id,)))
    pairs = None if pairs is None else tuple(tuple(p) for p in json.loads(pairs))
    return VectorInfo(name, version, _model(c, model_id), layers, method, source, pairs, coef,
                      notes, tags, datetime.fromisoformat(created))


def _model(c, model_id: int) -> ModelIdentity:
    row = c.execute("SELECT architecture, num_layers, hidden_size, vocab_size, fingerprint "
                    "FROM models WHERE id = ?", (model_id,)).fetchone()
    return ModelIdentity(*row)


def _model_id(c, model: ModelIdentity, create: bool) -> int | None:
    """The row id of ``model`` (inserted if missing and ``create``; else None)."""
    key = (model.architecture, model.num_layers, model.hidden_size, model.vocab_size,
           model.fingerprint)
    where = ("architecture = ? AND num_layers = ? AND hidden_size = ? AND vocab_size = ? "
             "AND fingerprint = ?")
    row = c.execute(f"SELECT id FROM models WHERE {where}", key).fetchone()
    if row or not create:
        return row[0] if row else None
    return c.execute("INSERT INTO models (architecture, num_layers, hidden_size, vocab_size, "
                     "fingerprint) VALUES (?, ?, ?, ?, ?)", key).lastrowid


# -- the search index ------------------------------------------------------------------------

def _index(c, vector_id: int) -> int:
    """Add ``vector_id``'s non-zero directions to the index; return how many."""
    rows = c.execute("SELECT d.id, d.layer, d.data, v.model_id, m.hidden_size FROM directions d "
                     "JOIN vectors v ON v.id = d.vector_id JOIN models m ON m.id = v.model_id "
                     "WHERE d.vector_id = ?", (vector_id,)).fetchall()
    added = 0
    for row_id, layer, data, model_id, width in rows:
        if not np.frombuffer(data, "<f4").any():
            continue  # a zero direction has no cosine to anything
        c.execute(f"CREATE VIRTUAL TABLE IF NOT EXISTS vec_w{int(width)} USING vec0("
                  f"space INTEGER PARTITION KEY, embedding float[{int(width)}] "
                  f"distance_metric=cosine, chunk_size={CHUNK})")
        c.execute(f"INSERT INTO vec_w{int(width)} (rowid, space, embedding) VALUES (?, ?, ?)",
                  (row_id, model_id * LAYER_SPAN + layer, data))
        added += 1
    return added


def _unindex(c, vector_id: int) -> None:
    """Remove ``vector_id``'s directions from the index."""
    rows = c.execute("SELECT d.id, m.hidden_size FROM directions d JOIN vectors v ON "
                     "v.id = d.vector_id JOIN models m ON m.id = v.model_id WHERE d.vector_id = ?",
                     (vector_id,)).fetchall()
    tables = set(_index_tables(c))
    for row_id, width in rows:
        if f"vec_w{width}" in tables:
            c.execute(f"DELETE FROM vec_w{int(width)} WHERE rowid = ?", (row_id,))


def _index_tables(c) -> list[str]:
    """The vec0 tables (``vec_w<width>``; not their shadow tables)."""
    return [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table' AND "
                                    "name GLOB 'vec_w[0-9]*' AND sql LIKE 'CREATE VIRTUAL TABLE%'")]


def _knn(c, model_id: int, layer: int, direction: torch.Tensor, k: int) -> list[tuple]:
    """``(name, version, cosine distance)`` of the ``k`` nearest indexed directions of
    ``model_id`` at ``layer``, nearest first."""
    width = direction.numel()
    if f"vec_w{width}" not in _index_tables(c):
        return []
    query = direction.numpy().astype("<f4").tobytes()
    return c.execute(
        f"SELECT v.name, v.version, knn.distance FROM (SELECT rowid, distance FROM vec_w{width} "
        f"WHERE embedding MATCH ? AND k = ? AND space = ?) knn "
        f"JOIN directions d ON d.id = knn.rowid JOIN vectors v ON v.id = d.vector_id "
        f"ORDER BY knn.distance", (query, k, model_id * LAYER_SPAN + layer)).fetchall()


def _active_model(c, model: ModelIdentity | None, layer: int, width: int) -> int | None:
    """The model whose vectors ``active`` searches: ``model``, or the one model of this width
    with vectors at ``layer`` (None if there is none)."""
    if model is not None:
        if not isinstance(model, ModelIdentity):
            raise fail("model", model, "is not a ModelIdentity", "pass session.big.identity")
        if model.hidden_size != width:
            raise ModelMismatchError(f"the captured states have width {width}, but "
                                     f"{model.describe()} has hidden size {model.hidden_size}.")
        return _model_id(c, model, create=False)
    ids = [r[0] for r in c.execute(
        "SELECT DISTINCT m.id FROM models m JOIN vectors v ON v.model_id = m.id JOIN directions d "
        "ON d.vector_id = v.id WHERE m.hidden_size = ? AND d.layer = ?", (width, layer))]
    if len(ids) > 1:
        names = "; ".join(_model(c, i).describe() for i in ids)
        raise fail("model", None, f"is needed: the store holds layer-{layer} vectors of width "
                   f"{width} for several models ({names})", "pass model=session.big.identity")
    return ids[0] if ids else None


# -- argument checks -------------------------------------------------------------------------

SAVE_FIELDS = ("method", "pairs", "source", "coef", "notes", "tags")
"""What ``save`` keeps about a version besides its directions."""


def check_save_fields(**fields: Any) -> tuple[tuple, tuple[str, ...]]:
    """Check ``save``'s fields (``SAVE_FIELDS``; others are refused) before anything is
    computed or written: ``((method, source, pairs JSON, coef, notes, created), tags)``."""
    unknown = sorted(set(fields) - set(SAVE_FIELDS))
    if unknown:
        raise fail("fields", unknown, "are not kept by the vector store",
                   f"give only {', '.join(SAVE_FIELDS)}")
    row = (_optional_text("method", fields.get("method")), _optional_text("source", fields.get("source")),
           _pairs_json(fields.get("pairs")), check_coef("coef", fields.get("coef", 1.0)),
           check_text("notes", fields.get("notes", "")), _now())
    return row, check_str_list("tags", fields.get("tags", ()))


def _query(query: Any, model: ModelIdentity | None, layer: int | None
           ) -> tuple[torch.Tensor, ModelIdentity, int]:
    """``(direction [hidden] float32, model, layer)`` for a ``nearest`` query."""
    if isinstance(query, SteeringVector):
        if model is not None and model != query.model:
            query.check_model(model)
        if layer is None:
            if len(query.layers) != 1:
                raise fail("layer", None, f"is needed: the query has layers {list(query.layers)}",
                           "pass layer=one of them")
            layer = query.layers[0]
        layer = check_int("layer", layer, low=0)
        if layer not in query.directions:
            raise fail("layer", layer, f"is not a layer of the query (it has {list(query.layers)})",
                       "pass one of its layers")
        direction, model = query.directions[layer], query.model
    else:
        if not isinstance(model, ModelIdentity) or layer is None:
            raise fail("model", model, "and layer are needed for a tensor query",
                       "pass model=engine.identity, layer=<int>")
        layer = check_int("layer", layer, low=0, high=model.num_layers - 1)
        direction = torch.as_tensor(query).detach().to("cpu", torch.float32).reshape(-1)
        if direction.numel() != model.hidden_size:
            raise ModelMismatchError(f"the query has {direction.numel()} values, but "
                                     f"{model.describe()} has hidden size {model.hidden_size}.")
    if not torch.isfinite(direction).all() or not direction.any():
        raise fail("query", "<tensor>", "is zero or not finite", "give a non-zero finite vector")
    return direction, model, layer


def _optional_text(arg: str, value: Any) -> str | None:
    return None if value is None else check_text(arg, value)


def _pairs_json(pairs: Any) -> str | None:
    """``pairs`` (a sequence of ``(positive, negative)`` str pairs) as JSON, or None."""
    if pairs is None:
        return None
    if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence):
        raise fail("pairs", pairs, "is not a list of (positive, negative) pairs",
                   "pass list(zip(positive, negative))")
    for i, pair in enumerate(pairs):
        if isinstance(pair, str) or not isinstance(pair, Sequence) or len(pair) != 2:
            raise fail(f"pairs[{i}]", pair, "is not a (positive, negative) pair",
                       "pass list(zip(positive, negative))")
        check_text(f"pairs[{i}][0]", pair[0])
        check_text(f"pairs[{i}][1]", pair[1])
    return json.dumps([list(p) for p in pairs], ensure_ascii=False)


def _now() -> str:
    return datetime.now(timezone.utc).isoformat()
