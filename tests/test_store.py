"""The vector library on real SQLite + sqlite-vec files: round trips, versions, search equal
to a NumPy brute-force cosine search, "what is active here" on a real generation, two
processes sharing one file, kill -9 in the middle of a save, and every bad store file."""
from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import zlib
from contextlib import closing
from pathlib import Path

import numpy as np
import pytest
import torch

from max_jupyter.engines.base import ModelIdentity
from max_jupyter.errors import (
    BackendUnavailableError,
    BadArgumentError,
    CorruptFileError,
    ModelMismatchError,
    SessionClosedError,
)
from max_jupyter.orchestrator import CognitiveOrchestrator, TraceConfig
from max_jupyter.steering import SteeringVector, storefile
from max_jupyter.steering.store import UnknownVectorError, VectorStore
from max_jupyter.steering.storefile import SCHEMA_VERSION, default_store_path, load_sqlite_vec

MODEL = ModelIdentity("LlamaForCausalLM", 6, 64, 1000, "a" * 64)
OTHER = ModelIdentity("Qwen2ForCausalLM", 6, 64, 1000, "b" * 64)
BIG = ModelIdentity("LlamaForCausalLM", 24, 3584, 1000, "d" * 64)
ROOT = Path(__file__).resolve().parents[1]


def seeded(name: str, version: int = 1, model: ModelIdentity = MODEL,
           layers=(1, 3, 5)) -> SteeringVector:
    """A vector whose contents follow from ``name`` and ``version`` (so any process can
    check what it reads)."""
    g = torch.Generator().manual_seed(zlib.crc32(f"{name}/{version}".encode()))
    return SteeringVector({l: torch.randn(model.hidden_size, generator=g) for l in layers},
                          model, name)


def same(a: SteeringVector, b: SteeringVector) -> bool:
    """Bit-for-bit equal directions on the same layers and model."""
    return (a.model == b.model and a.layers == b.layers
            and all(torch.equal(a.directions[l], b.directions[l]) for l in a.layers))


@pytest.fixture
def store(tmp_path):
    s = VectorStore(tmp_path / "lib.sqlite")
    yield s
    s.close()


def test_round_trip_is_bit_exact_and_survives_reopening(tmp_path):
    path = tmp_path / "lib.sqlite"
    d = seeded("happy").directions  # subnormal and huge values must survive too
    v = SteeringVector({1: d[1] * 1e-40, 3: d[3], 5: d[5] * 1e30}, MODEL, "happy")
    with VectorStore(path) as s:
        assert s.save("happy", v, method="svd_diff", pairs=[("I love it", "I hate it")],
                      source="unit test", coef=0.35, notes="first", tags=["mood", "demo"]) == 1
    with VectorStore(path) as s:
        back = s["happy"]
        assert back.label == "happy" and same(back, v)
        info = s.info("happy")
        assert (info.method, info.source, info.coef, info.notes) == ("svd_diff", "unit test", 0.35, "first")
        assert info.pairs == (("I love it", "I hate it"),) and info.tags == ("mood", "demo")
        assert info.layers == (1, 3, 5) and info.model == MODEL and info.created.tzinfo is not None
        with closing(sqlite3.connect(path)) as raw:  # WAL and the schema version as promised
            assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
            assert raw.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def test_versions_replace_rename_delete(store):
    a1, a2, a3 = (seeded("a", n) for n in (1, 2, 3))
    assert [store.save("a", v) for v in (a1, a2)] == [1, 2]
    store["a"] = a3  # the mapping saves a new version
    assert [i.version for i in store.versions("a")] == [1, 2, 3]
    assert same(store.load("a", 1), a1) and same(store["a"], a3)
    store.delete("a", 3)  # the latest goes: version 2 is the latest again
    assert same(store["a"], a2) and [i.version for i in store.versions("a")] == [1, 2]
    assert store.save("a", a1, replace=True) == 3
    assert [i.version for i in store.versions("a")] == [3]
    store.save("b", seeded("b"))
    with pytest.raises(BadArgumentError, match="already a stored vector's name"):
        store.rename("a", "b")
    store.rename("a", "c")
    assert list(store) == ["b", "c"] and len(store) == 2 and "a" not in store
    assert same(store["c"], a1)
    del store["c"]
    assert list(store) == ["b"]
    with pytest.raises(UnknownVectorError, match="no stored vector is named 'c'"):
        store["c"]
    with pytest.raises(KeyError):  # mapping code catches KeyError
        store.load("b", 7)
    assert store.get("c") is None


