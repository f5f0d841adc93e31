"""`python -m cai.serve model=runs/x/sl/model port=8000`: a small OpenAI-compatible server.

Serves any model the transformers backend loads (a trained SL-CAI or RL-CAI policy, a preset) to tools that
speak the OpenAI API, and is the loopback server the OpenAI backend is tested against. Endpoints:
- `POST /v1/chat/completions`: messages, max_tokens, temperature, top_p, top_k, seed, stop, and the vLLM
  extension `continue_final_message` (continue the last assistant message instead of answering);
- `POST /v1/completions` with `max_tokens: 1` and `logprobs: K`: the top-K next-token log-probabilities of a raw
  prompt (what option scoring needs; longer raw completions are not served);
- `GET /v1/models`.
Requests are answered one at a time (one model, no batching across requests). Binds 127.0.0.1 by default; any
other address needs an API key. If the environment variable named by `api_key_env` is set, every request
(`/v1/models` too) must carry it as a Bearer token. Settings (`key=value`; the older `--key value` works too):
`ServeConfig` in cai/config.py, printed by `--help`. A request the server cannot answer gets a JSON error
(400 bad field, 401 key, 404 route, 411/413 body size) naming the field; it never drops the connection.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import math
import os
import re
import socket
import sys
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

from cai.backends import Sampling
from cai.config import ServeConfig, build_config, help_text, parse_overrides
from cai.errors import CaiError, cli_main
from cai.io import has_lone_surrogate, parse_json
from cai.models import resolve_model

ROLES = ("system", "user", "assistant")
MAX_STOPS = 16
_LENGTH = re.compile(r"[0-9]{1,15}")  # ASCII digits only: str.isdigit/int() also take "²" and "١"
_KEY_CHARS = re.compile(r"[\x21-\x7e]+")


class Refusal(Exception):
    """A request the server answers with an error: (HTTP status, one-line message naming the field)."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def content_length(headers, limit: int) -> int:
    """The body size a request announces: one Content-Length of ASCII digits, at most `limit` (else 413)."""
    if headers.get("Transfer-Encoding") is not None:
        raise Refusal(411, "Transfer-Encoding is not accepted; send the body with a Content-Length")
    values = headers.get_all("Content-Length") or []
    if not values:
        raise Refusal(411, "expected a Content-Length header")
    if len(values) != 1 or not _LENGTH.fullmatch(values[0].strip()):
        raise Refusal(400, "Content-Length: expected one number of bytes (ASCII digits)")
    n = int(values[0].strip())
    if n > limit:
        raise Refusal(413, f"request body over {limit} bytes (max_body_bytes)")
    return n


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(body: dict, field: str, default: float, lo: float, hi: float | None = None, lo_open=False) -> float:
    v = body.get(field)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise Refusal(400, f"{field}: expected a finite number, got {json.dumps(v)[:40]}")
    if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
        bound = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
        raise Refusal(400, f"{field}: expected a number {bound}, got {v}")
    return float(v)


def _integer(body: dict, field: str, default: int | None, lo: int, hi: int, why: str = "") -> int | None:
    v = body.get(field)
    if v is None:
        return default
    if not _is_int(v):
        raise Refusal(400, f"{field}: expected an integer, got {json.dumps(v)[:40]}")
    if not lo <= v <= hi:
        raise Refusal(400, f"{field}: expected {lo} to {hi}{why}, got {v}")
    return v


