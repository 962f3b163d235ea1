"""``SessionPool`` on a real local Ray runtime with two CPU actors, each a real Session of
the embedded model: pooled greedy rows equal a single Session's row for row (steered and
not, tensors included); an actor killed mid-job has its share re-run on a replacement;
Ctrl-C stops the remote work and keeps what finished; bad input is refused in one line
before any work is sent; a pool joins a cluster started with ``ray start``."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import ray
import torch

from conftest import free_port
from max_jupyter import Session, SessionPool
from max_jupyter.errors import (
    BadArgumentError,
    ContextOverflowError,
    ModelMismatchError,
    PoolWorkerError,
    SessionClosedError,
    UnknownNameError,
)
from max_jupyter.jupyter.steerspec import SteerTerm
from max_jupyter.jupyter.sweep import run_sweep
from max_jupyter.orchestrator.options import GenerationOptions
from max_jupyter.orchestrator.trace import TraceConfig
from max_jupyter.pool.runtime import init_ray
from max_jupyter.steering import SteeringVector
from max_jupyter.steering.mix import Mix

pytestmark = pytest.mark.slow

CPUS = 3
"""Logical cores of the test runtime: two for the shared pool's actors, one left free for
the tests that start another actor (one that fails to load, one that is closed)."""

PROMPTS = ["Hi!", "Name a colour.", "What is 2+2?", "Write a haiku about rain.", "Say hello in French."]


@pytest.fixture(scope="module")
def runtime():
    init_ray(num_cpus=CPUS)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def pool(runtime):
    with SessionPool.start(2, store=None, device="cpu", progress=False) as pool:
        yield pool


@pytest.fixture(scope="module")
def vector(engine) -> SteeringVector:
    """A direction at layer 10 of the embedded model, four times its typical residual norm."""
    direction = torch.randn(engine.identity.hidden_size, generator=torch.Generator().manual_seed(7))
    reference = Session(engine, vectors={})  # runs the model once, so its residual norms are known
    reference.generate("Hi", max_new_tokens=1)
    reference.close()
    from max_jupyter.engines.residual import known

    return SteeringVector({10: direction / direction.norm() * 4 * known(engine.identity)[10]},
                          engine.identity, "noise")


def alone(engine, vector, prompt, steering, **options):
    """``prompt`` on a single Session of the same model (batch 1)."""
    with Session(engine, vectors={"noise": vector}) as session:
        return session.generate(prompt, steering=steering, **options)


def assert_same_row(pooled, single):
    assert pooled.token_ids == single.token_ids
    assert (pooled.text, pooled.finish_reason) == (single.text, single.finish_reason)
    assert pooled.big_hidden.keys() == single.big_hidden.keys()
    for layer in single.big_hidden:
        # a padded batch sums in another order than batch 1 (tests/test_batch.py: within 2.5e-4)
        torch.testing.assert_close(pooled.big_hidden[layer], single.big_hidden[layer], atol=1e-3, rtol=1e-3)
    assert pooled.deltas.keys() == single.deltas.keys()
    for layer in single.deltas:
        torch.testing.assert_close(pooled.deltas[layer], single.deltas[layer])


def test_pooled_rows_equal_a_single_sessions_row_for_row(pool, engine, vector):
    pool.vectors["noise"] = vector
    steering = [None, vector, {"noise": -1.0}, Mix.of(vector, 0.5), None]
    options = dict(max_new_tokens=10, trace=TraceConfig(big_layers=(10,)))
    results = pool.generate_batch(PROMPTS, steering=steering, **options)
    assert len(results) == len(PROMPTS)
    for prompt, rule, pooled in zip(PROMPTS, steering, results):
        assert_same_row(pooled, alone(engine, vector, prompt, rule, **options))
    assert results[1].deltas and not results[0].deltas  # the steered rows were steered
    assert not results.job.retried and not results.job.interrupted and results.job.actors == 2
    assert pool.last_job is results.job


def test_one_steering_for_every_row(pool, engine, vector):
    pool.vectors["noise"] = vector
    results = pool.generate_batch(PROMPTS[:3], steering={"noise": 0.5}, max_new_tokens=6)
    for prompt, pooled in zip(PROMPTS[:3], results):
        assert_same_row(pooled, alone(engine, vector, prompt, {"noise": 0.5}, max_new_tokens=6))


def test_an_actor_killed_mid_job_has_its_share_rerun(pool, engine, vector):
    prompts = [f"Count from one to {n}." for n in range(3, 9)]
    victim = pool._actors.slots[1].handle  # holds rows 3..5
    tokens = 96  # about 5 s a share on one core: the kill at 2 s lands mid-share
    killer = threading.Timer(2.0, ray.kill, [victim])
    killer.start()
    results = pool.generate_batch(prompts, max_new_tokens=tokens, ignore_eos=True)
    killer.cancel()  # a job done before the kill must not leave it to land on the next test
    assert [(r.actor, r.rows) for r in results.job.retries] == [(1, range(3, 6))], results.job
    assert "ActorDiedError" in results.job.retries[0].error
    assert len(results) == len(prompts)  # no row lost or doubled, each in its place
    for prompt, pooled in zip(prompts, results):
        assert_same_row(pooled, alone(engine, vector, prompt, None, max_new_tokens=tokens, ignore_eos=True))
    assert pool.actors[1].pid != pool.actors[0].pid  # the replacement stays in the pool


@pytest.mark.parametrize("batch_rows", [None, 1])
def test_ctrl_c_stops_the_remote_work_and_keeps_what_finished(pool, batch_rows):
    """Two shares of two rows: each one batch (None), or a batch per row (1)."""
    tokens = 200  # each batch takes many seconds: Ctrl-C lands in every share's first batch
    interrupt = threading.Timer(2.5, os.kill, [os.getpid(), signal.SIGINT])
    interrupt.start()
    try:
        results = pool.generate_batch(PROMPTS[:4], max_new_tokens=tokens, ignore_eos=True, batch_rows=batch_rows)
    finally:
        interrupt.cancel()  # a job that failed at once must not leave Ctrl-C to land later
    assert results.job.interrupted and len(results) == 4
    running = results if batch_rows is None else [results[0], results[2]]  # shares: rows 0-1, 2-3
    for row in running:  # stopped on its actor mid-generation, not left to run to its end
        assert row.finish_reason == "interrupted" and 0 < len(row.token_ids) < tokens, row
    never_started = [results[1], results[3]] if batch_rows == 1 else []
    for row in never_started:
        assert row.finish_reason == "interrupted" and row.token_ids == []
    after = pool.generate_batch(PROMPTS[:2], max_new_tokens=3)  # the actors take work again
    assert [r.finish_reason for r in after] == ["length", "length"]
    assert not after.job.interrupted


def test_ctrl_c_stops_a_pooled_sweep_and_keeps_its_rows_marked(pool, vector):
    pool.vectors["noise"] = vector
    coefs = [-1.0, -0.5, 0.5, 1.0]
    interrupt = threading.Timer(2.5, os.kill, [os.getpid(), signal.SIGINT])
    interrupt.start()
    try:
        sweep = pool.sweep("Write about the sea.", "noise", coefs, max_new_tokens=200, ignore_eos=True)
    finally:
        interrupt.cancel()
    assert sweep.job.interrupted and sweep.coefs == coefs  # every coefficient, in order
    for row in sweep.rows:  # each stopped mid-generation on its actor, not scored
        assert row.status == "interrupted" and row.perplexity is None and len(row.result.token_ids) < 200


def test_bad_input_is_refused_in_one_line_before_any_work(pool, vector):
    before = pool.last_job
    other = SteeringVector(vector.directions, dataclasses.replace(vector.model, fingerprint="0" * 64), "other")
    pool.vectors["noise"] = vector
    cases = [
        (BadArgumentError, "workers=0", lambda: SessionPool.start(0)),
        (BadArgumentError, "free CPU", lambda: SessionPool.start(CPUS, store=None, device="cpu")),
        (BadArgumentError, "did you mean 'device'", lambda: SessionPool.start(1, devise="cpu")),
        (ModelMismatchError, "steering:", lambda: pool.generate_batch(["Hi"], steering=other)),
        (ModelMismatchError, "steering[1]", lambda: pool.generate_batch(["Hi", "Yo"], steering=[None, other])),
        (ModelMismatchError, "steering:", lambda: pool.generate_batch(["Hi"], steering=Mix.of(other))),
        (UnknownNameError, "'joy'", lambda: pool.generate_batch(["Hi"], steering={"joy": 1.0})),
        (BadArgumentError, "2 prompts", lambda: pool.generate_batch(["Hi", "Yo"], steering=[None])),
        (BadArgumentError, "prompts=", lambda: pool.generate_batch("Hi")),
        (BadArgumentError, "prompts=", lambda: pool.generate_batch([])),
        (BadArgumentError, "options=", lambda: pool.generate_batch(["Hi", "Yo"], options=[GenerationOptions()])),
        (BadArgumentError, "batch_rows=0", lambda: pool.generate_batch(["Hi"], batch_rows=0)),
        (BadArgumentError, "'nope'", lambda: pool.sweep("Hi", "nope", [1.0])),
        (BadArgumentError, "coefs=", lambda: pool.sweep("Hi", "noise", [])),
        (BadArgumentError, "max_new_tokens", lambda: pool.generate_batch(["Hi"], max_new_tokens=0)),
    ]
    for error, words, call in cases:
        with pytest.raises(error) as caught:
            call()
        message = str(caught.value)
        assert words in message and "\n" not in message, message
    assert pool.last_job is before  # nothing was sent


def test_an_actors_refusal_comes_back_in_one_line_naming_the_jobs_row(pool):
    prompts = ["Hi"] * 4 + ["word " * 9000]  # row 4, the second row of the second share
    with pytest.raises(ContextOverflowError, match=r"^prompts\[4\]: ") as caught:
        pool.generate_batch(prompts, max_new_tokens=4)
    assert "\n" not in str(caught.value)
    with pytest.raises(BadArgumentError, match="a batch runs no small model and no judges"):
        pool.generate_batch(["Hi"], judges=["calm"])


def test_a_pooled_sweep_equals_a_single_sessions(pool, engine, vector):
    pool.vectors["noise"] = vector
    coefs = [-1.0, 0.0, 0.5, 1.0, 2.0]
    pooled = pool.sweep("Write about the sea.", "noise", coefs, max_new_tokens=8)
    with Session(engine, vectors={"noise": vector}) as session:
        single = run_sweep(session, "Write about the sea.", SteerTerm("noise", 1.0), coefs,
                           max_new_tokens=8, progress=False)
    assert pooled.coefs == coefs and pooled.spec == single.spec == "noise"
    assert pooled.texts == single.texts
    torch.testing.assert_close(pooled.perplexities, single.perplexities, rtol=1e-3, atol=0)
    assert [r.status for r in pooled.rows] == [r.status for r in single.rows]
    assert pooled.job.rows == len(coefs) and not pooled.job.retried


def test_models_that_fail_to_load_are_refused_in_one_line(runtime, pool, tmp_path):
    with pytest.raises(PoolWorkerError) as caught:
        SessionPool.start(1, big=tmp_path / "missing", store=None)
    message = str(caught.value)
    assert "actor 0 of 1 could not load the models: ModelSourceError" in message and "\n" not in message
    free_again(1)  # the actor that failed was ended


def test_close_ends_the_actors_and_refuses_later_use(runtime, pool):
    with SessionPool.start(1, store=None, device="cpu", progress=False) as extra:
        assert [r.finish_reason for r in extra.generate_batch(["Hi"], max_new_tokens=2)] == ["length"]
    assert extra.closed and "closed" in repr(extra)
    extra.close()  # idempotent
    with pytest.raises(SessionClosedError):
        extra.generate_batch(["Hi"])
    free_again(1)


def free_again(cpus: int, within_s: float = 30.0) -> None:
    """Wait until the runtime has ``cpus`` free cores again (Ray frees an ended actor's
    resources a moment after it ends)."""
    deadline = time.monotonic() + within_s
    while ray.available_resources().get("CPU", 0) < cpus:
        assert time.monotonic() < deadline, f"the runtime still holds {ray.available_resources()}"
        time.sleep(0.2)


def test_a_pooled_evaluation_equals_a_single_sessions(pool, engine, vector):
    """Coefficients split over the two actors; every row, score and the chosen coefficient
    as one Session's evaluation has them (the controls from the actor that held it)."""
    prompts = ["Describe your morning.", "Tell me about your street.", "What did you eat today?",
               "Describe the weather.", "Tell me about a friend.", "What is on your desk?"]
    args = dict(concept="joy", prompts=prompts, coefs=[0.2, 0.5, 1.0], max_new_tokens=6)
    pooled = pool.evaluate(vector, **args)
    with Session(engine, vectors={}) as session:
        single = session.evaluate(vector, progress=False, **args)
    assert pooled.coefs == single.coefs and pooled.chosen_coef == single.chosen_coef
    assert [(r.condition, r.coef, r.prompt, r.split, r.text) for r in pooled.rows] == \
        [(r.condition, r.coef, r.prompt, r.split, r.text) for r in single.rows]
    for p, s in zip(pooled.rows, single.rows):
        assert p.values() == pytest.approx(s.values(), rel=1e-3, abs=1e-3)
    assert pooled.probe_auroc == pytest.approx(single.probe_auroc)
    assert not pooled.interrupted and pooled.job.rows == 3 and not pooled.job.retried