def test_a_name_keeps_its_model_unless_replaced(store):
    store.save("x", seeded("x"))
    with pytest.raises(BadArgumentError, match="holds vectors for LlamaForCausalLM"):
        store.save("x", seeded("x", model=OTHER))
    assert len(store.versions("x")) == 1
    assert store.save("x", seeded("x", model=OTHER), replace=True) == 2
    assert store.info("x").model == OTHER and len(store.versions("x")) == 1


def test_list_filters_by_model_tag_and_pattern(store):
    store.save("happy", seeded("happy"), tags=["mood"])
    store.save("sad", seeded("sad"), tags=["mood", "neg"])
    store.save("formal", seeded("formal", model=OTHER))
    store.save("happy", seeded("happy", 2))
    assert [i.name for i in store.list()] == ["formal", "happy", "sad"]
    assert [i.version for i in store.list(pattern="hap*")] == [2]
    assert [i.name for i in store.list(tag="mood")] == ["sad"]  # happy v2 has no tags
    assert [i.name for i in store.list(model=OTHER)] == ["formal"]
    assert store.list(model=ModelIdentity("X", 1, 64, 1, "c")) == []


def brute_force(query: torch.Tensor, rows: dict[str, torch.Tensor], k: int):
    """The ``k`` (name, cosine) nearest by NumPy, in float64."""
    names = list(rows)
    table = np.stack([rows[n].numpy() for n in names]).astype(np.float64)
    q = query.numpy().astype(np.float64)
    sims = table @ q / np.linalg.norm(table, axis=1) / np.linalg.norm(q)
    order = np.argsort(-sims)[:k]
    return [names[i] for i in order], sims[order]


def test_nearest_equals_numpy_brute_force(store):
    for i in range(60):
        store.save(f"v{i:02d}", seeded(f"v{i:02d}"))
    for i in range(10):
        store.save(f"w{i}", seeded(f"w{i}", model=OTHER))  # another model: never a hit
    store.save("v00", seeded("v00", 2))  # only the latest version is searched
    stored = {f"v{i:02d}": seeded(f"v{i:02d}", 2 if i == 0 else 1).directions[3] for i in range(60)}
    g = torch.Generator().manual_seed(7)
    for _ in range(5):
        q = torch.randn(MODEL.hidden_size, generator=g)
        hits = store.nearest(q, model=MODEL, layer=3, k=8)
        names, sims = brute_force(q, stored, 8)
        assert [h.name for h in hits] == names
        np.testing.assert_allclose([h.similarity for h in hits], sims, atol=1e-5)
        assert all(h.layer == 3 and h.version == (2 if h.name == "v00" else 1) for h in hits)
    query = seeded("v17")  # a stored vector finds itself first, at similarity 1
    top = store.nearest(query, layer=5, k=1)[0]
    assert top.name == "v17" and top.similarity == pytest.approx(1.0, abs=1e-6)


def test_rebuild_index_and_check(store):
    for i in range(5):
        store.save(f"v{i}", seeded(f"v{i}"))
    store.save("zero", SteeringVector({1: torch.zeros(64)}, MODEL))  # stored, never a hit
    q = torch.randn(64)
    before = store.nearest(q, model=MODEL, layer=1, k=10)
    store.check()
    with store._transaction(write=True) as c:  # damage the index behind the store's back
        c.execute("DELETE FROM vec_w64")
    with pytest.raises(CorruptFileError, match="rebuild_index"):
        store.check()
    assert store.rebuild_index() == 15
    store.check()
    assert store.nearest(q, model=MODEL, layer=1, k=10) == before
    assert "zero" not in [h.name for h in before]


