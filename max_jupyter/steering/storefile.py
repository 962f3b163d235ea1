"""Opening a vector-store file: the SQLite driver, the sqlite-vec extension, checks that the
file is a store this version can use, connection settings and the schema's migrations.

The schema is versioned with ``PRAGMA user_version`` (the number of migrations applied)
and marked with ``PRAGMA application_id``. ``MIGRATIONS`` is append-only: a new schema
version adds a step at the end and never edits an old one. A file is checked before
anything is written to it: not SQLite, damaged, another program's database or a newer
schema -> an error, and the file stays as it was.
"""
from __future__ import annotations

import hashlib
import os
import sqlite3 as stdlib_sqlite3
import struct
import time
from pathlib import Path
from types import ModuleType

from max_jupyter.errors import BackendUnavailableError, BadArgumentError, CorruptFileError

APPLICATION_ID = 0x4D4A5653  # "MJVS": a max_jupyter vector store
BUSY_TIMEOUT_MS = 30_000
"""How long a write waits for another process's write to finish before giving up."""
MMAP_BYTES = 1 << 31
"""Read the file through a memory map (up to 2 GiB; SQLite caps it at its own limit): a
search reads every candidate direction, and mapped pages skip a copy per page."""

MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (  # 1: models, named versioned vectors, tags, full-precision directions
        """CREATE TABLE models (
            id INTEGER PRIMARY KEY,
            architecture TEXT NOT NULL, num_layers INTEGER NOT NULL,
            hidden_size INTEGER NOT NULL, vocab_size INTEGER NOT NULL,
            fingerprint TEXT NOT NULL,
            UNIQUE (architecture, num_layers, hidden_size, vocab_size, fingerprint))""",
        """CREATE TABLE vectors (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL, version INTEGER NOT NULL,
            model_id INTEGER NOT NULL REFERENCES models(id),
            method TEXT, source TEXT, pairs TEXT,
            coef REAL NOT NULL, notes TEXT NOT NULL, created TEXT NOT NULL,
            UNIQUE (name, version))""",
        """CREATE TABLE tags (
            vector_id INTEGER NOT NULL REFERENCES vectors(id) ON DELETE CASCADE,
            tag TEXT NOT NULL, PRIMARY KEY (vector_id, tag))""",
        """CREATE TABLE directions (
            id INTEGER PRIMARY KEY,
            vector_id INTEGER NOT NULL REFERENCES vectors(id) ON DELETE CASCADE,
            layer INTEGER NOT NULL, data BLOB NOT NULL,
            UNIQUE (vector_id, layer))""",
        "CREATE INDEX tags_by_tag ON tags(tag)",
    ),
    (  # 2: a checksum per saved version (``payload_checksum``), filled in for older rows
        "ALTER TABLE vectors ADD COLUMN sha256 TEXT",
        lambda conn: _fill_checksums(conn),
    ),
    (  # 3: ablation means per saved version (JSON layer -> mean); saved mixes as expressions
        "ALTER TABLE vectors ADD COLUMN means TEXT",
        """CREATE TABLE mixes (
            name TEXT PRIMARY KEY,
            model_id INTEGER NOT NULL REFERENCES models(id),
            expression TEXT NOT NULL, created TEXT NOT NULL)""",
    ),
)
"""Each step: SQL statements, or callables of the connection, run in order in one transaction."""
SCHEMA_VERSION = len(MIGRATIONS)


def sqlite_driver() -> ModuleType:
    """A DB-API SQLite module that can load extensions: the standard ``sqlite3`` when this
    Python allows it, else ``pysqlite3`` (the ``pysqlite3-binary`` wheel); otherwise
    ``BackendUnavailableError`` saying why and what to install."""
    if hasattr(stdlib_sqlite3.Connection, "enable_load_extension"):
        return stdlib_sqlite3
    try:
        from pysqlite3 import dbapi2
    except ImportError:
        raise BackendUnavailableError(NO_EXTENSIONS) from None
    return dbapi2


NO_EXTENSIONS = (
    "The vector store needs the SQLite extension sqlite-vec, but this Python's sqlite3 module "
    "was built without extension loading (e.g. macOS system Python, or pyenv without "
    "--enable-loadable-sqlite-extensions). Install a SQLite that can load it: "
    "`pip install pysqlite3-binary` (Linux), or use a Python built with extension loading "
    "(python.org installers, conda, uv); or pass store=None for an in-memory library.")


def load_sqlite_vec(conn) -> None:
    """Load sqlite-vec into ``conn``; ``BackendUnavailableError`` naming the cause and the
    fix if it cannot load. Reads nothing from the file."""
    if not hasattr(conn, "enable_load_extension"):
        raise BackendUnavailableError(NO_EXTENSIONS)
    try:
        import sqlite_vec
    except ImportError:
        raise BackendUnavailableError(
            "The vector store needs the sqlite-vec extension: `pip install sqlite-vec`.") from None
    try:
        conn.enable_load_extension(True)
        sqlite_vec.load(conn)
        conn.enable_load_extension(False)
    except Exception as e:  # the driver's OperationalError, or an AttributeError of a stub build
        raise BackendUnavailableError(
            f"sqlite-vec {getattr(sqlite_vec, '__version__', '?')} is installed but failed to "
            f"load: {e}. Reinstall it for this platform (`pip install --force-reinstall "
            f"sqlite-vec`), or install pysqlite3-binary for a SQLite that can load it.") from e


