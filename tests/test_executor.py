"""
Executors: LocalExecutor against a full-forward greedy reference on a tiny random model; OpenAIExecutor against a
loopback server (127.0.0.1, port 0) whose behaviour each test scripts: echo, fail, stall, garble.
"""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch

from nanochat.executor import ExecutorError, LocalExecutor, OpenAIExecutor
from tests.conftest import make_tiny_model

# ---------------------------------------------------------------------------------------------------------------
# LocalExecutor


@pytest.fixture
def model(tok):
    return make_tiny_model(vocab_size=tok.vocab_size)  # sequence_len 64


def render(tok, prompt):
    return tok.render_for_completion([{"role": "user", "content": prompt}])


def greedy_reference(model, tok, ids, max_tokens):
    """Greedy reply ids by a full forward per token (no cache, no batch), up to <|assistant_end|> or <|bos|>."""
    stop = {tok.encode_special("<|assistant_end|>"), tok.bos_token_id}
    out = []
    for _ in range(max_tokens):
        with torch.no_grad():
            token = model(torch.tensor([ids + out]))[0, -1].argmax().item()
        if token in stop:
            break
        out.append(token)
    return out


PROMPTS = ["Where does Zavu live?", "hi", "Add 12 and 30, then tell me the colour Korlin likes best.", "ok then",
           "What is 7 times 6?"]


def test_local_batched_replies_equal_one_by_one_and_a_full_forward_reference(model, tok):
    # catches: right padding or a missing pad mask, replies left in length-sorted order, a wrong chat render
    batched = LocalExecutor(model, tok, batch_size=2).complete(PROMPTS, max_tokens=10)
    single = LocalExecutor(model, tok, batch_size=1)
    assert batched == [single.complete([p], max_tokens=10)[0] for p in PROMPTS]
    assert batched == [tok.decode(greedy_reference(model, tok, render(tok, p), 10)) for p in PROMPTS]
    assert len(set(batched)) > 1  # the prompts are told apart
    assert single.calls == 5 and single.prompt_count == 5 and "context 64" in single.describe()
    assert single.complete([], max_tokens=10) == [] and single.calls == 6


def test_local_reply_stops_at_assistant_end_and_drops_it(model, tok):
    # catches: no stop tokens given to the engine (the reply runs on past its end) or the end token left in the text
    ids = render(tok, PROMPTS[0])
    out = []
    for _ in range(3):
        with torch.no_grad():
            out.append(model(torch.tensor([ids + out]))[0, -1].argmax().item())
    end = tok.encode_special("<|assistant_end|>")
    with torch.no_grad():  # <|assistant_end|> now outscores the third greedy token, so the reply ends by then
        model.lm_head.weight[end] = 1.05 * model.lm_head.weight[out[2]]
    expected = greedy_reference(model, tok, ids, 12)
    assert len(expected) < 3  # the reference did stop early
    reply = LocalExecutor(model, tok).complete([PROMPTS[0], "hi"], max_tokens=12)[0]
    assert reply == tok.decode(expected) and "<|" not in reply


def test_local_over_long_prompt_is_cut_from_the_left_not_an_error(model, tok):
    # catches: an over-long prompt crashing the round, or a cut from the right (losing <|assistant_start|>)
    question = " Now answer this: where does Zavu live, and which colour does Zavu like best?" * 4
    long_a = "Zavu walked along the river and counted stones. " * 40 + question
    long_b = "Korlin is a town of red roofs and green doors. " * 40 + question
    ids = render(tok, long_a)
    assert len(ids) > model.rotary_len  # the engine would refuse it uncut
    replies = LocalExecutor(model, tok).complete([long_a, long_b, "hi"], max_tokens=8)
    keep = model.config.sequence_len - 8  # <|bos|>, then the render's last keep - 1 tokens
    assert replies[0] == tok.decode(greedy_reference(model, tok, ids[:1] + ids[-(keep - 1):], 8))
    assert replies[0] == replies[1]  # only the beginnings differ, and those were cut
    with pytest.raises(ValueError, match="64-token context"):
        LocalExecutor(model, tok).complete(["hi"], max_tokens=33)  # would leave under half the context