@pytest.mark.slow
def test_active_scores_each_step_of_a_real_generation(engine, vector, tmp_path):
    with VectorStore(tmp_path / "lib.sqlite") as store:
        store.save("happy", vector)
        g = torch.Generator().manual_seed(3)
        hidden = engine.identity.hidden_size
        for i in range(6):
            store.save(f"r{i}", SteeringVector({15: torch.randn(hidden, generator=g)}, engine.identity))
        result = CognitiveOrchestrator(engine).generate(
            "Tell me about your day.", max_new_tokens=5, trace=TraceConfig(big_layers=(15,)))
        active = store.active(result, layer=15, k=3, model=engine.identity)
        assert store.active(result, layer=15, k=3).names == active.names  # one model: found alone
        states = result.big_hidden[15]
        assert active.scores.shape == (states.shape[0], 3) and len(active.names) == states.shape[0]
        rows = {n: store[n].directions[15] for n in store}
        for t, state in enumerate(states):
            names, sims = brute_force(state, rows, 3)
            assert active.names[t] == names
            np.testing.assert_allclose(active.scores[t].numpy(), sims, atol=1e-5)
        with pytest.raises(BadArgumentError, match="big_layers=\\(10,\\)"):
            store.active(result, layer=10)


def test_search_arguments_are_checked(store):
    store.save("a", seeded("a"))
    with pytest.raises(ModelMismatchError, match="hidden size 64"):
        store.nearest(torch.randn(65), model=MODEL, layer=1)
    with pytest.raises(BadArgumentError, match="model=.*layer are needed"):
        store.nearest(torch.randn(64))
    with pytest.raises(BadArgumentError, match="layer=None is needed"):
        store.nearest(seeded("a"))
    with pytest.raises(BadArgumentError, match="zero or not finite"):
        store.nearest(torch.zeros(64), model=MODEL, layer=1)
    with pytest.raises(BadArgumentError, match="k=0"):
        store.nearest(seeded("a"), layer=1, k=0)
    with pytest.raises(ModelMismatchError):
        store.nearest(seeded("a"), model=OTHER, layer=1)
    assert store.nearest(torch.randn(64), model=OTHER, layer=1) == []


def test_save_arguments_are_checked(store):
    v = seeded("a")
    for kwargs, match in [({"name": ""}, "name=''"), ({"name": " a"}, "leading/trailing"),
                          ({"vector": {1: torch.randn(64)}}, "not a SteeringVector"),
                          ({"coef": float("nan")}, "coef=nan"), ({"tags": "mood"}, "wrap it"),
                          ({"pairs": [("only one",)]}, "pairs\\[0\\]")]:
        args = {"name": "a", "vector": v, **kwargs}
        with pytest.raises(BadArgumentError, match=match):
            store.save(args.pop("name"), args.pop("vector"), **args)
    assert len(store) == 0


def test_default_location_env_and_memory(tmp_path, monkeypatch):
    monkeypatch.setenv("MAX_JUPYTER_STORE", str(tmp_path / "env" / "lib.sqlite"))
    with VectorStore() as s:
        s.save("a", seeded("a"))
        assert s.path == str(tmp_path / "env" / "lib.sqlite")
    assert (tmp_path / "env" / "lib.sqlite").is_file()
    monkeypatch.delenv("MAX_JUPYTER_STORE")
    from platformdirs import user_data_dir

    assert default_store_path() == Path(user_data_dir("max_jupyter", appauthor=False)) / "vectors.sqlite"
    with VectorStore(":memory:") as a, VectorStore(":memory:") as b:
        a.save("x", seeded("x"))
        assert "x" in a and len(b) == 0


