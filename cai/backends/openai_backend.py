"""OpenAI-compatible HTTP backend: vLLM serve, llama.cpp server, TGI, `python -m cai.serve`, hosted APIs.

- generation: `POST /v1/chat/completions` (the server applies the model's chat template), one request per
  conversation, at most `concurrency` in flight, seeded where the server honours `seed`;
- option scoring: `POST /v1/completions` with the raw prompt, `max_tokens=1` and `logprobs=K`: the top-K
  log-probabilities of the next token give each single-token option's score. An option outside the top K gets
  the K-th value as an upper bound (flagged in `missed_options`). Raw prompts need the chat template on this
  side: `tokenizer` names a local model dir or preset whose template matches the served model.
- a server that lacks what a caller needs (no /v1/completions, completions that ignore `logprobs`, no chat
  endpoint) is a one-line error naming the missing endpoint feature. `echo` is not needed: options are scored
  from the next token's top K, not from echoed prompt log-probs;
- retries with exponential backoff on 429 and 5xx and on connection errors; a timeout per request;
- the API key is read from the environment variable named by `api_key_env`, sent as a Bearer token, and never
  logged, saved or put in an error message.
"""

from __future__ import annotations

import json
import os
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from cai.backends.base import Completion, Message, Sampling, option_scores_from_top
from cai.errors import CaiError
from cai.models import load_tokenizer, resolve_model