def test_local_sampling_is_fixed_by_the_seed(model, tok):
    # catches: the seed not reaching the engine (sampled replies change from run to run, or ignore the seed)
    executor = LocalExecutor(model, tok, batch_size=2)
    a = executor.complete(PROMPTS, temperature=1.0, max_tokens=10, seed=1)
    assert a == executor.complete(PROMPTS, temperature=1.0, max_tokens=10, seed=1)
    assert a != executor.complete(PROMPTS, temperature=1.0, max_tokens=10, seed=2)
    assert executor.complete(PROMPTS, max_tokens=10, seed=1) == executor.complete(PROMPTS, max_tokens=10, seed=2)


# ---------------------------------------------------------------------------------------------------------------
# OpenAIExecutor against a scripted loopback server


class Script:
    """What the server does with each request, and what it saw."""

    def __init__(self):
        self.lock = threading.Lock()
        self.plan = []  # one action per request, in arrival order; then "echo" for ever
        self.echo_delay = lambda content: 0.0
        self.attempts = 0
        self.active = 0
        self.max_active = 0
        self.auth = []
        self.bodies = []


def make_handler(script):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def reply(self, status, body, headers=()):
            self.send_response(status)
            for name, value in headers:
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.attempts += 1
                script.active += 1
                script.max_active = max(script.max_active, script.active)
                script.auth.append(self.headers.get("Authorization"))
                script.bodies.append(body)
                action = script.plan.pop(0) if script.plan else ("echo",)
            content = body["messages"][0]["content"]
            try:
                if action[0] == "sleep":  # longer than the client's timeout: it has hung up by the time we answer
                    time.sleep(action[1])
                elif action[0] == "echo":
                    time.sleep(script.echo_delay(content))
            finally:
                # counted down before answering: the client cannot send its next request before this answer, so
                # the count never exceeds the client's requests in flight
                with script.lock:
                    script.active -= 1
            try:
                if action[0] in ("echo", "sleep"):
                    reply = {"choices": [{"message": {"role": "assistant", "content": "echo: " + content}}]}
                    self.reply(200, json.dumps(reply).encode())
                elif action[0] == "status":
                    _, status, headers, error = action
                    self.reply(status, json.dumps({"error": {"message": error}}).encode(), headers)
                else:  # "raw"
                    self.reply(200, action[1])
            except (BrokenPipeError, ConnectionResetError):
                pass
    return Handler


@pytest.fixture
def server(monkeypatch):
    for name in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):  # talk to 127.0.0.1 directly
        monkeypatch.delenv(name, raising=False)
    script = Script()
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(script))
    # a short poll interval: shutdown() waits for the next poll
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield script
    httpd.shutdown()
    httpd.server_close()


def client(server, **kwargs):
    settings = dict(api_key_env="NANOCHAT_TEST_NO_KEY", max_concurrency=4, timeout=5.0, max_retries=4, backoff=0.01)
    return OpenAIExecutor(server.url + "/", "test-model", **{**settings, **kwargs})


def error(status, message="", headers=()):
    return ("status", status, headers, message)


def test_replies_follow_prompt_order_and_requests_carry_the_payload(server):
    # catches: replies gathered as they finish (the first prompts answer last here) or a misnamed payload field
    prompts = [f"p{i}" for i in range(6)]
    server.echo_delay = lambda content: 0.05 * (6 - int(content[1:]))
    executor = client(server, max_concurrency=6)
    assert executor.complete(prompts, temperature=0.7, max_tokens=32, seed=10) == [f"echo: {p}" for p in prompts]
    by_prompt = {b["messages"][0]["content"]: b for b in server.bodies}
    for i, p in enumerate(prompts):
        assert by_prompt[p] == {"model": "test-model", "messages": [{"role": "user", "content": p}],
                                "temperature": 0.7, "max_tokens": 32, "seed": 10 + i}
    assert executor.complete([]) == [] and executor.calls == 2 and executor.prompt_count == 6


def test_transient_500s_and_429_are_retried_until_success(server):
    # catches: 5xx or 429 treated as fatal, or a retry loop that gives up before max_retries
    server.plan = [error(500), error(502), error(429)]
    executor = client(server)
    assert executor.complete(["hello"]) == ["echo: hello"]
    assert server.attempts == 4 and executor.retries == 3


