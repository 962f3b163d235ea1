"""The OpenAI-compatible server: a real uvicorn on a free loopback port, serving a real
Session on scripted engines (the fast tier) and on the embedded model (``slow``), driven by
the official ``openai`` client (and httpx for raw status codes). Every request loop is
bounded in count and time."""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from conftest import free_port, scripted_session  # noqa: E402
from max_jupyter.orchestrator import Always, FunctionJudge  # noqa: E402
from max_jupyter.orchestrator.speculative import MAX_SPECULATE  # noqa: E402
from max_jupyter.server import BackgroundServer  # noqa: E402
from max_jupyter.session import Session  # noqa: E402
from max_jupyter.steering import Mix  # noqa: E402
from max_jupyter.testing import ScriptedEngine  # noqa: E402

KEY = "test-key-123"
MODEL = "max-jupyter"
HAPPY = (["I love this, it is wonderful!", "Great joy and happiness."],
         ["I hate this, it is terrible.", "Awful misery and sadness."])
LONG = 2000  # a generation far longer than any test waits for
SESSIONS = [pytest.param("scripted"), pytest.param("embedded", marks=pytest.mark.slow)]


@pytest.fixture(scope="module", params=SESSIONS)
def session(request):
    s = scripted_session() if request.param == "scripted" else Session.load(store=None, progress=False)
    happy = s.train("happy", *HAPPY, layers=(10, 15), method="mean_diff", progress=False)
    s.mixes["cheer"] = Mix.of(happy, 1.5)
    yield s
    s.close()


@pytest.fixture(scope="module")
def server(session):
    srv = BackgroundServer(session, port=0, api_key=KEY, max_queue=2)
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture()
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def spec_session(session):
    """A small model that can draft for speculation: a scripted drafter by a scripted
    session (the big model slow enough that speculation's pacing always drafts), or the
    embedded model as big and small."""
    s = scripted_session(drafter=True, seconds_per_pass=0.005) if isinstance(session.big, ScriptedEngine) \
        else Session.load(small="same", store=None, progress=False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def spec_client(spec_session) -> openai.OpenAI:
    srv = BackgroundServer(spec_session, port=0, api_key=KEY)
    srv.start()
    yield openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
    srv.stop()


@pytest.fixture()
def judge(session):
    """A session judge (used by every generation while registered) turning "cheer" on."""
    session.judges["always"] = Always(mix="cheer")
    yield "always"
    del session.judges["always"]


@pytest.fixture(autouse=True)
def empty_live_mix(request):
    if "session" not in request.fixturenames:  # (a test on its own models runs once, not per session)
        yield
        return
    session = request.getfixturevalue("session")
    session.mix.clear()
    yield
    session.mix.clear()


def chat(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_chat_non_streaming_equals_in_process(session, client):
    expected = session.generate(chat("Name three colours."), max_new_tokens=12)
    r = client.chat.completions.create(model=MODEL, messages=chat("Name three colours."),
                                       max_tokens=12, temperature=0)
    assert r.object == "chat.completion" and r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected.text
    assert session.last.token_ids == expected.token_ids
    assert r.usage.prompt_tokens == len(expected.prompt_ids)
    assert r.usage.completion_tokens == len(expected.token_ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.choices[0].finish_reason == {"eos": "stop", "length": "length"}[expected.finish_reason]
    summary = r.model_extra["max_jupyter"]
    assert summary["steps"] == len(session.last.steps) and summary["steered_steps"] == 0


def test_chat_streaming_matches_non_streaming(session, client):
    args = dict(model=MODEL, messages=chat("Say hello to the reader."), max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**args)
    chunks = list(client.chat.completions.create(**args, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.id == chunks[0].id and c.object == "chat.completion.chunk" for c in chunks)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == [whole.choices[0].finish_reason]
    assert finals[0].model_extra["max_jupyter"] == whole.model_extra["max_jupyter"]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_completions_text_prompt_with_stop(session, client):
    prompt = "The capital of France is"
    free = session.generate(prompt, chat=False, max_new_tokens=16, ignore_eos=True)
    stop = free.text.split()[2]
    cut = free.text[:free.text.index(stop)]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=16, temperature=0,
                                  stop=[stop])
    assert r.object == "text_completion"
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=16,
                                              temperature=0, stop=stop, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == cut


def test_extra_body_steering_equals_in_process(session, client):
    messages = chat("Describe your morning.")
    plain = session.generate(messages, max_new_tokens=16)
    steered = session.generate(messages, max_new_tokens=16, steering={"happy": 2.0})
    assert steered.token_ids != plain.token_ids  # the vector matters at this strength
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                       temperature=0, extra_body={"steering": {"happy": 2.0}})
    assert session.last.token_ids == steered.token_ids
    assert r.choices[0].message.content == steered.text
    summary = r.model_extra["max_jupyter"]
    assert summary["steered_steps"] == summary["steps"] == len(steered.steps)


def test_a_concept_steers_over_http_trained_on_first_use(session, server, client):
    listed = httpx.get(server.url + "/v1/vectors", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]
    assert {"id": "formal", "object": "vector", "in_live_mix": False, "concept": True} in listed
    assert "formal" not in session.vectors  # not trained yet: the request trains it
    messages = chat("Describe a market.")
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0,
                                       extra_body={"steering": {"formal": 0.5}})
    assert session.vectors["formal"].model == session.big.identity
    steered = session.generate(messages, max_new_tokens=16, steering={"formal": 0.5})
    assert r.choices[0].message.content == steered.text
    assert steered.token_ids != session.generate(messages, max_new_tokens=16).token_ids


def test_request_steering_adds_to_the_live_mix(session, client):
    messages = chat("Describe your morning.")
    whole = session.generate(messages, max_new_tokens=16, steering={"happy": 2.0})
    session.mix.set("happy", session.vectors["happy"], 1.0)  # the notebook's half
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16,
                                       temperature=0, extra_body={"steering": {"happy": 1.0}})
    assert session.last.token_ids == whole.token_ids  # 1 (live) + 1 (request) == 2
    assert r.model_extra["max_jupyter"]["mix_changes"] == [{"step": 0, "mix": {"happy": 1.0}}]
    assert session.mix.entries["happy"].coef == 1.0  # a request never changes the live mix