RETRY_STATUS = {429, 500, 502, 503, 504}
MISSING_STATUS = {400, 404, 405, 422, 501}  # an endpoint or parameter the server does not have
NEEDS_CHAT = "generation needs POST /v1/chat/completions (OpenAI chat completions)"
NEEDS_LOGPROBS = ("AI labels and the judge need POST /v1/completions (text completion of a raw prompt) answering "
                  "with the top-K next-token log-probs (`logprobs: K` -> choices[0].logprobs.top_logprobs); "
                  "chat-only servers and APIs lack it: use vLLM serve, llama.cpp server or python -m cai.serve")


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """urllib follows a redirect with the same headers, Authorization included, to whatever host the server
    names: a redirect would hand the API key to another origin. It is an error instead."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        raise CaiError(f"{req.full_url}: HTTP {code} redirect to {newurl}; redirects are not followed (the API key "
                       "goes only to the configured base_url): set base_url to the final address")


_OPENER = urllib.request.build_opener(_NoRedirects)


class OpenAIBackend:
    def __init__(self, base_url: str, model: str, *, tokenizer: str | None = None, api_key_env: str = "OPENAI_API_KEY",
                 concurrency: int = 8, timeout: float = 120.0, max_retries: int = 5, backoff: float = 0.5,
                 top_logprobs: int = 20):
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.identity = f"openai:{self.base_url}/{model}"
        self.api_key_env = api_key_env
        self.concurrency, self.timeout = concurrency, timeout
        self.max_retries, self.backoff, self.top_logprobs = max_retries, backoff, top_logprobs
        self._tokenizer_name = tokenizer
        self._tokenizer = None
        self.missed_options = 0  # options scored by the top-K bound because they were not in the top K

    # -- HTTP --------------------------------------------------------------------------------------------
    def _post(self, path: str, body: dict, needs: str = "") -> dict:
        """POST and parse the JSON answer. `needs` says which endpoint feature the caller needs: it is named in
        the error when the server answers that it lacks the endpoint or a parameter (400/404/405/422/501)."""
        headers = {"Content-Type": "application/json"}
        key = os.environ.get(self.api_key_env)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        data = json.dumps(body).encode()
        for attempt in range(self.max_retries + 1):
            req = urllib.request.Request(self.base_url + path, data=data, headers=headers, method="POST")
            try:
                with _OPENER.open(req, timeout=self.timeout) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    raise CaiError(f"{self.base_url}{path}: the answer is not JSON ({raw[:80]!r}); expected an "
                                   f"OpenAI-compatible server" + (f"; {needs}" if needs else "")) from None
            except urllib.error.HTTPError as e:
                status = e.code
                if status not in RETRY_STATUS or attempt == self.max_retries:
                    detail = " ".join(e.read()[:300].decode(errors="replace").split())
                    missing = f"; the server lacks what this needs: {needs}" if needs and status in MISSING_STATUS else ""
                    raise CaiError(f"{self.base_url}{path}: HTTP {status} after {attempt + 1} attempt(s): "
                                   f"{detail}{missing}") from None
                retry_after = e.headers.get("Retry-After") if e.headers else None
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                if attempt == self.max_retries:
                    raise CaiError(f"{self.base_url}{path}: no answer after {attempt + 1} attempt(s) "
                                   f"({getattr(e, 'reason', e)})") from None
                retry_after = None
            delay = float(retry_after) if retry_after and retry_after.replace(".", "", 1).isdigit() \
                else self.backoff * 2 ** attempt
            time.sleep(min(delay, 30.0))
        raise AssertionError("unreachable")

    def _map(self, fn, items: list) -> list:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(fn, items))

    # -- protocol ----------------------------------------------------------------------------------------
    def chat_prompt(self, conversation: list[Message]) -> str:
        if self._tokenizer is None:
            if not self._tokenizer_name:
                raise CaiError("backend=openai: option scoring needs the served model's chat template; "
                               "set tokenizer= to a local model directory or preset (e.g. smollm2-135m)")
            self._tokenizer = load_tokenizer(resolve_model(self._tokenizer_name))
        tok = self._tokenizer
        if conversation[-1]["role"] == "assistant":
            return tok.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
        return tok.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)

    def generate(self, conversations: list[list[Message]], sampling: Sampling, seeds: list[int]) -> list[Completion]:
        def one(args) -> Completion:
            conv, seed = args
            body = {"model": self.model, "messages": conv, "max_tokens": sampling.max_new_tokens,
                    "temperature": sampling.temperature, "top_p": sampling.top_p, "seed": int(seed) % (2**31)}
            if sampling.top_k:
                body["top_k"] = sampling.top_k  # a vLLM / llama.cpp extension
            if sampling.stop:
                body["stop"] = list(sampling.stop)
            if conv[-1]["role"] == "assistant":  # continue the assistant's words (vLLM / cai.serve extension)
                body.update(add_generation_prompt=False, continue_final_message=True)
            out = self._post("/v1/chat/completions", body, NEEDS_CHAT)
            choice = out["choices"][0]
            usage = out.get("usage") or {}
            reason = {"stop": "eos", "length": "length"}.get(choice.get("finish_reason"), "eos")
            if sampling.stop and choice.get("stop_reason") is not None:
                reason = "stop"
            return Completion(choice["message"]["content"] or "", usage.get("prompt_tokens", 0),
                              usage.get("completion_tokens", 0), reason)

        return self._map(one, list(zip(conversations, seeds)))

    def option_logprobs(self, prompts: list[str], options: list[str]) -> list[list[float]]:
        def one(prompt: str) -> list[float]:
            out = self._post("/v1/completions", {"model": self.model, "prompt": prompt, "max_tokens": 1,
                                                 "temperature": 0.0, "logprobs": self.top_logprobs}, NEEDS_LOGPROBS)
            choices = out.get("choices") if isinstance(out, dict) else None
            logprobs = choices[0].get("logprobs") if choices and isinstance(choices[0], dict) else None
            tops = logprobs.get("top_logprobs") if isinstance(logprobs, dict) else None
            top = tops[0] if isinstance(tops, list) and tops else None  # {token text: logprob}
            if not isinstance(top, dict) or not top:
                what = ("no choices" if not choices else "no logprobs" if not isinstance(logprobs, dict)
                        else "no logprobs.top_logprobs")
                raise CaiError(f"{self.base_url}/v1/completions: the answer has {what} (the server ignored "
                               f"`logprobs: {self.top_logprobs}`); {NEEDS_LOGPROBS}")
            scores, missed = option_scores_from_top(top, options)
            self.missed_options += missed
            return scores

        return self._map(one, prompts)