def is_loopback(host: str) -> bool:
    """Whether every address `host` names is a loopback address (0.0.0.0 and :: are not: they bind them all)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0].split("%")[0]).is_loopback for i in infos)


def make_handler(backend, cfg: ServeConfig, api_key: str | None):
    """The request handler: every answer is JSON; limits from `cfg`; `api_key` (or None) guards every route."""
    import torch  # heavy: the module itself stays torch-free, so a bad setting fails before torch loads

    lock = threading.Lock()  # one model: one request at a time
    model_name = cfg.name or cfg.model
    context = int(getattr(backend.model.config, "max_position_embeddings", 0) or 0) or None
    expected = hashlib.sha256(f"Bearer {api_key}".encode()).digest() if api_key else None

    def check_context(prompt_tokens: int, new_tokens: int, field: str) -> None:
        if context is not None and prompt_tokens + new_tokens > context:
            raise Refusal(400, f"{field}: the prompt ({prompt_tokens} tokens) and {new_tokens} new tokens exceed the "
                               f"model's context of {context} tokens")

    def chat(body: dict) -> dict:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise Refusal(400, "messages: expected a non-empty list of {role, content} objects")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise Refusal(400, f"messages[{i}]: expected {{\"role\": {' | '.join(ROLES)}, \"content\": string}}")
        cont = body.get("continue_final_message", False)
        if not isinstance(cont, bool):
            raise Refusal(400, "continue_final_message: expected true or false")
        if cont and messages[-1]["role"] != "assistant":
            raise Refusal(400, "continue_final_message: needs a final assistant message")
        if body.get("stream"):
            raise Refusal(400, "stream: streaming is not supported; send stream=false")
        if body.get("n", 1) != 1:
            raise Refusal(400, "n: only n=1 is supported")
        max_tokens = _integer(body, "max_tokens", cfg.default_max_tokens, 1, cfg.max_tokens, " (max_tokens setting)")
        stop = body.get("stop")
        stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
            raise Refusal(400, f"stop: expected a string or a list of at most {MAX_STOPS} non-empty strings")
        sampling = Sampling(max_new_tokens=max_tokens, temperature=_number(body, "temperature", 1.0, 0.0),
                            top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
                            top_k=_integer(body, "top_k", 0, 0, 1 << 31), stop=tuple(stop))
        seed = _integer(body, "seed", 0, -(1 << 63), (1 << 64) - 1)
        with lock:
            try:
                prompt_tokens = len(backend._encode(backend.chat_prompt(messages)))
            except Exception as e:  # the model's chat template refuses some conversations (e.g. roles out of order)
                raise Refusal(400, f"messages: the model's chat template refused them ({type(e).__name__}: "
                                   f"{str(e)[:200]})") from None
            # the KV cache is sized for prompt + max_tokens up front: bounded before any memory is taken
            check_context(prompt_tokens, max_tokens, "max_tokens")
            out = backend.generate([messages], sampling, [seed])[0]
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": "length" if out.finish_reason == "length" else "stop",
                             "stop_reason": "stop" if out.finish_reason == "stop" else None}],
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                          "total_tokens": out.prompt_tokens + out.completion_tokens}}

    def completion_logprobs(body: dict) -> dict:
        if body.get("max_tokens", 16) != 1:
            raise Refusal(400, "max_tokens: this server answers /v1/completions only for scoring: max_tokens=1 "
                               "with logprobs=K")
        k = _integer(body, "logprobs", None, 1, cfg.max_logprobs, " (max_logprobs setting)")
        if k is None:
            raise Refusal(400, f"logprobs: expected an integer from 1 to {cfg.max_logprobs} (top-K to return)")
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise Refusal(400, "prompt: expected a non-empty string")
        with lock, torch.inference_mode():
            ids = backend._encode(prompt)
            if not ids:
                raise Refusal(400, "prompt: expected at least one token")
            check_context(len(ids), 0, "prompt")
            logits = backend.model(input_ids=torch.tensor([ids], device=backend.device), logits_to_keep=1).logits[0, -1]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        top = torch.topk(logp, min(k, logp.shape[-1]))
        table: dict[str, float] = {}
        for lp, tid in zip(top.values.tolist(), top.indices.tolist()):
            text = backend.tokenizer.decode([tid])
            table.setdefault(text, lp)  # two ids can decode alike: keep the likelier
        best = backend.tokenizer.decode([int(top.indices[0])])
        return {"id": f"cmpl-{time.time_ns()}", "object": "text_completion", "model": model_name,
                "choices": [{"index": 0, "text": best, "finish_reason": "length",
                             "logprobs": {"tokens": [best], "token_logprobs": [float(top.values[0])],
                                          "top_logprobs": [table]}}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": 1, "total_tokens": len(ids) + 1}}

    routes = {"/v1/chat/completions": chat, "/v1/completions": completion_logprobs}

    class Handler(BaseHTTPRequestHandler):
        timeout = cfg.timeout  # a socket timeout: a client that stalls mid-request loses its connection

        def log_message(self, *args):  # quiet: no request lines (they could carry prompts) on stderr
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            if status == 401:
                self.send_header("WWW-Authenticate", "Bearer")
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            self.wfile.write(data)

        def send_error(self, code, message=None, explain=None):
            """http.server's own refusals (a garbled request line, too many headers, an unknown method): JSON too."""
            self.close_connection = True
            text = message or self.responses.get(code, ("error",))[0]
            self._send(code, {"error": {"message": f"{text} ({code})", "code": code}})

        def _refuse(self, e: Refusal) -> None:
            self._send(e.status, {"error": {"message": str(e), "type": "invalid_request_error", "code": e.status}})

        def _authorize(self) -> None:
            if expected is None:
                return
            given = self.headers.get_all("Authorization") or []
            # headers arrive as latin-1 text: any bytes (non-ASCII too) encode back; digests compare in constant time
            digest = hashlib.sha256(given[0].encode("latin-1", "replace")).digest() if len(given) == 1 else b""
            if not hmac.compare_digest(digest, expected):
                raise Refusal(401, "missing or wrong API key (expected 'Authorization: Bearer KEY')")

        def _answer(self, method: str) -> None:
            try:
                try:
                    self._authorize()
                    path = urlsplit(self.path).path.rstrip("/")
                    if method == "GET":
                        if path != "/v1/models":
                            raise Refusal(404, f"no route GET {path or '/'}")
                        return self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model",
                                                                             "owned_by": "cai"}]})
                    n = content_length(self.headers, cfg.max_body_bytes)
                except Refusal:
                    self.close_connection = True  # a body may follow that nobody reads: end the connection
                    raise
                raw = self.rfile.read(n)
                if len(raw) < n:
                    self.close_connection = True
                    raise Refusal(400, f"body: {len(raw)} of the {n} bytes Content-Length announced")
                if path not in routes:
                    raise Refusal(404, f"no route POST {path or '/'}")
                try:
                    body = parse_json(raw.decode("utf-8"))
                except (ValueError, UnicodeDecodeError) as e:
                    raise Refusal(400, f"body: expected a JSON object ({str(e)[:120]})") from None
                if not isinstance(body, dict):
                    raise Refusal(400, f"body: expected a JSON object, got {type(body).__name__}")
                if has_lone_surrogate(body):
                    raise Refusal(400, "body: a string holds an unpaired surrogate (\\ud800-\\udfff): not Unicode text")
                model = body.get("model")
                if model is not None and not isinstance(model, str):
                    raise Refusal(400, "model: expected a string")
                self._send(200, routes[path](body))
            except Refusal as e:
                self._refuse(e)
            except (TimeoutError, ConnectionError):
                self.close_connection = True
            except Exception as e:  # a bug or an out-of-memory: the client gets an answer, the log the traceback
                traceback.print_exc(file=sys.stderr)
                self.close_connection = True
                self._send(500, {"error": {"message": f"internal error ({type(e).__name__})", "code": 500}})

        def do_GET(self):
            self._answer("GET")

        def do_POST(self):
            self._answer("POST")

    return Handler