def default_store_path() -> Path:
    """``$MAX_JUPYTER_STORE`` if set, else ``vectors.sqlite`` in the user data folder."""
    env = os.environ.get("MAX_JUPYTER_STORE")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_data_dir

    return Path(user_data_dir("max_jupyter", appauthor=False)) / "vectors.sqlite"


def connect(path: str, db: ModuleType, create_folder: bool = False):
    """An open, checked, migrated connection to the store at ``path`` (``":memory:"`` for a
    throwaway one), in autocommit mode (transactions are explicit), usable from any thread
    (the caller serialises), WAL, foreign keys on, ``busy_timeout`` set, memory-mapped.
    ``create_folder``: create a missing folder (the default store's own); otherwise a
    missing folder is refused, naming it, as ``SteeringVector.save`` does."""
    if path != ":memory:":
        _check_folder(Path(path), path, create_folder)
    conn = db.connect(path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                      check_same_thread=False)
    try:
        load_sqlite_vec(conn)
        conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        conn.execute("PRAGMA foreign_keys = ON")
        _prepare_file(conn, path, db)
    except db.OperationalError as e:
        conn.close()
        raise BadArgumentError(f"path={path!r} cannot be opened as a vector store: {e}; check "
                               f"the folder's permissions and free space.") from e
    except db.DatabaseError as e:
        conn.close()
        raise CorruptFileError(f"{path} is not a usable SQLite file ({e}); it was left as it "
                               f"was. Restore it from a backup or give another path.") from e
    except BaseException:
        conn.close()
        raise
    return conn


def _check_folder(target: Path, path: str, create: bool) -> None:
    if target.is_dir():
        raise BadArgumentError(f"path={path!r} is a folder; give a file such as "
                               f"{str(target / 'vectors.sqlite')!r}.")
    folder = target.parent
    if create:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise BadArgumentError(f"path={path!r} is in a folder that cannot be created "
                                   f"({e.strerror or e}); give a path you can write to.") from None
    elif folder.exists() and not folder.is_dir():
        raise BadArgumentError(f"path={path!r} is under {str(folder)!r}, which is a file, not a "
                               f"folder; give a path in a folder.")
    elif not folder.is_dir():
        raise BadArgumentError(f"path={path!r} is in the folder {str(folder)!r}, which does not "
                               f"exist; create it first (Path({str(folder)!r}).mkdir(parents=True)) "
                               f"or give another path.")


def payload_checksum(rows) -> str:
    """sha256 (hex) of a vector's ``(layer, float32 little-endian bytes)`` rows in layer
    order: the same as ``SteeringVector.checksum`` of the vector they hold."""
    h = hashlib.sha256()
    for layer, data in rows:
        h.update(struct.pack("<q", layer))
        h.update(data)
    return h.hexdigest()


def _fill_checksums(conn) -> None:
    """Migration 2: the checksum of every version saved before checksums were kept."""
    for (vector_id,) in conn.execute("SELECT id FROM vectors WHERE sha256 IS NULL").fetchall():
        rows = conn.execute("SELECT layer, data FROM directions WHERE vector_id = ? ORDER BY layer",
                            (vector_id,)).fetchall()
        conn.execute("UPDATE vectors SET sha256 = ? WHERE id = ?", (payload_checksum(rows), vector_id))


def _prepare_file(conn, path: str, db: ModuleType, attempts: int = 100) -> None:
    """Check the file, switch it to WAL and migrate it. Several processes creating one new
    store at once can meet SQLite's lock-upgrade refusal ("database is locked", returned at
    once without waiting, to avoid a deadlock): each step is safe to repeat, so retry."""
    for attempt in range(attempts):
        try:
            _check_file(conn, path, db)
            if path != ":memory:":
                conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA mmap_size = {MMAP_BYTES}")
            _migrate(conn)
            return
        except db.OperationalError as e:
            if "locked" not in str(e) or attempt == attempts - 1:
                raise
            time.sleep(0.05)


def _check_file(conn, path: str, db: ModuleType) -> None:
    """Refuse, before any write, a file that is not a store this version can use."""
    conn.execute("BEGIN")  # one snapshot: another process may be creating the store right now
    try:
        app_id = conn.execute("PRAGMA application_id").fetchone()[0]
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
    finally:
        conn.execute("COMMIT")
    if app_id != APPLICATION_ID and tables:
        raise CorruptFileError(f"{path} is a SQLite database of another program (it holds "
                               f"{tables} schema objects but no max_jupyter mark); it was left "
                               f"as it was. Give another path for the vector store.")
    if version > SCHEMA_VERSION:
        raise CorruptFileError(
            f"{path} is a vector store of schema version {version}, newer than this max_jupyter "
            f"reads ({SCHEMA_VERSION}); it was left as it was. Upgrade max_jupyter "
            f"(`pip install -U max-jupyter`) to use it.")
    if tables:
        problems = conn.execute("PRAGMA quick_check(1)").fetchone()[0]
        if problems != "ok":
            raise CorruptFileError(f"{path} is damaged (SQLite's quick_check failed: see the "
                                   f"error's detail); it was left as it was. Restore it from a "
                                   f"backup or give another path.", detail=problems)


def _migrate(conn) -> None:
    """Apply the migrations this file lacks, each in one write transaction (re-reading the
    version inside it, so two processes opening a new file at once migrate it once)."""
    if conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION:
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        for step in MIGRATIONS[version:]:
            for statement in step:
                statement(conn) if callable(statement) else conn.execute(statement)
        conn.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
