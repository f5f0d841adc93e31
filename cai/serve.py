"""`python -m cai.serve --model runs/x/sl/model --port 8000`: a small OpenAI-compatible server.

Serves any model the transformers backend loads (a trained SL-CAI or RL-CAI policy, a preset) to tools that
speak the OpenAI API, and is the loopback server the OpenAI backend is tested against. Endpoints:
- `POST /v1/chat/completions`: messages, max_tokens, temperature, top_p, top_k, seed, stop, and the vLLM
  extension `continue_final_message` (continue the last assistant message instead of answering);
- `POST /v1/completions` with `max_tokens: 1` and `logprobs: K`: the top-K next-token log-probabilities of a raw
  prompt (what option scoring needs; longer raw completions are not served);
- `GET /v1/models`.
Requests are answered one at a time (one model, no batching across requests). Binds 127.0.0.1 by default. If
the environment variable named by `--api-key-env` is set, requests must carry it as a Bearer token.
"""

from __future__ import annotations

import argparse
import hmac
import json
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import torch

from cai.backends import Sampling
from cai.backends.transformers_backend import TransformersBackend
from cai.errors import cli_main
from cai.models import resolve_model


def make_handler(backend, model_name: str, api_key: str | None):
    lock = threading.Lock()  # one model: one request at a time

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet: no request lines (they could carry prompts) on stderr
            pass

        def _send(self, status: int, body: dict) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            if not api_key:
                return True
            given = self.headers.get("Authorization", "")
            return hmac.compare_digest(given, f"Bearer {api_key}")

        def do_GET(self):
            if self.path.rstrip("/") == "/v1/models":
                return self._send(200, {"object": "list", "data": [{"id": model_name, "object": "model"}]})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

        def do_POST(self):
            if not self._authorized():
                return self._send(401, {"error": {"message": "missing or wrong API key"}})
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            except ValueError:
                return self._send(400, {"error": {"message": "body is not JSON"}})
            try:
                with lock:
                    if self.path == "/v1/chat/completions":
                        return self._send(200, chat(body))
                    if self.path == "/v1/completions":
                        return self._send(200, completion_logprobs(body))
            except (KeyError, TypeError, ValueError) as e:
                return self._send(400, {"error": {"message": f"bad request: {e}"}})
            self._send(404, {"error": {"message": f"no route {self.path}"}})

    def chat(body: dict) -> dict:
        messages = body["messages"]
        if body.get("continue_final_message") and messages[-1]["role"] != "assistant":
            raise ValueError("continue_final_message needs a final assistant message")
        stop = body.get("stop") or ()
        sampling = Sampling(max_new_tokens=int(body.get("max_tokens") or 256), temperature=float(body.get("temperature", 1.0)),
                            top_p=float(body.get("top_p", 1.0)), top_k=int(body.get("top_k", 0)),
                            stop=tuple([stop] if isinstance(stop, str) else stop))
        out = backend.generate([messages], sampling, [int(body.get("seed", 0))])[0]
        return {"id": f"chatcmpl-{time.time_ns()}", "object": "chat.completion", "model": model_name,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                             "finish_reason": "length" if out.finish_reason == "length" else "stop",
                             "stop_reason": "stop" if out.finish_reason == "stop" else None}],
                "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                          "total_tokens": out.prompt_tokens + out.completion_tokens}}

    def completion_logprobs(body: dict) -> dict:
        if int(body.get("max_tokens", 16)) != 1 or not body.get("logprobs"):
            raise ValueError("this server answers /v1/completions only for scoring: max_tokens=1 with logprobs=K")
        k = min(int(body["logprobs"]), 100)
        ids = backend.tokenizer(body["prompt"], add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            logits = backend.model(input_ids=torch.tensor([ids], device=backend.device), logits_to_keep=1).logits[0, -1]
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        top = torch.topk(logp, k)
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

    return Handler


@cli_main
def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="python -m cai.serve", description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m", help="preset or model directory")
    ap.add_argument("--name", default=None, help="model name reported by the API (default: --model)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="0 picks a free port (printed at start)")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--api-key-env", default="CAI_SERVE_API_KEY", help="env var holding the required key (unset: none)")
    args = ap.parse_args(argv)

    backend = TransformersBackend(resolve_model(args.model), dtype=args.dtype, device="auto", batch_size=1, progress=False)
    server = ThreadingHTTPServer((args.host, args.port), make_handler(backend, args.name or args.model,
                                                                      os.environ.get(args.api_key_env)))
    print(f"serving {args.model} on http://{args.host}:{server.server_address[1]}/v1", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
