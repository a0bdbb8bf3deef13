"""The OpenAI-compatible server, driven by the official `openai` client and raw HTTP."""

from __future__ import annotations

import http.client
import json
import threading
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

from tests.helpers.infer import lively_model_dir
from tunelab.infer.engine import Engine
from tunelab.infer.sampling import GenerationConfig
from tunelab.infer.server import OpenAIServer

PROMPTS = ["The quick brown", "Hello world", "def add(a, b):", "Über café", "12 + 30", "user"]


@pytest.fixture(scope="module")
def engine(tmp_path_factory, tiny_tokenizer_dir):
    d = lively_model_dir(tmp_path_factory.mktemp("srv"), "qwen2_untied", tiny_tokenizer_dir)
    return Engine.from_pretrained(d, device="cpu", name="tiny", prompt_type="qwen")


def _serve(engine, **kwargs):
    server = OpenAIServer(engine, host="127.0.0.1", port=0, **kwargs)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    return server, thread


@pytest.fixture(scope="module")
def server(engine):
    server, thread = _serve(engine, max_batch_size=8, batch_wait_s=0.05)
    yield server
    server.close()
    thread.join(10)
    assert not thread.is_alive()
    # Every handler thread and the engine thread have ended.
    names = [t.name for t in threading.enumerate()]
    assert not [n for n in names if "process_request" in n or n == "tunelab-engine"], names


@pytest.fixture(scope="module")
def client(server):
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield c
    c.close()


def _expected(engine, prompt: str, max_tokens: int) -> str:
    cfg = GenerationConfig(max_new_tokens=max_tokens)
    return engine.complete([engine.encode_text(prompt)], cfg)[0].text


def _raw(server, method: str, path: str, body: bytes | None = None, headers=None):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    conn.request(method, path, body=body, headers=headers or {})
    resp = conn.getresponse()
    data = resp.read()
    conn.close()
    return resp.status, json.loads(data)


def test_models(client):
    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]


def test_completion_non_streaming(client, engine):
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=10, temperature=0)
    assert r.choices[0].text == _expected(engine, PROMPTS[0], 10)
    assert r.choices[0].finish_reason == "length"
    n_prompt = len(engine.encode_text(PROMPTS[0]))
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (n_prompt, 10)