CLIENT = """
import json
import ray
from max_jupyter import SessionPool
with SessionPool.start(1, address="auto", store=None, device="cpu", progress=False) as pool:
    rows = pool.generate_batch(["Name a colour."], max_new_tokens=8)
    print(json.dumps({"tokens": rows[0].token_ids, "host": pool.actors[0].host,
                      "resources": ray.cluster_resources().get("CPU")}))
print(json.dumps({"joined_after_close": ray.is_initialized()}))
"""


def start_head(port: int, folder: Path, env: dict) -> subprocess.Popen:
    """``ray start --head --block`` on ``port`` with one core and its files in ``folder``
    (short: Ray's socket paths must fit 107 bytes), once it says it has started."""
    ray_cli = Path(sys.executable).parent / "ray"
    log = folder / "head.log"
    head = subprocess.Popen([str(ray_cli), "start", "--head", "--block", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", f"--temp-dir={folder}"],
                            env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while "Ray runtime started" not in log.read_text():
        assert head.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
        time.sleep(1)
    return head


def test_a_pool_joins_a_cluster_started_with_ray_start(engine):
    """A head node started as on a cluster's first machine (``ray start --head``, docs/
    cluster.md), joined from another process with ``address="auto"`` (``RAY_ADDRESS`` names
    the head): refused in one line without the token setting; with it the actor runs there
    and its row is a single Session's, and closing the pool leaves the pool's process
    disconnected and the cluster running."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}
    env |= {"RAY_ADDRESS": f"127.0.0.1:{port}", "RAY_USAGE_STATS_ENABLED": "0"}
    folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    head = start_head(port, folder, env)
    try:
        refused = subprocess.run([sys.executable, "-c", CLIENT], env=env, capture_output=True, text=True,
                                 timeout=300)
        assert refused.returncode != 0
        assert "BackendUnavailableError: could not join the Ray cluster" in refused.stderr
        assert "RAY_AUTH_MODE=token" in refused.stderr.strip().splitlines()[-1]
        client = subprocess.run([sys.executable, "-c", CLIENT], env=env | {"RAY_AUTH_MODE": "token"},
                                capture_output=True, text=True, timeout=300)
        assert client.returncode == 0, client.stderr[-2000:]
        pooled, after = (json.loads(line) for line in client.stdout.strip().splitlines()[-2:])
        assert pooled["resources"] == 1.0  # the head's one core: this is the started cluster
        assert pooled["tokens"] == alone(engine, None, "Name a colour.", None, max_new_tokens=8).token_ids
        assert after == {"joined_after_close": False}
        assert head.poll() is None  # the cluster outlives the pool that joined it
    finally:
        head.terminate()  # --block: the head's processes end with it
        head.wait(timeout=60)
        shutil.rmtree(folder, ignore_errors=True)