def test_retry_after_is_honoured(server):
    # catches: Retry-After ignored (a rate-limited server is hit again after the 0.01 s backoff)
    server.plan = [error(429, "slow down", [("Retry-After", "1")])]
    start = time.monotonic()
    assert client(server).complete(["hello"]) == ["echo: hello"]
    assert time.monotonic() - start >= 0.9 and server.attempts == 2


def test_400_is_not_retried_and_the_error_names_status_and_message(server):
    # catches: every HTTP error retried (a bad request resent max_retries times), or the server's reason lost
    server.plan = [error(400, "max_tokens is too large")]
    with pytest.raises(ExecutorError, match="HTTP 400: max_tokens is too large"):
        client(server).complete(["hello"])
    assert server.attempts == 1


def test_persistent_5xx_raise_after_max_retries_naming_url_and_last_problem(server):
    # catches: an off-by-one in the attempt count, endless retries, or an error that hides where and why
    server.plan = [error(500, "boom"), error(500, "boom"), error(503, "overloaded"), error(500, "never reached")]
    with pytest.raises(ExecutorError) as caught:
        client(server, max_retries=2).complete(["hello"])
    assert server.attempts == 3
    assert server.url + "/chat/completions" in str(caught.value) and "HTTP 503: overloaded" in str(caught.value)


def test_a_timeout_is_retried_then_succeeds(server):
    # catches: no timeout on the request (the stalled reply is waited for: 1 attempt) or timeouts not retried
    server.plan = [("sleep", 1.2)]  # the retry's plain echo must answer within the timeout, even on a busy machine
    assert client(server, timeout=0.5).complete(["hello"]) == ["echo: hello"]
    assert server.attempts == 2


def test_persistent_timeouts_raise_after_max_retries_plus_one_attempts(server):
    # catches: a timeout escaping as a raw socket error, or retrying more or fewer times than max_retries
    server.plan = [("sleep", 0.5)] * 3
    with pytest.raises(ExecutorError, match="failed after 3 attempts"):
        client(server, timeout=0.15, max_retries=2).complete(["hello"])
    assert server.attempts == 3


def test_concurrency_stays_within_the_limit_and_uses_it(server):
    # catches: a serial client (never more than 1 request in flight) or one that ignores max_concurrency
    server.echo_delay = lambda content: 0.05
    prompts = [f"p{i}" for i in range(12)]
    assert client(server, max_concurrency=3).complete(prompts) == [f"echo: {p}" for p in prompts]
    assert 1 < server.max_active <= 3


def test_the_key_comes_from_the_env_var_as_bearer_and_is_never_shown(server, monkeypatch):
    # catches: the key read from the wrong variable, "Bearer None" sent without a key, the key in an error message
    monkeypatch.setenv("NANOCHAT_TEST_KEY", "sk-test-secret")
    executor = client(server, api_key_env="NANOCHAT_TEST_KEY")
    server.plan = [("echo",), error(401, "invalid key")]
    executor.complete(["hello"])
    with pytest.raises(ExecutorError) as caught:
        executor.complete(["hello"])
    assert server.auth == ["Bearer sk-test-secret"] * 2
    assert "sk-test-secret" not in str(caught.value) + executor.describe()
    monkeypatch.delenv("NANOCHAT_TEST_KEY")
    client(server, api_key_env="NANOCHAT_TEST_KEY").complete(["hello"])
    assert server.auth[-1] is None


@pytest.mark.parametrize("body, message", [(b"<html>502 oops</html>", "malformed JSON"),
                                           (b'{"id": "x", "choices": []}', "without choices"),
                                           (b'{"choices": [{"message": {"content": null}}]}', "non-text")])
def test_a_malformed_reply_is_a_clear_error(server, body, message):
    # catches: a raw JSONDecodeError / IndexError escaping, a None reply passed on as text, or garbage retried
    server.plan = [("raw", body)]
    with pytest.raises(ExecutorError, match=message):
        client(server).complete(["hello"])
    assert server.attempts == 1