def test_judges_gate_a_named_mix(session, client, judge):
    r = client.chat.completions.create(model=MODEL, messages=chat("Hi!"), max_tokens=6,
                                       temperature=0)
    summary = r.model_extra["max_jupyter"]
    assert summary["mixes"] == {"cheer": summary["steps"]} and summary["steps"] > 0
    none = client.chat.completions.create(model=MODEL, messages=chat("Hi!"), max_tokens=6,
                                          temperature=0, extra_body={"judges": []})
    assert none.model_extra["max_jupyter"]["steered_steps"] == 0
    named = client.chat.completions.create(model=MODEL, messages=chat("Hi!"), max_tokens=6,
                                           temperature=0, extra_body={"judges": [judge]})
    assert named.model_extra["max_jupyter"] == summary  # the session's judges, by name
    assert named.choices[0].message.content != none.choices[0].message.content


def test_speculate_gives_the_same_text_and_reports_drafts(spec_session, spec_client, unpaced):
    args = dict(model=MODEL, messages=chat("Name three colours."), max_tokens=24, temperature=0)
    plain = spec_client.chat.completions.create(**args)
    assert plain.model_extra["max_jupyter"]["drafted"] == 0
    assert plain.model_extra["max_jupyter"]["acceptance_rate"] is None
    fast = spec_client.chat.completions.create(**args, extra_body={"speculate": 4})
    assert fast.choices[0].message.content == plain.choices[0].message.content
    last, summary = spec_session.last, fast.model_extra["max_jupyter"]
    assert summary["drafted"] == last.drafted_tokens > 0
    assert summary["accepted"] == last.accepted_tokens
    assert summary["acceptance_rate"] == pytest.approx(last.accepted_tokens / last.drafted_tokens)
    assert summary["speculate_off"] is None
    chunks = list(spec_client.chat.completions.create(**args, stream=True,
                                                      extra_body={"speculate": 4}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == plain.choices[0].message.content
    assert chunks[-1].model_extra["max_jupyter"] == summary


def test_speculate_off_without_a_small_model(session, client):
    args = dict(model=MODEL, messages=chat("Name a fruit."), max_tokens=6, temperature=0)
    plain = client.chat.completions.create(**args)
    asked = client.chat.completions.create(**args, extra_body={"speculate": 4})
    assert asked.choices[0].message.content == plain.choices[0].message.content
    summary = asked.model_extra["max_jupyter"]
    assert summary["speculate_off"] == session.last.speculate_off and "small model" in summary["speculate_off"]
    assert summary["drafted"] == summary["accepted"] == 0 and summary["acceptance_rate"] is None
    assert plain.model_extra["max_jupyter"]["speculate_off"] is None


@pytest.mark.slow
def test_a_small_model_of_another_vocabulary_reads_the_messages_itself(tmp_path):
    """A chat request reaches a small model with its own tokenizer as messages, through its
    own chat template (here: none, so the bare text), not as the big model's chat markup."""
    from max_jupyter.orchestrator.types import prompt_ids
    from max_jupyter.testing import build_tiny_model

    s = Session.load(small=build_tiny_model(tmp_path / "tiny"), store=None, progress=False)
    srv = BackgroundServer(s, port=0, api_key=KEY)
    srv.start()
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key=KEY, max_retries=0, timeout=120)
        messages = chat("Name three colours.")
        r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6, temperature=0)
        served = s.last
        own = prompt_ids(s.small, messages)
        assert served.small_ids[:len(own)] == own
        assert "<|im_start|>" not in s.small.tokenizer.decode(served.small_ids)
        expected = s.generate(messages, max_new_tokens=6)
        assert r.choices[0].message.content == expected.text
        assert served.small_ids == expected.small_ids
    finally:
        srv.stop()
        s.close()


