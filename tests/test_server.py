"""`ivl serve` (ivl_local/server.py, ivl_local/cli/serve.py) on the real small models: the official
`openai` client against a live server on 127.0.0.1, concurrent slots, cancellation, the queue,
every bad request, the API key, CORS and a clean SIGTERM.

Servers run in this process (uvicorn on a thread) except the one `ivl serve` process the SIGTERM
test starts. Every wait is bounded; nothing asserts on timings."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest

if os.environ.get("CI"):   # CI installs the serve and test extras: missing is an error there
    import httpx
    import openai
else:
    pytest.importorskip("fastapi")
    httpx = pytest.importorskip("httpx")
    openai = pytest.importorskip("openai")

from ivl_local import GREEDY  # noqa: E402
from ivl_local.engine import Engine  # noqa: E402
from ivl_local.registry import ModelRegistry  # noqa: E402
from ivl_local.config import SamplingConfig  # noqa: E402
from ivl_local.server import ServerLimits, create_app, slot_seed  # noqa: E402
from ivl_local.terms import CFG  # noqa: E402

CTX = 512
KEY = "test-key-0123"
NEGATIVE = "Answer rudely."
MESSAGES = [{"role": "user", "content": "The capital of France is"}]
PROMPTS = ["Name a colour.", "What is 2+2?", "Write a haiku about rain.", "Say hello.",
           "Name a fruit.", "What is the capital of Italy?", "Count to five.", "Name an animal."]
N = 8
TIMEOUT = 120


def quiet_engine(*args, **kw) -> Engine:
    with warnings.catch_warnings():   # a raw model as a value network warns once
        warnings.simplefilter("ignore")
        return Engine(*args, **{"n_ctx": CTX, "n_threads": 1, **kw})


@contextlib.contextmanager
def live_server(engines: list, limits: ServerLimits):
    """The app on 127.0.0.1, a free port, uvicorn on a thread; yields the base URL."""
    import uvicorn

    app = create_app(engines, limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, log_level="warning", log_config=None, lifespan="on",
                            timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(30)
        sock.close()
        for engine in engines:      # the app's shutdown closed them; closing again is a no-op
            engine.close()
        assert not thread.is_alive(), "the server did not stop"


def slot_engines(n: int, *args, **kw) -> list[Engine]:
    models = ModelRegistry()
    engines = [quiet_engine(*args, models=models, seed=slot_seed(0, i), **kw) for i in range(n)]   # as `ivl serve`
    assert models.loads == len({e.base_path for e in engines}) or models.loads == 1   # weights loaded once
    return engines


def client(url: str, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=TIMEOUT)


# --- the servers ------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def composed(smollm2_path):
    """SmolLM2 + SmolLM2 as a (raw) value network + CFG at 3: two slots, a short queue, tight limits."""
    engines = slot_engines(2, smollm2_path, smollm2_path, terms=[CFG(3.0, NEGATIVE)])
    limits = ServerLimits(queue=8, max_messages=4, max_tokens=64, max_body_bytes=16_384)
    with live_server(engines, limits) as url:
        yield url


@pytest.fixture(scope="module")
def single(smollm2_path):
    """The base alone, one slot, no queue, an API key and one CORS origin."""
    engines = slot_engines(1, smollm2_path, None)
    limits = ServerLimits(queue=0, api_key=KEY, cors_origins=["http://app.example"], max_tokens=480)
    with live_server(engines, limits) as url:
        yield url


@pytest.fixture(scope="module")
def reference(smollm2_path):
    """The same compositions on the Python API: what every answer is compared with."""
    engines = {"composed": quiet_engine(smollm2_path, smollm2_path, terms=[CFG(3.0, NEGATIVE)]),
               "base": quiet_engine(smollm2_path, None)}
    yield engines
    for engine in engines.values():
        engine.close()


def chat_answer(engine: Engine, messages, max_tokens: int = N) -> str:
    engine.clear_cache()
    return "".join(engine.chat_deltas(messages, max_tokens, GREEDY))


def model_id(url: str, key: str = "unused") -> str:
    return client(url, key).models.list().data[0].id


def health(url: str) -> dict:
    return httpx.get(f"{url}/health", timeout=TIMEOUT).json()


# --- answers through the official client -------------------------------------------------------------

@pytest.mark.real
@pytest.mark.slow
def test_openai_client_answers_equal_the_engines_greedy_answers(composed, reference):
    c = client(composed)
    name = model_id(composed)
    expected = chat_answer(reference["composed"], MESSAGES)
    base = chat_answer(reference["base"], MESSAGES)
    assert expected and expected != base     # the composition matters for this prompt

    answer = c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=N, temperature=0)
    assert answer.choices[0].message.content == expected
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert answer.usage.completion_tokens <= N and answer.usage.prompt_tokens > 0
    ivl = answer.model_extra["ivl"]
    assert ivl["weights"] == [1.0, 3.0] and ivl["timings"]["completion_tokens"] == answer.usage.completion_tokens

    stream = c.chat.completions.create(model=name, messages=MESSAGES, max_tokens=N, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == expected
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens

    prompt = "The capital of France is"
    reference["composed"].clear_cache()
    text = c.completions.create(model=name, prompt=prompt, max_tokens=N, temperature=0).choices[0].text
    assert text == reference["composed"].complete(prompt, N, GREEDY)


@pytest.mark.real
@pytest.mark.slow
def test_ivl_fields_in_the_body_change_the_composition_for_that_request_only(composed, reference):
    c = client(composed)
    base = chat_answer(reference["base"], MESSAGES)
    composed_answer = chat_answer(reference["composed"], MESSAGES)

    def ask(**extra):
        r = c.chat.completions.create(model=model_id(composed), messages=MESSAGES, max_tokens=N, temperature=0,
                                      extra_body=extra)
        return r.choices[0].message.content, r.model_extra["ivl"]

    text, ivl = ask(alpha=0, weights={"cfg": 0})
    assert text == base and ivl["weights"] == [0.0, 0.0]             # alpha 0 + no CFG = the base
    text, ivl = ask(value_enabled=False, weights=[None, 0])
    assert text == base and ivl["value_enabled"] is False and ivl["weights"] == [1.0, 0.0]
    assert ask()[0] == composed_answer                               # the defaults again: nothing leaked
    models = c.models.list().data[0].model_extra["ivl"]
    assert [(t["kind"], t["weight"]) for t in models["terms"]] == [("value", 1.0), ("cfg", 3.0)]
    assert models["alpha"] == 1.0 and models["slots"] == 2


@pytest.mark.real
@pytest.mark.slow
def test_eight_concurrent_streams_on_two_slots_each_get_their_own_answer(composed, reference):
    expected = {p: chat_answer(reference["composed"], [{"role": "user", "content": p}]) for p in PROMPTS}
    name = model_id(composed)

    def stream(prompt: str) -> str:
        chunks = client(composed).chat.completions.create(
            model=name, messages=[{"role": "user", "content": prompt}], max_tokens=N, temperature=0, stream=True)
        return "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)

    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        got = dict(zip(PROMPTS, pool.map(stream, PROMPTS, timeout=TIMEOUT * 4)))
    assert got == expected
    assert health(composed)["busy"] == 0


@pytest.mark.real
def test_slots_sample_apart_when_requests_give_no_seed(smollm2_path):
    """Every slot's Engine seeds unseeded requests with its seed + its call count: on one seed,
    two requests running at once on two fresh slots would get the same sampled text."""
    warm = SamplingConfig(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0)
    models = ModelRegistry()
    same = [quiet_engine(smollm2_path, None, models=models, seed=0) for _ in range(2)]
    apart = [quiet_engine(smollm2_path, None, models=models, seed=slot_seed(0, i)) for i in range(2)]
    try:
        texts = [[e.complete("Once upon a time", max_tokens=24, sampling=warm) for e in pair]
                 for pair in (same, apart)]
    finally:
        for engine in same + apart:
            engine.close()
    assert texts[0][0] == texts[0][1]            # one seed: one stream (what slot_seed avoids)
    assert texts[1][0] == texts[0][0]            # slot 0 keeps the seed it was given
    assert texts[1][1] != texts[1][0]
    from ivl_local.cli.serve import SLOTS_MAX

    seeds = [slot_seed(2 ** 32 - 1, i) for i in range(SLOTS_MAX)]
    assert seeds[1] == 2 ** 24 - 1 and len(set(seeds)) == SLOTS_MAX   # 32 bits, as the Engine's seeds


# --- slots, the queue and cancellation --------------------------------------------------------------

def _open_stream(url: str, http: "httpx.Client"):
    """A long streamed answer, read up to its first content chunk (the slot is then busy)."""
    body = {"messages": [{"role": "user", "content": "Write a long story about a dragon."}],
            "max_tokens": 400, "stream": True}
    response = http.send(http.build_request("POST", f"{url}/v1/chat/completions", json=body,
                                            headers={"Authorization": f"Bearer {KEY}"}), stream=True)
    assert response.status_code == 200
    lines = response.iter_lines()
    for line in lines:
        if '"content"' in line:
            return response, lines
    pytest.fail("the stream ended before its first content chunk")


def _wait_idle(url: str) -> dict:
    deadline = time.monotonic() + TIMEOUT
    while (h := health(url))["busy"]:
        assert time.monotonic() < deadline, "the slot was never freed"
        time.sleep(0.1)
    return h


@pytest.mark.real
@pytest.mark.slow
def test_a_client_that_disconnects_mid_stream_frees_its_slot(single):
    before = _wait_idle(single)
    with httpx.Client(timeout=TIMEOUT) as http:
        response, _ = _open_stream(single, http)
        response.close()                                  # the client goes away mid-stream
    after = _wait_idle(single)
    assert after["cancelled"] == before["cancelled"] + 1  # cancelled, not run to its 400 tokens
    assert after["served"] == before["served"]
    answer = client(single, KEY).chat.completions.create(model=model_id(single, KEY), messages=MESSAGES,
                                                         max_tokens=4, temperature=0)
    assert answer.choices[0].message.content                # the next request is served


@pytest.mark.real
@pytest.mark.slow
def test_past_the_queue_requests_get_503_with_retry_after(single):
    _wait_idle(single)
    with httpx.Client(timeout=TIMEOUT) as http:
        response, _ = _open_stream(single, http)
        try:
            busy = http.post(f"{single}/v1/chat/completions", json={"messages": MESSAGES, "max_tokens": 2},
                             headers={"Authorization": f"Bearer {KEY}"})
            assert busy.status_code == 503
            assert int(busy.headers["retry-after"]) >= 1
            assert busy.json()["error"]["code"] == "server_busy" and "--queue" in busy.json()["error"]["message"]
            with pytest.raises(openai.APIStatusError) as e:
                client(single, KEY).completions.create(model=model_id(single, KEY), prompt="Hi", max_tokens=2)
            assert e.value.status_code == 503
        finally:
            response.close()
    assert health(single)["rejected"] >= 2


# --- bad requests ---------------------------------------------------------------------------------------

TOO_LONG = "word " * 600
BAD = [
    ("POST", "/v1/chat/completions", b'{"messages": [', 400, "not valid JSON", None),
    ("POST", "/v1/chat/completions", b"[1, 2]", 400, "must be a JSON object", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": "5"}, 400, "max_tokens", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "temperature": True}, 400, "temperature", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "bogus": 1}, 400, "'bogus' is not a field", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "n": 2}, 400, "'n' is not supported", "unsupported_parameter"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "logprobs": True}, 400, "log-probabilities", "unsupported_parameter"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "tools": [{"type": "function"}]}, 400, "no tool calling", "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": "Hi", "echo": True}, 400, "'echo' is not supported", "unsupported_parameter"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request", None),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "at least one message", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES * 5}, 400, "at most 4 messages", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages.0.role", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "messages.0.content", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 65}, 400, "at most 64", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "max_tokens": 0}, 400, "max_tokens", None),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": TOO_LONG}], "max_tokens": 4}, 400,
     "context window is 512", "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": TOO_LONG, "max_tokens": 4}, 400, "context window", "context_length_exceeded"),
    ("POST", "/v1/completions", {"prompt": "   ", "max_tokens": 4}, 400, "empty", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "model": "../../etc/passwd"}, 404, "is not served here",
     "model_not_found"),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "temperature": -1}, 400, "temperature must be >= 0", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "top_p": 0}, 400, "top_p", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "seed": -1}, 400, "seed", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, 400, "at most 4", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "alpha": 1e9}, 400, "between 0 and 100", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "alpha": 0.5, "weights": [1, None]}, 400, "once", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "weights": [1]}, 400, "one per term", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "weights": {"nope": 1}}, 400, "no term 'nope'", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "weights": {"cfg": 1e9}}, 400, "between -100 and 100", None),
    ("POST", "/v1/chat/completions", {"messages": MESSAGES, "value_enabled": "no"}, 400, "value_enabled", None),
    ("POST", "/v1/chat/completions", b"x" * 20_000, 413, "larger than the server's limit", "body_too_large"),
    ("GET", "/v1/chat/completions", None, 405, "not allowed", None),
    ("GET", "/v1/nothing", None, 404, "no route", None),
]


@pytest.mark.real
@pytest.mark.slow
def test_every_bad_request_gets_its_status_and_one_clear_message(composed):
    with httpx.Client(base_url=composed, timeout=TIMEOUT) as http:
        for method, path, body, status, message, code in BAD:
            content = body if isinstance(body, bytes) else None if body is None else json.dumps(body).encode()
            r = http.request(method, path, content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == status, (body, r.text)
            error = r.json()["error"]
            assert message in error["message"], (body, error)
            assert "\n" not in error["message"] and "Traceback" not in r.text
            if code is not None:
                assert error["code"] == code, (body, error)
    assert health(composed)["busy"] == 0
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|context window"):
        client(composed).chat.completions.create(model=model_id(composed), messages=[
            {"role": "user", "content": TOO_LONG}], max_tokens=4)


HOSTILE = [   # each of these was a 500 ("internal error") with a traceback in the server's log
    (b"[" * 8000 + b"]" * 8000, "nested too deeply"),                       # RecursionError in json
    (b'{"messages": [], "max_tokens": ' + b"9" * 5000 + b"}", "a number is too long"),  # > 4300 digits
    ({"messages": MESSAGES, "presence_penalty": 1e300}, "presence_penalty"),   # inf as the sampler's float
    ({"messages": MESSAGES, "frequency_penalty": -1e39}, "frequency_penalty"),
    ({"messages": MESSAGES, "temperature": 1e308}, "temperature"),
    ({"messages": MESSAGES, "top_p": 1e-320}, "top_p"),                        # 0 as a float
    ({"messages": MESSAGES, "min_p": 0.99999999999}, "min_p"),                 # 1 as a float
    ({"messages": MESSAGES, "repeat_penalty": 1e-300}, "repeat_penalty"),
    ({"messages": MESSAGES, "weights": {"\u00b2": 1}}, "no term"),             # '²'.isdigit(), int('²') fails
]


@pytest.mark.real
@pytest.mark.slow
def test_hostile_bodies_are_a_400_and_leave_no_traceback_in_the_log(composed, caplog):
    caplog.set_level(logging.ERROR)
    with httpx.Client(base_url=composed, timeout=TIMEOUT) as http:
        for body, message in HOSTILE:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
            assert r.status_code == 400, (content[:80], r.text)
            assert message in r.json()["error"]["message"], (content[:80], r.text)
    # a client that goes away in the middle of its body
    with socket.create_connection(("127.0.0.1", int(composed.rsplit(":", 1)[1])), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n{\"mess")
    deadline = time.monotonic() + TIMEOUT
    while health(composed)["busy"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health(composed)["busy"] == 0
    logged = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert not logged, [(r.name, r.getMessage()) for r in logged]


@pytest.mark.real
def test_a_wrong_or_missing_key_is_401_and_cors_is_off_unless_asked(single, composed):
    with httpx.Client(base_url=single, timeout=TIMEOUT) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                        {"Authorization": f"Basic {KEY}"}):
            r = http.post("/v1/chat/completions", json={"messages": MESSAGES}, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", headers
        assert http.get("/v1/models").status_code == 401
        assert http.get("/health").status_code == 200                      # no secrets there
        assert http.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        preflight = {"Origin": "http://app.example", "Access-Control-Request-Method": "POST"}
        r = http.options("/v1/chat/completions", headers=preflight)
        assert r.headers.get("access-control-allow-origin") == "http://app.example"
        r = http.options("/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"})
        assert "access-control-allow-origin" not in r.headers
    with pytest.raises(openai.AuthenticationError):
        client(single, "wrong").models.list()
    r = httpx.options(f"{composed}/v1/chat/completions", timeout=TIMEOUT,
                      headers={"Origin": "http://app.example", "Access-Control-Request-Method": "POST"})
    assert "access-control-allow-origin" not in r.headers                  # no --cors-origin: no CORS


class _FakeEngine:
    """What create_app and GET /v1/models read of an engine: no model needed."""
    terms, value_path, value_enabled, model_name, n_ctx = [], None, False, "fake.gguf", 64

    class base_path:
        name = "fake.gguf"

    def close(self):
        pass


@pytest.mark.parametrize("key", ["clé-à", "ключ", "k\udcff"])   # 'à' is c3 a0 (a0: NBSP in latin-1)
def test_a_non_ascii_api_key_can_be_sent(key):
    """Starlette decodes header bytes as latin-1: the key was compared as UTF-8 of that text
    (never equal for a non-ASCII key) after a str.strip() that ate a trailing 0xa0 byte; a
    key from argv that is not UTF-8 (a surrogate escape) raised UnicodeEncodeError (500)."""
    sent = key.encode("utf-8", "surrogateescape")
    # a real server: Starlette's TestClient re-encodes header bytes that are not UTF-8
    with live_server([_FakeEngine()], ServerLimits(api_key=key)) as url, \
            httpx.Client(base_url=url, timeout=TIMEOUT) as http:
        assert http.get("/v1/models", headers={"Authorization": b"Bearer " + sent}).status_code == 200
        for wrong in (sent[:-1], sent + b"x", b"k"):
            r = http.get("/v1/models", headers={"Authorization": b"Bearer " + wrong})
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key", wrong


# --- the command ------------------------------------------------------------------------------------

def test_serve_flags_are_checked_before_anything_loads(tmp_path):
    base = tmp_path / "missing.gguf"
    for args, message in ((["--slots", "0"], "--slots must be between 1"),
                          (["--queue", "-1"], "--queue must be between 0"),
                          (["--api-key", " "], "--api-key is empty"),
                          (["--max-tokens", "4096", "--ctx", "512"], "--max-tokens must be between 1 and 512"),
                          (["--value", "none", "--alpha", "-1"], "--alpha must be between")):
        r = subprocess.run([sys.executable, "-P", "-m", "ivl_local.cli.main", "serve", "--base", str(base), *args],
                           capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr
        assert len(r.stderr.strip().splitlines()) == 1


@pytest.mark.real
@pytest.mark.slow
def test_sigterm_while_a_request_runs_stops_the_server_cleanly(smollm2_path):
    cmd = [sys.executable, "-P", "-m", "ivl_local.cli.main", "serve", "--base", str(smollm2_path), "--value", "none",
           "--port", "0", "--ctx", str(CTX), "--threads", "1", "--api-key", KEY, "--shutdown-timeout", "1"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stderr.readline()          # "ivl serve: MODEL on http://127.0.0.1:PORT/v1 (...)"
        assert " on http://127.0.0.1:" in first, first + proc.stderr.read()
        url = first.split(" on ")[1].split("/v1")[0]
        with httpx.Client(timeout=TIMEOUT) as http:
            response, lines = _open_stream(url, http)
            proc.send_signal(signal.SIGTERM)
            rest = [line for line in lines if line]   # it ends cleanly: an error event, then [DONE]
        assert rest and rest[-1] == "data: [DONE]" and any("shutting_down" in line for line in rest)
        out, err = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert proc.returncode == 0, err
    assert "Traceback" not in err and "ERROR" not in err and "ivl serve: stopped" in err


@pytest.mark.real
@pytest.mark.slow
def test_serve_with_ngram_drafts_gives_the_plain_greedy_answer_and_counts_the_drafts(smollm2_path, reference):
    """`ivl serve --draft ngram`: a quoting prompt (prompt lookup drafts from it) answered greedily
    through the HTTP endpoint equals the plain engine's answer, and the drafts are reported."""
    items = "\n".join(f"{i}. {word}" for i, word in enumerate(
        "apples bananas cherries dates figs grapes kiwis lemons mangoes oranges pears plums".split(), 1))
    prompt = f"Copy the list exactly.\n\nList:\n{items}\n\nCopy:\n1. apples\n2."
    reference["base"].clear_cache()
    expected = reference["base"].complete(prompt, 48, GREEDY)   # the copy: drafts start after a probe
    cmd = [sys.executable, "-P", "-m", "ivl_local.cli.main", "serve", "--base", str(smollm2_path), "--value", "none",
           "--port", "0", "--ctx", str(CTX), "--threads", "1", "--draft", "ngram", "--draft-max", "6"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        first = proc.stderr.readline()
        assert " on http://127.0.0.1:" in first and "drafts: ngram" in first, first + proc.stderr.read()
        url = first.split(" on ")[1].split("/v1")[0]
        answer = client(url).completions.create(model=model_id(url), prompt=prompt, max_tokens=48, temperature=0)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert answer.choices[0].text == expected and expected.strip()
    timings = answer.model_extra["ivl"]["timings"]
    assert timings["drafted"] > 0 and 0 < timings["accepted"] <= timings["drafted"]
    assert proc.returncode == 0


def test_serve_draft_flags_are_checked_before_anything_loads(tmp_path):
    for args, message in ((["--draft-max", "0"], "draft_max"), (["--draft", str(tmp_path / "none.gguf")], "none.gguf")):
        r = subprocess.run([sys.executable, "-P", "-m", "ivl_local.cli.main", "serve", "--base",
                            str(tmp_path / "missing.gguf"), *args], capture_output=True, text=True, timeout=TIMEOUT)
        assert r.returncode in (1, 2), (args, r.stderr)
        assert r.stderr.startswith("error: ") and message in r.stderr and "Traceback" not in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1
