"""Shared fixtures: the real embedded model (SmolLM2-135M-Instruct) as the big model, a
second instance of it (a small model with the same vocabulary, its own KV cache) and a
tiny random Llama with a tokenizer of its own (a small model for the text-level mirror);
a Session on scripted engines for the fast tier (``scripted_session``); the GPU markers.

The default vector store of this test run (also for the kernels and servers it starts) is a
file in a temporary folder, never the user's own library."""
from __future__ import annotations

import importlib.util
import os
import signal
import socket
import tempfile

import pytest
import torch

from max_jupyter.engines import TransformersEngine
from max_jupyter.steering import SteeringVector, train_vector
from max_jupyter.testing import ScriptedEngine, build_tiny_model

os.environ.setdefault("MAX_JUPYTER_STORE",
                      os.path.join(tempfile.mkdtemp(prefix="max_jupyter-tests-"), "vectors.sqlite"))


def pytest_sessionstart(session):
    """A run started in the background (``make test &``, nohup) inherits SIGINT ignored, so
    Python installs no KeyboardInterrupt handler and the Ctrl-C tests' ``_thread.interrupt_main``
    does nothing: install Python's default handler for them."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def engine() -> TransformersEngine:
    """The embedded default model on the CPU in fp32 (converted once, then cached)."""
    torch.manual_seed(0)
    return TransformersEngine.load(device="cpu")


@pytest.fixture(scope="session")
def small() -> TransformersEngine:
    """A second instance of the embedded model: the same vocabulary, its own KV cache."""
    return TransformersEngine.load(device="cpu")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> TransformersEngine:
    """A tiny random Llama whose tokenizer differs from the embedded model's."""
    return TransformersEngine.load(build_tiny_model(tmp_path_factory.mktemp("tiny")), device="cpu")


@pytest.fixture
def unpaced(monkeypatch):
    """Speculation drafts by acceptance alone (no wall-clock pacing): for tests of the
    tokens and drafts, which the machine's speed must not change."""
    from max_jupyter.orchestrator import CognitiveOrchestrator

    monkeypatch.setattr(CognitiveOrchestrator, "pace_speculation", False)


def scripted_session(drafter: bool = False, seconds_per_pass: float = 0.001):
    """A Session (vectors in a dict) on a 16-layer ``ScriptedEngine`` taking about
    ``seconds_per_pass`` a forward (a model's pace, so streams, stops and disconnects happen
    mid-generation), with a drafter agreeing on 80% of greedy tokens as the small model if
    ``drafter``: the fast tier's stand-in for ``Session.load``."""
    import time

    from max_jupyter.session import Session

    big = ScriptedEngine(num_layers=16)
    big.before_forward = lambda ids: time.sleep(seconds_per_pass)
    small = ScriptedEngine(num_layers=16, agreement=0.95) if drafter else None
    return Session(big, small, vectors={})


@pytest.fixture()
def session(engine):
    """A Session over the shared embedded engine (no small model, vectors in memory),
    closed after the test; modules that need another session define their own."""
    from max_jupyter.session import Session

    s = Session(engine)
    yield s
    s.close()


@pytest.fixture(scope="session")
def hf_model(engine):
    """The engine's underlying HF model, for reference forwards outside the engine."""
    return engine.model


def hf_forward(model, ids: list[int], **kwargs):
    """A plain HF forward of ``ids`` (no cache), for reference values."""
    with torch.inference_mode():
        return model(torch.tensor([ids]), **kwargs)


@pytest.fixture(scope="session")
def vector(engine) -> SteeringVector:
    """A happy-vs-unhappy vector for the embedded model at layers 10 and 15 (mean diff)."""
    return train_vector(engine, ["I love this, it is wonderful!", "Great joy and happiness."],
                        ["I hate this, it is terrible.", "Awful misery and sadness."],
                        layers=(10, 15), method="mean_diff", label="happy")


def assert_mirrors(engine, ids: list[int]) -> None:
    """The engine's cache holds exactly ``ids``: one more step on it equals a fresh
    prefill of ``ids`` plus that token."""
    assert engine.seq_len == len(ids)
    on_cache = engine.step(ids[-1]).logits
    torch.testing.assert_close(on_cache, engine.prefill(ids + [ids[-1]]).logits, atol=2e-4, rtol=1e-4)


GPU_MISSING = ("needs CUDA" if not torch.cuda.is_available()
               else "needs exllamav2" if importlib.util.find_spec("exllamav2") is None else None)
"""Why tests marked ``gpu`` skip here, or None where they run."""
EXL3_MISSING = ("needs CUDA" if not torch.cuda.is_available()
                else "needs exllamav3" if importlib.util.find_spec("exllamav3") is None else None)
"""Why tests marked ``exl3`` skip here, or None where they run."""


def pytest_runtest_setup(item):
    """Skip a test marked ``gpu`` where CUDA or exllamav2 is missing, one marked ``exl3``
    where CUDA or exllamav3 is (the one definition of the GPU markers)."""
    if GPU_MISSING is not None and item.get_closest_marker("gpu") is not None:
        pytest.skip(GPU_MISSING)
    if EXL3_MISSING is not None and item.get_closest_marker("exl3") is not None:
        pytest.skip(EXL3_MISSING)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """``MAX_JUPYTER_REQUIRE_GPU=1`` (set by bench/gpu_session.sh): a test marked ``gpu`` or
    ``exl3`` that would skip (no CUDA, no exllamav2 / exllamav3, no tokenizer) fails
    instead, naming the reason."""
    report = (yield).get_result()
    gpu = item.get_closest_marker("gpu") or item.get_closest_marker("exl3")
    if (report.skipped and gpu is not None
            and os.environ.get("MAX_JUPYTER_REQUIRE_GPU") == "1"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"MAX_JUPYTER_REQUIRE_GPU=1 forbids skipping a GPU test: {reason}"
