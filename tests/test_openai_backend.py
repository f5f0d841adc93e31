"""The OpenAI-compatible backend against real HTTP servers on 127.0.0.1: `python -m cai.serve` (tiny model) for
generation and option scoring, and a scripted stdlib server for retries, backoff and authentication."""

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from cai.backends import Sampling
from cai.backends.openai_backend import OpenAIBackend
from cai.errors import CaiError

from .conftest import ROOT

KEY = "sk-test-do-not-log-0123456789"


@pytest.fixture(scope="module")
def served():
    """`python -m cai.serve` on a free loopback port, requiring an API key."""
    env = {**os.environ, "CAI_SERVE_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "cai.serve", "--model", "tiny", "--port", "0", "--dtype", "float32"],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline()
    assert line.startswith("serving tiny on http://127.0.0.1:"), line
    url = line.split(" on ")[1].strip().removesuffix("/v1")
    yield url
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def local():
    from cai.backends import make_backend

    b = make_backend("transformers", "tiny", dtype="float32", batch_size=1)
    b.progress = False
    return b


def test_generation_matches_the_local_backend(served, local, monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", KEY)
    client = OpenAIBackend(served, "tiny", api_key_env="CAI_TEST_KEY", concurrency=3)
    convs = [[{"role": "user", "content": f"Tell me about {x}."}] for x in ("cats", "rain", "maps")]
    sampling = Sampling(max_new_tokens=6, temperature=1.0)
    remote = client.generate(convs, sampling, [11, 12, 13])
    # the server answers one request at a time, so compare with the local backend one request at a time
    alone = [local.generate([c], sampling, [s])[0] for c, s in zip(convs, (11, 12, 13))]
    assert [r.text for r in remote] == [a.text for a in alone]
    assert all(r.completion_tokens == 6 and r.finish_reason == "length" for r in remote)


def test_option_scores_match_the_local_backend(served, local, monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", KEY)
    client = OpenAIBackend(served, "tiny", api_key_env="CAI_TEST_KEY", tokenizer="tiny", top_logprobs=100)
    conv = [{"role": "user", "content": "Which is better?\n(A) one\n(B) two"},
            {"role": "assistant", "content": "The answer is: ("}]
    prompt = client.chat_prompt(conv)
    assert prompt == local.chat_prompt(conv) and prompt.endswith("The answer is: (")
    # score the two tokens the model itself ranks highest, so both are in the top K
    import torch

    ids = local.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    with torch.inference_mode():
        top = local.model(input_ids=torch.tensor([ids])).logits[0, -1].topk(2).indices.tolist()
    options = [local.tokenizer.decode([t]) for t in top]
    got = client.option_logprobs([prompt], options)[0]
    want = local.option_logprobs([prompt], options)[0]
    assert got == pytest.approx(want, abs=1e-4) and client.missed_options == 0


def test_wrong_key_is_refused_without_retries_and_never_echoed(served, monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", "sk-wrong-secret-value")
    client = OpenAIBackend(served, "tiny", api_key_env="CAI_TEST_KEY", max_retries=3, backoff=0.01)
    with pytest.raises(CaiError) as e:
        client.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2), [0])
    assert "HTTP 401 after 1 attempt" in str(e.value) and "sk-wrong" not in str(e.value)


class Scripted(BaseHTTPRequestHandler):
    """Answers with the next status of a script; records the Authorization headers it saw."""

    script: list = []
    seen: list = []

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        Scripted.seen.append(self.headers.get("Authorization"))
        status = Scripted.script.pop(0) if Scripted.script else 200
        body = {"error": "busy"} if status != 200 else {
            "choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": 1}}
        data = json.dumps(body).encode()
        self.send_response(status)
        if status == 429:
            self.send_header("Retry-After", "0")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def scripted():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    Scripted.seen = []
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_retries_on_429_and_5xx_then_succeeds(scripted, monkeypatch):
    monkeypatch.setenv("CAI_TEST_KEY", KEY)
    Scripted.script = [429, 503, 500]
    client = OpenAIBackend(scripted, "m", api_key_env="CAI_TEST_KEY", max_retries=3, backoff=0.01)
    out = client.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2), [0])
    assert out[0].text == "ok" and len(Scripted.seen) == 4 and Scripted.seen[-1] == f"Bearer {KEY}"