def test_threads_share_one_store(store):
    def work(t: int) -> None:
        for i in range(5):
            store.save(f"t{t}-{i}", seeded(f"t{t}-{i}"))
            store.save("shared", seeded("shared"))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert len(store) == 21 and [i.version for i in store.versions("shared")] == list(range(1, 21))
    with store._transaction() as c:  # the connection's settings
        assert c.execute("PRAGMA foreign_keys").fetchone()[0] == 1
        assert c.execute("PRAGMA busy_timeout").fetchone()[0] == 30_000


def test_migrations_upgrade_an_older_store_in_place(tmp_path, monkeypatch):
    path = tmp_path / "lib.sqlite"
    make_store(path)
    step = ("ALTER TABLE vectors ADD COLUMN rating REAL",)
    monkeypatch.setattr(storefile, "MIGRATIONS", storefile.MIGRATIONS + (step,))
    monkeypatch.setattr(storefile, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with VectorStore(path) as s:
        assert len(s) == 40 and same(s["v3"], seeded("v3", layers=range(6)))
        with s._transaction() as c:
            assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION + 1
            assert "rating" in [r[1] for r in c.execute("PRAGMA table_info(vectors)")]


def test_unusable_paths(tmp_path):
    with pytest.raises(BadArgumentError, match="is a folder"):
        VectorStore(tmp_path)
    (tmp_path / "file").write_text("x")
    with pytest.raises(BadArgumentError, match="which is a file, not a folder"):
        VectorStore(tmp_path / "file" / "lib.sqlite")
    with pytest.raises(BadArgumentError, match="not a path"):
        VectorStore(42)


def test_closed_store_refuses(store):
    store.close()
    store.close()
    with pytest.raises(SessionClosedError, match="closed"):
        store["a"]


# -- bad store files: a clear error, and the file left exactly as it was ----------------------

def make_store(path: Path) -> None:
    with VectorStore(path) as s:
        for i in range(40):
            s.save(f"v{i}", seeded(f"v{i}", layers=range(6)))


def refuse_untouched(path: Path, match: str) -> CorruptFileError:
    before = path.read_bytes()
    with pytest.raises(CorruptFileError, match=match) as info:
        VectorStore(path)
    assert path.read_bytes() == before
    assert "\n" not in str(info.value), "the message is one line"
    return info.value


def test_not_sqlite_is_refused_untouched(tmp_path):
    path = tmp_path / "notes.sqlite"
    path.write_text("these are my notes, not a database\n" * 200)
    refuse_untouched(path, "not a usable SQLite file")


def test_corrupt_store_is_refused_untouched(tmp_path):
    path = tmp_path / "lib.sqlite"
    make_store(path)
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 8192] = bytes(range(256)) * 32
    path.write_bytes(bytes(data))
    error = refuse_untouched(path, r"is damaged \(SQLite's quick_check failed: see the error's detail\)")
    assert error.detail and error.detail != "ok"  # SQLite's own report, kept whole


def test_newer_schema_is_refused_untouched(tmp_path):
    path = tmp_path / "lib.sqlite"
    make_store(path)
    with closing(sqlite3.connect(path)) as raw:
        raw.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    refuse_untouched(path, f"schema version {SCHEMA_VERSION + 1}, newer.*pip install -U")


def test_another_programs_database_is_refused_untouched(tmp_path):
    path = tmp_path / "app.db"
    with closing(sqlite3.connect(path)) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    refuse_untouched(path, "another program")


def test_python_without_extension_loading_is_explained():
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        pytest.skip("this Python's sqlite3 can load extensions")
    with pytest.raises(BackendUnavailableError, match="built without extension loading.*pysqlite3-binary"):
        load_sqlite_vec(sqlite3.connect(":memory:"))