def test_completion_streaming_equals_non_streaming(client, engine):
    chunks = list(
        client.completions.create(
            model="tiny", prompt=PROMPTS[2], max_tokens=12, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == _expected(engine, PROMPTS[2], 12)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello there"},
    {"role": "assistant", "content": "Hi! 你好"},
    {
        "role": "user",
        "content": [{"type": "text", "text": "12 + "}, {"type": "text", "text": "30?"}],
    },
]
CHAT_FLAT = [*CHAT[:3], {"role": "user", "content": "12 + 30?"}]


def test_chat_non_streaming(client, engine):
    r = client.chat.completions.create(model="tiny", messages=CHAT, max_tokens=10, temperature=0)
    ids = engine.encode_chat(CHAT_FLAT)
    want = engine.complete([ids], GenerationConfig(max_new_tokens=10))[0]
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == want.text
    assert r.choices[0].finish_reason == want.finish_reason
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == len(want.token_ids)


def test_chat_streaming(client, engine):
    chunks = list(
        client.chat.completions.create(
            model="tiny", messages=CHAT, max_completion_tokens=10, temperature=0, stream=True
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    want = engine.complete([engine.encode_chat(CHAT_FLAT)], GenerationConfig(max_new_tokens=10))
    assert text == want[0].text
    assert chunks[-1].choices[0].finish_reason == want[0].finish_reason


def test_chat_must_end_with_a_user_turn(client):
    with pytest.raises(openai.BadRequestError, match="user"):
        client.chat.completions.create(model="tiny", messages=CHAT[:3], max_tokens=3)


def test_chat_without_template_is_a_clear_error(tmp_path, engine):
    plain = Engine(engine.model, engine.tokenizer, engine.cfg, device=engine.device,
                   dtype=engine.dtype, name="tiny")  # fmt: skip
    server, thread = _serve(plain)
    try:
        c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=60)
        with pytest.raises(openai.BadRequestError, match="--prompt-type"):
            c.chat.completions.create(model="tiny", messages=CHAT, max_tokens=3)
        c.close()
    finally:
        server.close()
        thread.join(10)


def test_completion_batch_of_prompts_and_token_ids(client, engine):
    ids = engine.encode_text(PROMPTS[4])
    r = client.completions.create(
        model="tiny", prompt=[PROMPTS[3], PROMPTS[1]], max_tokens=6, temperature=0
    )
    assert [c.text for c in r.choices] == [_expected(engine, p, 6) for p in PROMPTS[3:0:-2]]
    r2 = client.completions.create(model="tiny", prompt=ids, max_tokens=6, temperature=0)
    assert r2.choices[0].text == _expected(engine, PROMPTS[4], 6)


def test_seeded_n_choices_are_reproducible(client):
    kw = dict(model="tiny", prompt=PROMPTS[0], max_tokens=8, temperature=1.0, seed=5, n=3)
    a, b = client.completions.create(**kw), client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert len({c.text for c in a.choices}) > 1  # each choice has its own seed


def test_streaming_several_choices_and_echo(client, engine):
    kw = dict(model="tiny", prompt=[PROMPTS[0], PROMPTS[1]], max_tokens=5, temperature=0)
    texts = ["", ""]
    reasons = [None, None]
    for chunk in client.completions.create(**kw, stream=True):
        for c in chunk.choices:
            texts[c.index] += c.text
            reasons[c.index] = c.finish_reason or reasons[c.index]
    assert texts == [_expected(engine, p, 5) for p in PROMPTS[:2]]
    assert reasons == ["length", "length"]
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[2], max_tokens=4, temperature=0, echo=True
    )
    assert r.choices[0].text == PROMPTS[2] + _expected(engine, PROMPTS[2], 4)


def test_stop_string(client, engine):
    full = _expected(engine, PROMPTS[1], 12)
    stop = full[4:7]
    r = client.completions.create(
        model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_concurrent_requests_are_batched_and_correct(client, engine, server):
    def one(i: int) -> str:
        prompt = PROMPTS[i % len(PROMPTS)]
        if i % 2:
            stream = client.completions.create(
                model="tiny", prompt=prompt, max_tokens=8, temperature=0, stream=True
            )
            return "".join(c.choices[0].text for c in stream if c.choices)
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=8, temperature=0)
        return r.choices[0].text

    # Hold the engine until all 12 requests wait, so batching is certain, not a race.
    server.worker.pause()
    try:
        with ThreadPoolExecutor(12) as pool:
            futures = [pool.submit(one, i) for i in range(12)]
            for _ in range(6000):
                if server.worker.num_queued() >= 11 or any(f.done() for f in futures):
                    break
                threading.Event().wait(0.01)
            server.worker.resume()
            got = [f.result(timeout=300) for f in futures]
    finally:
        server.worker.resume()
    assert got == [_expected(engine, PROMPTS[i % len(PROMPTS)], 8) for i in range(12)]
    assert server.worker.max_batch_seen == 8  # the server's max_batch_size


@pytest.mark.parametrize(
    "path,body,status,param",
    [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", b'{"model": "tiny"}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": "x", "temperature": 5}', 400, "temperature"),
        ("/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        ("/v1/completions", b'{"prompt": "x", "n": 1000}', 400, "n"),
        ("/v1/completions", b'{"prompt": "x", "stream": "yes"}', 400, "stream"),
        ("/v1/completions", b'{"prompt": "x", "presence_penalty": 1.0}', 400, "presence_penalty"),
        ("/v1/completions", b'{"prompt": [1, "a"]}', 400, "prompt"),
        ("/v1/completions", b'{"prompt": [99999]}', 400, None),
        ("/v1/completions", b'{"prompt": "x", "stop": [""]}', 400, "stop"),
        ("/v1/completions", b'{"prompt": "x", "model": "other"}', 404, "model"),
        ("/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        (
            "/v1/chat/completions",
            b'{"messages": [{"role": "robot", "content": "x"}]}',
            400,
            "messages",
        ),
        ("/v1/nothing", b"{}", 404, None),
    ],
)
def test_bad_requests_get_openai_errors(server, path, body, status, param):
    code, data = _raw(server, "POST", path, body, {"Content-Type": "application/json"})
    assert code == status
    assert set(data["error"]) == {"message", "type", "param", "code"} and data["error"]["message"]
    assert data["error"]["param"] == param


def test_wrong_methods(server):
    assert _raw(server, "GET", "/v1/completions")[0] == 405
    status, data = _raw(server, "DELETE", "/v1/models")
    assert status == 405 and data["error"]["message"]


def test_prompt_longer_than_context(client, server):
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny", prompt=[5] * 300, max_tokens=4)
    assert "context is 256 tokens" in e.value.message
    assert e.value.code == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError, match="requested"):
        client.completions.create(model="tiny", prompt=[5] * 200, max_tokens=100)


def test_client_that_leaves_mid_stream_does_not_hurt(server, client, engine):
    host, port = server.server_address[:2]
    conn = http.client.HTTPConnection(host, port, timeout=60)
    body = json.dumps({"prompt": "hi", "max_tokens": 200, "stream": True, "temperature": 0})
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.readline()
    conn.close()
    r = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=5, temperature=0)
    assert r.choices[0].text == _expected(engine, PROMPTS[0], 5)


def test_api_key(engine):
    server, thread = _serve(engine, api_key="s3cret")
    try:
        url = server.url + "/v1"
        bad = openai.OpenAI(base_url=url, api_key="wrong", max_retries=0, timeout=60)
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model="tiny", prompt="x", max_tokens=2)
        good = openai.OpenAI(base_url=url, api_key="s3cret", max_retries=0, timeout=60)
        assert good.completions.create(model="tiny", prompt="x", max_tokens=2).choices
        assert _raw(server, "GET", "/health") == (200, {"status": "ok"})
    finally:
        server.close()
        thread.join(10)


def test_close_with_requests_in_flight(engine):
    server, thread = _serve(engine)
    c = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
    first = threading.Event()
    result = {}

    def long_stream():
        text, reason = "", None
        stream = c.completions.create(
            model="tiny", prompt="hi", max_tokens=100, temperature=0, stream=True,
            extra_body={"ignore_eos": True},
        )  # fmt: skip
        for chunk in stream:
            first.set()
            for choice in chunk.choices:
                text += choice.text
                reason = choice.finish_reason or reason
        result["reason"] = reason

    t = threading.Thread(target=long_stream)
    t.start()
    assert first.wait(120)
    server.close()  # cancels the running generation and ends the connection cleanly
    thread.join(30)
    t.join(30)
    assert not thread.is_alive() and not t.is_alive()
    # "stop" when the close cancelled it, "length" if it had already finished: the client
    # gets a well-formed end either way, and nothing hangs.
    assert result.get("reason") in ("stop", "length")
    c.close()