def test_gives_up_after_max_retries_with_one_line(scripted):
    Scripted.script = [502] * 10
    client = OpenAIBackend(scripted, "m", api_key_env="CAI_UNSET_KEY_VAR", max_retries=2, backoff=0.01)
    with pytest.raises(CaiError, match="HTTP 502 after 3 attempt"):
        client.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2), [0])
    assert Scripted.seen == [None, None, None]  # no key set: no Authorization header


def test_unreachable_server_is_a_clear_error():
    client = OpenAIBackend("http://127.0.0.1:9", "m", max_retries=1, backoff=0.01, timeout=2)
    with pytest.raises(CaiError, match="no answer after 2 attempt"):
        client.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2), [0])


def test_labeling_through_the_server(served, monkeypatch, tmp_path):
    """AI feedback labels computed by a served model: the pipeline pieces do not care where the model runs."""
    from cai.constitution import load_constitution
    from cai.feedback import label_pairs
    from cai.store import JsonlStore

    from .conftest import ASSETS
    from .test_feedback import pairs, settings

    monkeypatch.setenv("CAI_TEST_KEY", KEY)
    client = OpenAIBackend(served, "tiny", api_key_env="CAI_TEST_KEY", tokenizer="tiny", top_logprobs=100)
    comps, stats = label_pairs(pairs(2), load_constitution(ASSETS / "constitutions" / "good.yaml"), settings(k=1),
                               client, JsonlStore(tmp_path / "l.jsonl"), tmp_path / "plans", 4, progress=False)
    assert stats.generated == 4 and all(0 < c["soft_label"] < 1 for c in comps)


def test_a_redirect_to_another_origin_never_receives_the_key(scripted, monkeypatch):
    """A server answering 307 with another address: the client stops with one line; the other address sees
    nothing (before the fix urllib resent the Authorization header there)."""
    other = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    target = f"http://127.0.0.1:{other.server_address[1]}/v1/chat/completions"

    class Redirect(BaseHTTPRequestHandler):
        def log_message(self, *a):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(307)  # 307 keeps the method: urllib would POST again, with the key
            self.send_header("Location", target)
            self.send_header("Content-Length", "0")
            self.end_headers()

    redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirect)
    threading.Thread(target=redirector.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("CAI_TEST_KEY", KEY)
        Scripted.seen = []
        client = OpenAIBackend(f"http://127.0.0.1:{redirector.server_address[1]}", "m", api_key_env="CAI_TEST_KEY",
                               max_retries=0)
        with pytest.raises(CaiError, match="HTTP 307 redirect to .*redirects are not followed") as e:
            client.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2), [0])
        assert Scripted.seen == [] and KEY not in str(e.value)
    finally:
        other.shutdown()
        redirector.shutdown()


class ChatOnly(BaseHTTPRequestHandler):
    """A server with chat completions but text completions without logprobs (it ignores `logprobs`, as some
    OpenAI-compatible servers do), or, with `completions=404`, no /v1/completions at all."""

    completions = 200

    def log_message(self, *a):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path == "/v1/completions" and ChatOnly.completions == 404:
            status, body = 404, {"error": {"message": "Not Found"}}
        elif self.path == "/v1/completions":
            status, body = 200, {"choices": [{"text": "A", "index": 0, "logprobs": None, "finish_reason": "length"}]}
        else:
            status, body = 200, {"choices": [{"message": {"content": "ok"}, "finish_reason": "stop"}]}
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.mark.parametrize("completions, what", [(200, "no logprobs"), (404, "HTTP 404")])
def test_a_server_without_completion_logprobs_names_the_missing_feature(completions, what):
    """Labeling needs /v1/completions with top-K logprobs: the error says so (it was a KeyError/TypeError)."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ChatOnly)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    ChatOnly.completions = completions
    try:
        client = OpenAIBackend(f"http://127.0.0.1:{server.server_address[1]}", "m", max_retries=0)
        assert client.generate([[{"role": "user", "content": "hi"}]], Sampling(max_new_tokens=2), [0])[0].text == "ok"
        with pytest.raises(CaiError) as e:
            client.option_logprobs(["The answer is: ("], ["A", "B"])
        msg = str(e.value)
        assert "\n" not in msg and what in msg and "/v1/completions" in msg
        assert "top-K next-token log-probs (`logprobs: K`" in msg
    finally:
        server.shutdown()