@pytest.mark.parametrize("blocked, match", [
    ("sqlite_vec", "pip install sqlite-vec"),
    ("pysqlite3", "built without extension loading"),
])
def test_missing_sqlite_pieces_are_explained(blocked, match):
    if blocked == "pysqlite3" and hasattr(sqlite3.Connection, "enable_load_extension"):
        pytest.skip("this Python's sqlite3 can load extensions; pysqlite3 is not needed")
    code = (f"import sys; sys.modules[{blocked!r}] = None\n"
            "from max_jupyter.steering.store import VectorStore\n"
            "try:\n    VectorStore(':memory:')\n"
            "except Exception as e:\n    print(type(e).__name__, e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         timeout=120).stdout
    assert out.startswith("BackendUnavailableError") and match in out, out


# -- several processes -----------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time
    sys.path.insert(0, {tests!r})
    from test_store import seeded
    from max_jupyter.steering.store import VectorStore
    tag, n = sys.argv[1], int(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()  # go: all open the new file at once
    with VectorStore({path!r}) as s:
        for i in range(n):
            s.save(f"{{tag}}-{{i}}", seeded(f"{{tag}}-{{i}}"))
            s.save("shared", seeded("shared"), notes=tag)
    print("done", flush=True)
""")


def test_two_writer_processes_and_a_reader_lose_nothing(tmp_path):
    path = tmp_path / "shared.sqlite"  # not created yet: the first opens race to create it
    script = tmp_path / "writer.py"
    script.write_text(WRITER.format(tests=str(ROOT / "tests"), path=str(path)))
    n = 25
    procs = [subprocess.Popen([sys.executable, str(script), tag, str(n)], cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for tag in ("A", "B")]
    assert [p.stdout.readline() for p in procs] == ["ready\n"] * 2
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    reads = 0
    with VectorStore(path) as reader:
        deadline = time.monotonic() + 120
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            for info in reader.list(pattern="[AB]-*"):  # everything visible is whole and right
                assert same(reader.load(info.name, info.version), seeded(info.name))
                reads += 1
        outs = [p.communicate(timeout=60) for p in procs]  # closes stdin too
        assert all(p.returncode == 0 for p in procs), outs
        names = set(reader)
        assert names == {f"{t}-{i}" for t in "AB" for i in range(n)} | {"shared"}
        shared = reader.versions("shared")
        assert [i.version for i in shared] == list(range(1, 2 * n + 1))
        assert sorted(i.notes for i in shared) == ["A"] * n + ["B"] * n
        reader.check()
    assert reads > 0


KILLED = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_store import BIG, seeded
    from max_jupyter.steering.store import VectorStore
    start = int(sys.argv[1])
    with VectorStore({path!r}) as s:
        for i in range(start, start + 1000):
            print("begin", i, flush=True)
            s.save(f"big{{i}}", seeded(f"big{{i}}", model=BIG, layers=range(24)))
            print("end", i, flush=True)
""")


def test_kill_9_mid_save_leaves_old_or_new_state(tmp_path):
    path = tmp_path / "lib.sqlite"
    script = tmp_path / "killed.py"
    script.write_text(KILLED.format(tests=str(ROOT / "tests"), path=str(path)))
    expected: set[int] = set()
    mid_save = 0
    start = 0
    rng = np.random.default_rng(0)
    for _ in range(4):
        proc = subprocess.Popen([sys.executable, str(script), str(start)], cwd=ROOT,
                                stdout=subprocess.PIPE, text=True)
        lines = []
        while len([l for l in lines if l.startswith("end")]) < 2:  # two saves done, a third under way
            lines.append(proc.stdout.readline())
            assert lines[-1], "the writer died early"
        time.sleep(rng.uniform(0, 0.02))
        os.kill(proc.pid, signal.SIGKILL)
        lines += proc.stdout.read().splitlines()
        proc.wait()
        begun = [int(l.split()[1]) for l in lines if l.startswith("begin")]
        ended = {int(l.split()[1]) for l in lines if l.startswith("end")}
        with VectorStore(path) as s:
            s.check()
            present = {int(n[3:]) for n in s}
            assert expected | ended <= present <= expected | set(begun)
            for i in present - expected:  # whatever the killed process left is whole
                assert same(s[f"big{i}"], seeded(f"big{i}", model=BIG, layers=range(24)))
            mid_save += begun[-1] not in present  # killed before that save committed
        expected = present
        start = max(begun) + 1
    assert mid_save >= 1, "no kill landed inside a save; the test proved nothing"


# -- a checksum per saved version (issue 20, 5) -----------------------------------------------

def test_every_version_carries_its_checksum(store):
    store.save("happy", seeded("happy"))
    store.save("happy", seeded("happy", 2))
    with store._transaction() as c:
        saved = [r[0] for r in c.execute("SELECT sha256 FROM vectors ORDER BY version")]
    assert saved == [seeded("happy").checksum(), seeded("happy", 2).checksum()]
    store.check()


def test_an_altered_older_version_is_named_by_load_and_check(store):
    store.save("happy", seeded("happy"))
    store.save("happy", seeded("happy", 2))
    with store._transaction(write=True) as c:  # one float of version 1's layer 3, as a writer would
        vector_id = c.execute("SELECT id FROM vectors WHERE version = 1").fetchone()[0]
        data = bytearray(c.execute("SELECT data FROM directions WHERE vector_id = ? AND layer = 3",
                                   (vector_id,)).fetchone()[0])
        data[8] ^= 0x80
        c.execute("UPDATE directions SET data = ? WHERE vector_id = ? AND layer = 3",
                  (bytes(data), vector_id))
    assert same(store["happy"], seeded("happy", 2))  # the latest version is intact
    for call in (lambda: store.load("happy", 1), store.check):
        with pytest.raises(CorruptFileError, match=r"vector 'happy' version 1 does not match the "
                                                   r"checksum saved with it") as info:
            call()
        assert "\n" not in str(info.value)
    store.delete("happy", 1)  # the way out the message names
    store.check()


def test_migration_2_fills_in_the_checksums_of_an_older_store(tmp_path):
    """A file as schema version 1 wrote it (no sha256 column), built by hand, opened now."""
    path = tmp_path / "old.sqlite"
    with closing(sqlite3.connect(path)) as raw:
        for statement in storefile.MIGRATIONS[0]:
            raw.execute(statement)
        raw.execute(f"PRAGMA application_id = {storefile.APPLICATION_ID}")
        raw.execute("PRAGMA user_version = 1")
        raw.execute("INSERT INTO models VALUES (1, ?, ?, ?, ?, ?)", (MODEL.architecture, MODEL.num_layers,
                    MODEL.hidden_size, MODEL.vocab_size, MODEL.fingerprint))
        raw.execute("INSERT INTO vectors VALUES (1, 'happy', 1, 1, NULL, NULL, NULL, 1.0, '', ?)",
                    ("2026-01-01T00:00:00+00:00",))
        for layer, d in seeded("happy").directions.items():
            raw.execute("INSERT INTO directions (vector_id, layer, data) VALUES (1, ?, ?)",
                        (layer, d.numpy().astype("<f4").tobytes()))
        raw.commit()
    with VectorStore(path) as s:
        assert same(s["happy"], seeded("happy"))
        with s._transaction() as c:
            assert c.execute("SELECT sha256 FROM vectors").fetchone()[0] == seeded("happy").checksum()
            assert c.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 3
            assert c.execute("SELECT means FROM vectors").fetchone()[0] is None  # migration 3
        s.rebuild_index()
        s.check()


def test_a_missing_folder_is_refused_naming_it_but_the_default_store_makes_its_own(tmp_path, monkeypatch):
    with pytest.raises(BadArgumentError, match=r"in the folder '.*/no/such', which does not exist"):
        VectorStore(tmp_path / "no" / "such" / "lib.sqlite")
    assert not (tmp_path / "no").exists()
    monkeypatch.setenv("MAX_JUPYTER_STORE", str(tmp_path / "made" / "here" / "lib.sqlite"))
    with VectorStore() as s:
        s.save("a", seeded("a"))
    assert (tmp_path / "made" / "here" / "lib.sqlite").is_file()
