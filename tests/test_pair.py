"""Fetching the real pair (max_jupyter.pair) with small fake data wheels served to real pip
from a local folder: the happy path, reuse, and every bad input refused with one line before
anything reaches ``cache_dir()/pair``."""
from __future__ import annotations

import hashlib
import io
import zipfile
from pathlib import Path

import pytest

from max_jupyter import pair
from max_jupyter.errors import CorruptFileError, ModelSourceError

CHUNKS = [b"GGUF" + bytes(range(256)) * 40, bytes(range(255, -1, -1)) * 30, b"tail" * 500]
FAKE = pair.PinnedModel("fake-pair", "max-jupyter-fake-part", "1.0.0", len(CHUNKS),
                        sum(map(len, CHUNKS)), hashlib.sha256(b"".join(CHUNKS)).hexdigest(),
                        "fake.gguf")


def build_wheel(folder: Path, i: int, chunk: bytes | None, version: str = FAKE.version) -> Path:
    """A data wheel like the published ones: ``{package}/data/partNN.bin`` and dist-info
    whose METADATA says ``version`` (the file name always says the pinned one)."""
    package, info = FAKE.package(i), f"{FAKE.package(i)}-{FAKE.version}.dist-info"
    files = {f"{package}/__init__.py": b"",
             f"{info}/METADATA": (f"Metadata-Version: 2.1\nName: {FAKE.project}{i}\n"
                                  f"Version: {version}\n").encode(),
             f"{info}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\n"
                              b"Tag: py3-none-any\n",
             f"{info}/top_level.txt": package.encode()}
    if chunk is not None:
        files[FAKE.chunk(i)] = chunk
    buf = io.StringIO()
    for name in files:
        buf.write(f"{name},,\n")
    files[f"{info}/RECORD"] = buf.getvalue().encode() + f"{info}/RECORD,,\n".encode()
    path = folder / FAKE.wheel(i)
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return path


@pytest.fixture
def index(tmp_path, monkeypatch) -> Path:
    """A cache in ``tmp_path/cache`` and pip reading only ``tmp_path/index`` (no network),
    which holds the fake model's wheels."""
    folder = tmp_path / "index"
    folder.mkdir()
    for i, chunk in enumerate(CHUNKS, 1):
        build_wheel(folder, i, chunk)
    monkeypatch.setenv("MAX_JUPYTER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    return folder


def refused(error: type, match: str) -> str:
    """Fetch FAKE, expecting a one-line ``error`` matching ``match``, and nothing in pair/."""
    with pytest.raises(error, match=match) as caught:
        pair.fetch(FAKE, progress=False, convert=False)
    assert "\n" not in str(caught.value)
    assert not pair.gguf_path(FAKE).parent.exists()
    assert not list(pair.download_dir().glob(".partial-*"))
    return str(caught.value)


def test_fetch_assembles_verifies_and_reuses(index):
    path = pair.fetch(FAKE, progress=False, convert=False)
    assert path == pair.gguf_path(FAKE) and path.read_bytes() == b"".join(CHUNKS)
    assert sorted(p.name for p in pair.download_dir().iterdir()) == \
        sorted(FAKE.wheel(i) for i in range(1, FAKE.parts + 1))
    for wheel in index.iterdir():
        wheel.unlink()  # nothing left to download: a second fetch must reuse what it has
    assert pair.fetch(FAKE, progress=False, convert=False) == path
    pair.gguf_path(FAKE).unlink()
    assert pair.fetch(FAKE, progress=False, convert=False).read_bytes() == b"".join(CHUNKS)


def test_wrong_version_is_refused(index):
    """The index lacks the pinned version; a wheel left in downloads whose metadata says
    another version is refused too."""
    (index / FAKE.wheel(2)).unlink()
    line = refused(ModelSourceError, r"could not download max-jupyter-fake-part2==1\.0\.0")
    assert "make real-pair" in line
    build_wheel(pair.download_dir(), 2, CHUNKS[1], version="1.0.1")
    refused(CorruptFileError, r"says it is max-jupyter-fake-part2 1\.0\.1, not the pinned "
                              r"max-jupyter-fake-part2==1\.0\.0")


def test_altered_chunk_is_refused(index):
    build_wheel(index, 3, CHUNKS[2][:-1] + b"X")
    refused(CorruptFileError, "sha256 is .*, not the pinned .*a chunk was altered")


def test_short_chunk_is_refused(index):
    build_wheel(index, 1, CHUNKS[0][:-1])
    refused(CorruptFileError, f"hold {FAKE.size - 1:,} bytes, not the pinned {FAKE.size:,}")


def test_missing_chunk_is_refused(index):
    build_wheel(index, 2, None)
    refused(CorruptFileError, "has no chunk max_jupyter_fake_part2/data/part02.bin")


def test_no_network_is_one_line(index, monkeypatch):
    monkeypatch.delenv("PIP_NO_INDEX")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")  # nothing listens there
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    line = refused(ModelSourceError, "could not download max-jupyter-fake-part1==1.0.0 .*check "
                                     "the network and run `make real-pair` again")
    assert not pair.download_dir().exists() or not list(pair.download_dir().iterdir())
    assert len(line) < 400


def test_unfetched_name_says_how_to_fetch(tmp_path, monkeypatch):
    from max_jupyter import Session

    monkeypatch.setenv("MAX_JUPYTER_CACHE", str(tmp_path))
    with pytest.raises(ModelSourceError, match=r"qwen2\.5-coder-1\.5b is not fetched yet.*`make real-pair`"):
        Session.load("qwen2.5-coder-1.5b", small="qwen2.5-coder-0.5b", store=None)
    with pytest.raises(ModelSourceError, match=r"qwen2\.5-coder-0\.5b is not fetched yet"):
        Session.load(None, small="qwen2.5-coder-0.5b", store=None)


def test_max_load_names_the_fetch_command(tmp_path, monkeypatch, capsys):
    from IPython.core.interactiveshell import InteractiveShell

    monkeypatch.setenv("MAX_JUPYTER_CACHE", str(tmp_path))
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "max_jupyter")
    try:
        capsys.readouterr()
        result = ip.run_cell("%max_load qwen2.5-coder-1.5b --small qwen2.5-coder-0.5b",
                             store_history=False)
        assert result.error_in_exec is not None
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and "qwen2.5-coder-1.5b is not fetched yet" in lines[0], lines
        assert "make real-pair" in lines[0]
    finally:
        ip.run_line_magic("unload_ext", "max_jupyter")
