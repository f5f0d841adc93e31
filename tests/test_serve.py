"""`cai.serve` against hostile and malformed requests, on 127.0.0.1 with real sockets: every bad request gets a
JSON error naming the field (never a dropped connection), bodies and max_tokens are bounded, the key guards every
route and is compared in constant time, slow clients are cut off, and a non-loopback bind needs a key.
(Generation and scoring through the OpenAI backend: tests/test_openai_backend.py.)"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from cai.config import ServeConfig, build_config, parse_overrides
from cai.errors import CaiError
from cai.serve import _flags_to_overrides, check_bind, is_loopback, main, make_server
from tests.conftest import raw_exchange

from .conftest import ROOT

KEY = "sk-serve-test-0123456789"
LIMITS = dict(model="tiny", max_body_bytes=4096, max_tokens=4096, default_max_tokens=3, max_logprobs=20, timeout=1.0)


@pytest.fixture(scope="module")
def port():
    from cai.backends import make_backend

    backend = make_backend("transformers", "tiny", dtype="float32", batch_size=1)
    backend.progress = False
    server = make_server(backend, ServeConfig(port=0, **LIMITS), KEY)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def exchange(port: int, data: bytes, timeout: float = 20) -> tuple[int, dict]:
    """Send raw bytes to the server on 127.0.0.1: (status, JSON body)."""
    return raw_exchange("127.0.0.1", port, data, timeout)


def request(port, method, path, body=b"", key=KEY, headers=(), length=True):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1"]
    if length:
        lines.append(f"Content-Length: {len(data)}".encode())
    if key is not None:
        lines.append(f"Authorization: Bearer {key}".encode())
    return exchange(port, b"\r\n".join(lines + list(headers)) + b"\r\n\r\n" + data)


def error(answer) -> str:
    return answer[1]["error"]["message"]


HI = [{"role": "user", "content": "hi"}]
CHAT, COMPLETE = "/v1/chat/completions", "/v1/completions"


@pytest.mark.parametrize("path, body, status, message", [
    (CHAT, b"{oops", 400, "body: expected a JSON object"),
    (CHAT, b"[1, 2]", 400, "body: expected a JSON object, got list"),
    (CHAT, b'"text"', 400, "body: expected a JSON object, got str"),
    (CHAT, b"\xff\xfe{}", 400, "body: expected a JSON object"),
    (CHAT, b'{"messages": [], "messages": [1]}', 400, "body: expected a JSON object (key 'messages' appears twice"),
    (CHAT, {"messages": []}, 400, "messages: expected a non-empty list"),
    (CHAT, {"messages": "hi"}, 400, "messages: expected a non-empty list"),
    (CHAT, {}, 400, "messages: expected a non-empty list"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0]: expected"),
    (CHAT, {"messages": [{"role": "tool", "content": "x"}]}, 400, "messages[0]: expected"),
    (CHAT, {"messages": ["hi"]}, 400, "messages[0]: expected"),
    (CHAT, {"messages": HI, "max_tokens": -1}, 400, "max_tokens: expected 1 to 4096"),
    (CHAT, {"messages": HI, "max_tokens": 0}, 400, "max_tokens: expected 1 to 4096"),
    (CHAT, {"messages": HI, "max_tokens": 10**12}, 400, "max_tokens: expected 1 to 4096 (max_tokens setting)"),
    (CHAT, {"messages": HI, "max_tokens": 3000}, 400, "max_tokens: the prompt ("),  # beyond tiny's 2048 context
    (CHAT, {"messages": HI, "max_tokens": "5"}, 400, "max_tokens: expected an integer"),
    (CHAT, {"messages": HI, "max_tokens": 2.5}, 400, "max_tokens: expected an integer"),
    (CHAT, {"messages": HI, "max_tokens": True}, 400, "max_tokens: expected an integer"),
    (CHAT, {"messages": HI, "temperature": "nan"}, 400, "temperature: expected a finite number"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400,
     "temperature: expected a finite number"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', 400,
     "top_p: expected a finite number"),
    (CHAT, {"messages": HI, "temperature": -1}, 400, "temperature: expected a number >= 0.0"),
    (CHAT, {"messages": HI, "top_p": 0}, 400, "top_p: expected a number > 0.0 and <= 1.0"),
    (CHAT, {"messages": HI, "top_k": -3}, 400, "top_k: expected 0 to"),
    (CHAT, {"messages": HI, "seed": "7"}, 400, "seed: expected an integer"),
    (CHAT, {"messages": HI, "stop": 5}, 400, "stop: expected a string or a list"),
    (CHAT, {"messages": HI, "stop": [""]}, 400, "stop: expected a string or a list"),
    (CHAT, {"messages": HI, "continue_final_message": True}, 400, "continue_final_message: needs a final assistant"),
    (CHAT, {"messages": HI, "continue_final_message": "yes"}, 400, "continue_final_message: expected true or false"),
    (CHAT, {"messages": HI, "stream": True}, 400, "stream: streaming is not supported"),
    (CHAT, {"messages": HI, "n": 3}, 400, "n: only n=1"),
    (CHAT, {"messages": HI, "model": 3}, 400, "model: expected a string"),
    (CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}', 400, "body: a string holds an unpaired surrogate"),
    (COMPLETE, {"prompt": "The answer is (", "max_tokens": 1, "logprobs": -1}, 400, "logprobs: expected 1 to 20"),
    (COMPLETE, {"prompt": "The answer is (", "max_tokens": 1, "logprobs": 0}, 400, "logprobs: expected 1 to 20"),
    (COMPLETE, {"prompt": "The answer is (", "max_tokens": 1, "logprobs": 21}, 400, "logprobs: expected 1 to 20"),
    (COMPLETE, {"prompt": "The answer is (", "max_tokens": 1, "logprobs": "5"}, 400, "logprobs: expected an integer"),
    (COMPLETE, {"prompt": "The answer is (", "max_tokens": 1}, 400, "logprobs: expected an integer from 1 to 20"),
    (COMPLETE, {"prompt": "The answer is (", "max_tokens": 5, "logprobs": 5}, 400, "max_tokens: this server answers"),
    (COMPLETE, {"prompt": ["a", "b"], "max_tokens": 1, "logprobs": 5}, 400, "prompt: expected a non-empty string"),
    (COMPLETE, {"prompt": "", "max_tokens": 1, "logprobs": 5}, 400, "prompt: expected a non-empty string"),
    (COMPLETE, {"prompt": "word " * 1000, "max_tokens": 1, "logprobs": 5}, 413, "request body over 4096 bytes"),
    ("/v1/embeddings", {"input": "x"}, 404, "no route POST /v1/embeddings"),
])
def test_malformed_requests_get_a_json_answer(port, path, body, status, message):
    answer = request(port, "POST", path, body)
    assert answer[0] == status and error(answer).startswith(message), answer


def test_good_requests_are_answered_within_the_limits(port):
    status, out = request(port, "POST", CHAT, {"messages": HI, "max_tokens": 2, "temperature": 0})
    assert status == 200 and out["usage"]["completion_tokens"] <= 2 and out["choices"][0]["message"]["role"] == "assistant"
    status, out = request(port, "POST", CHAT, {"messages": HI, "temperature": 0, "seed": -5, "stop": "\n"})
    assert status == 200 and out["usage"]["completion_tokens"] <= LIMITS["default_max_tokens"]
    status, out = request(port, "POST", COMPLETE, {"prompt": "The answer is (", "max_tokens": 1, "logprobs": 20})
    assert status == 200 and 1 <= len(out["choices"][0]["logprobs"]["top_logprobs"][0]) <= 20


@pytest.mark.parametrize("value", [b"\xb2", "²".encode(), "١٢".encode(), b"-1", b"1e3", b"+5", b"12 34", b"0x10", b""])
def test_bad_content_length_is_400(port, value):
    answer = exchange(port, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + KEY.encode() +
                      b"\r\nContent-Length: " + value + b"\r\n\r\n{}")
    assert answer[0] == 400 and error(answer) == "Content-Length: expected one number of bytes (ASCII digits)"


def test_body_size_is_checked_before_the_body_is_read(port):
    # 10 GB announced, nothing sent: the answer comes at once
    start = time.time()
    answer = request(port, "POST", CHAT, b"", length=False, headers=[b"Content-Length: 10000000000"])
    assert answer[0] == 413 and error(answer) == "request body over 4096 bytes (max_body_bytes)"
    assert time.time() - start < 0.9  # well inside the 1 s socket timeout
    answer = request(port, "POST", CHAT, b"{}", length=False, headers=[b"Content-Length: 2", b"Content-Length: 3"])
    assert answer[0] == 400 and error(answer).startswith("Content-Length: expected one number")
    assert request(port, "POST", CHAT, b"{}", length=False)[0] == 411
    answer = request(port, "POST", CHAT, b"2\r\n{}\r\n0\r\n\r\n", length=False, headers=[b"Transfer-Encoding: chunked"])
    assert answer[0] == 411 and "Content-Length" in error(answer)


def test_the_key_guards_every_route_and_any_header_bytes_get_401(port):
    assert request(port, "GET", "/v1/models")[1]["data"][0]["id"] == "tiny"
    for key, headers in [(None, []), ("sk-wrong", []), (KEY + "x", []), (KEY[:-1], []),
                         (None, [b"Authorization: Bearer sk-\xe9\xff\x00"]),  # non-ASCII bytes in the header
                         (None, ["Authorization: Bearer sk-ключ".encode()]),
                         (None, [b"Authorization: " + KEY.encode()]),  # no "Bearer"
                         (KEY, [b"Authorization: Bearer other"])]:  # two Authorization headers
        for method, path, body in [("GET", "/v1/models", b""), ("POST", CHAT, {"messages": HI, "max_tokens": 1})]:
            answer = request(port, method, path, body, key=key, headers=headers)
            assert answer[0] == 401 and error(answer).startswith("missing or wrong API key"), (key, headers, answer)
            assert KEY not in json.dumps(answer[1])
    assert request(port, "GET", "/v1/nothing")[0] == 404
    # http.server's own refusals are JSON too
    assert exchange(port, b"GET /v1/models two spaces HTTP/1.1\r\n\r\n")[0] == 400
    assert exchange(port, b"PUT /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")[0] == 501
    assert exchange(port, b"GET /v1/models HTTP/1.1\r\n" + b"X-A: b\r\n" * 120 + b"\r\n")[0] == 431


def test_a_slow_client_loses_its_connection(port):
    """A client that stops mid-request (headers, or body) is cut off after the socket timeout (1 s here)."""
    for partial in (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n",
                    b"POST /v1/chat/completions HTTP/1.1\r\nAuthorization: Bearer " + KEY.encode() +
                    b"\r\nContent-Length: 100\r\n\r\n{\"mess"):
        with socket.create_connection(("127.0.0.1", port), timeout=8) as s:
            s.sendall(partial)
            start = time.time()
            assert s.recv(65536) == b""  # closed by the server (a socket.timeout here means it still waits)
            assert time.time() - start < 6
    assert request(port, "GET", "/v1/models")[0] == 200  # and the server still answers others


def test_settings_are_checked_and_documented(capsys):
    with pytest.raises(CaiError, match=r"default_max_tokens=500: expected at most max_tokens=100"):
        build_config(ServeConfig, {}, "command line", parse_overrides(["max_tokens=100", "default_max_tokens=500"]))
    for bad, msg in [("timeout=0", r"timeout=0.0: expected a number > 0"),
                     ("max_body_bytes=0", r"max_body_bytes=0: expected a number >= 1"),
                     ("port=70000", r"port=70000: expected a number >= 0 and <= 65535"),
                     ("api_key_env=AWS_SECRET_ACCESS_KEY", r"api_key_env=AWS_SECRET_ACCESS_KEY: expected the name")]:
        with pytest.raises(CaiError, match=msg):
            main.__wrapped__([bad])
    main.__wrapped__(["--help"])
    out = capsys.readouterr().out
    assert all(k in out for k in ("max_body_bytes", "max_tokens", "default_max_tokens", "max_logprobs", "timeout"))
    assert _flags_to_overrides(["--model", "tiny", "--port=0", "--api-key-env", "X_API_KEY", "dtype=float32"]) == [
        "model=tiny", "port=0", "api_key_env=X_API_KEY", "dtype=float32"]


def test_a_non_loopback_bind_needs_a_key(monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost") and is_loopback("127.1.2.3")
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "192.168.1.10", "10.0.0.1", "no-such-host.invalid"))
    cfg = lambda host: ServeConfig(host=host, model="tiny")  # noqa: E731
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        with pytest.raises(CaiError, match=rf"host={host}: serving beyond this machine needs an API key; set the "
                                           "variable CAI_SERVE_API_KEY"):
            check_bind(cfg(host), None)
        check_bind(cfg(host), KEY)  # with a key: allowed
    check_bind(cfg("127.0.0.1"), None)
    with pytest.raises(CaiError, match="CAI_SERVE_API_KEY: expected a key of printable ASCII"):
        check_bind(cfg("127.0.0.1"), "sk key with spaces")
    # the command line: one line, exit 2, before any model loads
    env = {k: v for k, v in os.environ.items() if k != "CAI_SERVE_API_KEY"}
    r = subprocess.run([sys.executable, "-m", "cai.serve", "model=tiny", "host=0.0.0.0", "port=0"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == ["error: host=0.0.0.0: serving beyond this machine needs an API key; set the "
                                             "variable CAI_SERVE_API_KEY (api_key_env) or bind host=127.0.0.1"]