def check_bind(cfg: ServeConfig, api_key: str | None) -> None:
    """No key: loopback only. A key must be sendable in a header (printable ASCII, no spaces)."""
    if not api_key and not is_loopback(cfg.host):
        raise CaiError(f"host={cfg.host}: serving beyond this machine needs an API key; set the variable "
                       f"{cfg.api_key_env} (api_key_env) or bind host=127.0.0.1")
    if api_key and not _KEY_CHARS.fullmatch(api_key):
        raise CaiError(f"{cfg.api_key_env}: expected a key of printable ASCII characters without spaces")


def make_server(backend, cfg: ServeConfig, api_key: str | None) -> ThreadingHTTPServer:
    """A server bound to cfg.host:cfg.port (not yet serving). Refuses a non-loopback address without a key."""
    check_bind(cfg, api_key)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    server_class = type("Server", (ThreadingHTTPServer,), {"address_family": family, "daemon_threads": True})
    try:
        return server_class((cfg.host.strip("[]"), cfg.port), make_handler(backend, cfg, api_key))
    except OSError as e:
        raise CaiError(f"host={cfg.host} port={cfg.port}: cannot listen ({e.strerror})") from None


def _flags_to_overrides(argv: list[str]) -> list[str]:
    """`--api-key-env X` / `--port=0` (the older spelling) -> `api_key_env=X` / `port=0`."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and a not in ("--help",):
            key, eq, value = a[2:].partition("=")
            if not eq:
                if i + 1 >= len(argv):
                    raise CaiError(f"argument '{a}': expected a value")
                i, value = i + 1, argv[i + 1]
            out.append(f"{key.replace('-', '_')}={value}")
        else:
            out.append(a)
        i += 1
    return out


@cli_main
def main(argv: list[str]) -> int:
    if "--help" in argv or "-h" in argv:
        print(__doc__)
        print("\n".join(help_text(ServeConfig)))
        return 0
    cfg = build_config(ServeConfig, {}, "command line", parse_overrides(_flags_to_overrides(argv)))
    api_key = os.environ.get(cfg.api_key_env) or None
    check_bind(cfg, api_key)  # before torch and the model load: a refusal costs no time
    from cai.backends.transformers_backend import TransformersBackend  # heavy

    backend = TransformersBackend(resolve_model(cfg.model), dtype=cfg.dtype, device="auto", batch_size=1, progress=False)
    server = make_server(backend, cfg, api_key)
    host = f"[{cfg.host}]" if ":" in cfg.host else cfg.host
    print(f"serving {cfg.model} on http://{host}:{server.server_address[1]}/v1", flush=True)
    if not api_key:
        print(f"no API key ({cfg.api_key_env} is unset): anyone on this machine may use the server", file=sys.stderr)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