def test_a_request_released_while_its_generation_starts_stops_it(session):
    """A request cancelled while its generation is being started (its ticket released
    before the handle arrives from the worker's queue) stops that generation as soon as the
    handle is attached, instead of leaving it running unseen."""
    from max_jupyter.server.admission import Admission

    admission = Admission(max_queue=1)
    ticket = admission.admit()
    ticket.release()
    assert admission.admitted == 0
    handle = session.start("Count slowly to one thousand.", max_new_tokens=LONG, ignore_eos=True)
    ticket.attach(handle)
    result = handle.result(timeout=120)
    assert result.finish_reason == "aborted" and len(result.token_ids) < LONG


def test_models_vectors_health(server, client, judge):
    assert [m.id for m in client.models.list().data] == [MODEL]
    vectors = httpx.get(server.url + "/v1/vectors", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "happy" in [v["id"] for v in vectors["data"]] and "always" in vectors["judges"]
    health = httpx.get(server.url + "/health")  # the one route open without the key
    assert health.status_code == 200 and health.json()["status"] == "ok"


@pytest.mark.parametrize("path", ["/v1/models", "/v1/vectors", "/v1/chat/completions"])
@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Bearer {KEY}x", KEY])
def test_401_without_the_key(server, path, auth):
    headers = {"Authorization": auth} if auth else {}
    method = httpx.post if path.endswith("completions") else httpx.get
    kwargs = {"json": {"model": MODEL, "messages": chat("hi")}} if method is httpx.post else {}
    r = method(server.url + path, headers=headers, **kwargs)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key" and r.json()["error"]["message"]


def test_401_is_the_openai_error_type(server):
    bad = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.chat.completions.create(model=MODEL, messages=chat("hi"), stream=True)
    assert e.value.status_code == 401


BAD_REQUESTS = [
    ({"extra_body": {"steering": {"nonexistent": 1.0}}}, "nonexistent"),
    ({"extra_body": {"steering": {"happy": 1e9}}}, "steering"),
    ({"extra_body": {"judges": ["nobody"]}}, "nobody"),
    ({"extra_body": {"judges": "cheer"}}, "judges"),
    ({"max_tokens": 10**6}, "context"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"messages": chat("word " * 9000)}, "context"),
    ({"temperature": "hot"}, "temperature"),
    ({"n": 2}, "n=2"),
    ({"presence_penalty": 1.0}, "presence_penalty"),
    ({"extra_body": {"beam_width": 4}}, "beam_width"),
    ({"extra_body": {"speculate": -1}}, "speculate: Input should be greater than or equal to 0"),
    ({"extra_body": {"speculate": MAX_SPECULATE + 1}}, f"less than or equal to {MAX_SPECULATE}"),
    ({"extra_body": {"speculate": "4"}}, "speculate"),
    ({"extra_body": {"speculate": 2.5}}, "speculate"),
    ({"extra_body": {"speculate": True}}, "speculate"),
    ({"messages": [{"role": "user", "content": 42}]}, "messages"),
    ({"messages": []}, "messages"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("change,word", BAD_REQUESTS)
def test_400_before_anything_is_generated(session, client, change, word, stream):
    before = session.last
    args = {"model": MODEL, "messages": chat("hi"), "max_tokens": 4, **change}
    with pytest.raises(openai.BadRequestError) as e:  # raised at create: before any 200
        client.chat.completions.create(**args, stream=stream)
    assert e.value.status_code == 400 and word in e.value.message
    assert e.value.body["message"] and e.value.body["type"] == "invalid_request_error"
    assert session.last is before


def test_a_generation_failing_midway_is_a_500_or_an_error_event(session, client):
    def broken(ctx):
        if ctx.step >= 3:
            raise RuntimeError("probe exploded")
        return False

    session.judges["broken"] = FunctionJudge(broken, mix="cheer", name="broken")
    try:
        args = dict(model=MODEL, messages=chat("Hi!"), max_tokens=20, extra_body={"ignore_eos": True})
        with pytest.raises(openai.InternalServerError, match="probe exploded") as e:
            client.chat.completions.create(**args)
        assert e.value.status_code == 500
        stream = client.chat.completions.create(**args, stream=True)  # the 200 is sent first
        with pytest.raises(openai.APIError, match="probe exploded"):
            for _chunk in stream:
                pass
    finally:
        del session.judges["broken"]
    r = client.chat.completions.create(model=MODEL, messages=chat("Hi!"), max_tokens=3,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3  # the session goes on


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError, match="max-jupyter"):
        client.chat.completions.create(model="gpt-4o", messages=chat("hi"))


def test_disconnect_mid_stream_frees_the_session(session, client):
    stream = client.chat.completions.create(
        model=MODEL, messages=chat("Tell me a long story."), max_tokens=LONG, temperature=0,
        stream=True, extra_body={"ignore_eos": True})
    for _, _chunk in zip(range(4), stream):
        pass
    handle = session.handle
    assert handle is not None and handle.state == "running"
    at_close = handle.step
    stream.close()  # the client goes away mid-generation
    deadline = time.monotonic() + 10
    while not handle.done and time.monotonic() < deadline:
        time.sleep(0.01)
    assert handle.done and handle.state == "stopped"
    assert handle.step - at_close <= 2  # the step in flight (and one of slack on a busy machine)
    start = time.monotonic()
    r = client.chat.completions.create(model=MODEL, messages=chat("Hi!"), max_tokens=3)
    assert r.choices[0].message.content and time.monotonic() - start < 10


def test_disconnect_while_waiting_non_streamed(session, server):
    with httpx.Client(timeout=2) as raw:
        with pytest.raises(httpx.ReadTimeout):  # the client gives up before the reply
            raw.post(server.url + "/v1/chat/completions",
                     headers={"Authorization": f"Bearer {KEY}"},
                     json={"model": MODEL, "messages": chat("A long story, please."),
                           "max_tokens": LONG, "ignore_eos": True})
    deadline = time.monotonic() + 10
    while session.busy and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not session.busy and len(session.last.token_ids) < LONG


def test_burst_all_answered_or_refused_none_mixed_up(session, server, client):
    prompts = ["Count to five.", "Name a fruit.", "What is rain?"]
    expected = {p: session.generate(chat(p), max_new_tokens=24).text for p in prompts}
    outcomes: dict[int, object] = {}
    barrier = threading.Barrier(6)

    def ask(i: int) -> None:
        barrier.wait(timeout=10)
        try:
            r = client.chat.completions.create(model=MODEL, messages=chat(prompts[i % 3]),
                                               max_tokens=24, temperature=0)
            outcomes[i] = r.choices[0].message.content
        except openai.RateLimitError as e:
            outcomes[i] = e

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert sorted(outcomes) == list(range(6))  # none lost
    answered = {i: o for i, o in outcomes.items() if isinstance(o, str)}
    refused = [o for o in outcomes.values() if not isinstance(o, str)]
    # none mixed up (what once mixed them: concurrent tokenising, see test_tokenizer)
    mixed = {i: (text, expected[prompts[i % 3]]) for i, text in answered.items() if text != expected[prompts[i % 3]]}
    assert not mixed, f"answers (got, expected) that differ: {mixed}"
    assert 1 <= len(answered) and 1 <= len(refused) and len(answered) + len(refused) == 6
    for e in refused:
        assert e.status_code == 429 and int(e.response.headers["Retry-After"]) >= 1
    assert server.app.state.admission.admitted == 0


def test_live_mix_change_mid_stream_applies_from_the_next_token(session, client):
    messages = chat("Describe your weekend.")
    plain = session.generate(messages, max_new_tokens=40, ignore_eos=True)
    happy = session.vectors["happy"]
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=40,
                                            temperature=0, stream=True,
                                            extra_body={"ignore_eos": True})
    chunks = [next(stream) for _ in range(4)]
    handle = session.handle
    lo = handle.step
    session.mix.set("happy", happy, 1.0)  # the notebook moves a slider
    hi = handle.step
    chunks += list(stream)
    changes = chunks[-1].model_extra["max_jupyter"]["mix_changes"]
    assert [c["mix"] for c in changes] == [{}, {"happy": 1.0}]
    switch = changes[1]["step"]
    assert lo <= switch <= hi + 1 and switch < 40
    steps = session.last.steps
    assert all(s.live_coefs == {} for s in steps[:switch])
    assert all(s.live_coefs == {"happy": 1.0} for s in steps[switch:])
    assert session.last.token_ids[:switch] == plain.token_ids[:switch]
    assert session.last.token_ids != plain.token_ids


def test_background_server_starts_and_stops_cleanly(session):
    srv = BackgroundServer(session, port=0)
    url = srv.start()
    assert srv.running and httpx.get(url + "/v1/models").status_code == 200  # no key set
    with pytest.raises(Exception, match="already running"):
        srv.start()
    srv.stop()
    assert not srv.running
    with pytest.raises(httpx.ConnectError):
        httpx.get(url + "/health", timeout=2)


@pytest.mark.slow
def test_cli_serve_from_the_shell():
    port = free_port()
    script = Path(sys.executable).with_name("max-jupyter")  # the console script
    proc = subprocess.Popen([str(script), "serve", "--port", str(port), "--api-key", KEY],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        cli = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0, timeout=60)
        r = cli.completions.create(model=MODEL, prompt="Hello", max_tokens=3)
        assert r.usage.completion_tokens >= 1
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert proc.returncode is not None, out
