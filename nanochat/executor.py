"""
Executors: the models that run a workflow's operator prompts (Workflow GRPO).

The workflow interpreter (nanochat/workflow.py) gathers every operator prompt of one round and makes one call:

    executor.complete(prompts, temperature=0.0, max_tokens=128, seed=0) -> one reply per prompt, in order

Prompts are plain user messages; the executor applies its own chat format. `describe()` is one line for reports,
and `calls` (complete() calls) and `prompt_count` (prompts answered) let benchmarks count the work.

- `LocalExecutor(model, tok)` runs our own GPT through the batched KV-cache Engine. Each prompt is rendered as a
  one-turn chat up to a fresh <|assistant_start|> (`tok.render_for_completion`, as nanochat/evaluate.py does) and
  decoded up to <|assistant_end|> (or a <|bos|>, which only a confused model emits). The model's context is its
  `sequence_len`, the length it was trained on: a render longer than sequence_len - max_tokens is cut from the
  left by nanochat/batching.py's `cut_left` (its <|bos|>, then its last tokens), the rule every stage uses. The
  end keeps the <|assistant_start|> the model continues from and the last part of the request; a workflow's
  growing context (candidates, test output) costs the oldest text, and a round never fails for a long prompt.
  max_tokens may take at most half the context (GRPO's bound), so a cut prompt still says something.
  Prompts are batched by length, so a batch pads little. Temperature 0 is greedy; otherwise the sampling is fixed
  by `seed` (each batch seeds its own stream, as evaluate.py does).
- `OpenAIExecutor(base_url, model)` sends each prompt to any OpenAI-compatible chat-completions endpoint
  (OpenAI, vLLM, llama.cpp's server, ...) with the standard library's urllib, at most `max_concurrency` requests
  at a time. Connection errors, timeouts, HTTP 429 and 5xx are retried with exponential backoff and a little
  jitter (a server's Retry-After wins); other 4xx are the caller's mistake and fail at once. Every failure is an
  ExecutorError naming the URL and the problem. Prompt i is sent with seed + i, so duplicate prompts in one
  call (an ensemble's samples) get different replies when temperature > 0. The API key is read from an
  environment variable and only ever goes into the Authorization header: no message or description shows it.
"""

import email.utils
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from http.client import HTTPException

from nanochat.batching import cut_left
from nanochat.engine import Engine

# no single wait (backoff or a server's Retry-After) is longer than this: a rollout must not hang for an hour
MAX_WAIT = 60.0
# how much of a server's error body goes into an ExecutorError (an HTML error page can be long)
MAX_ERROR_CHARS = 500


class ExecutorError(RuntimeError):
    """An executor could not answer: a failed request after retries, a refused request or a malformed reply."""


class LocalExecutor:
    def __init__(self, model, tok, batch_size=64):
        self.model, self.tok, self.batch_size = model, tok, batch_size
        self.engine = Engine(model)
        self.stop = [tok.encode_special("<|assistant_end|>"), tok.bos_token_id]
        self.calls = 0
        self.prompt_count = 0

    def describe(self):
        c = self.model.config
        return (f"local GPT (depth {c.n_layer}, width {c.n_embd}, {self.model.num_params() / 1e6:.1f}M params, "
                f"context {c.sequence_len}) through the KV-cache engine, batches of {self.batch_size}")

    def complete(self, prompts, temperature=0.0, max_tokens=128, seed=0):
        context = self.model.config.sequence_len
        # the same bound as GRPO's: a prompt keeps at least half the context
        if max_tokens > context // 2:
            raise ValueError(f"max_tokens={max_tokens} leaves too little of the model's {context}-token context "
                             f"for the prompt; use at most {context // 2}")
        self.calls += 1
        self.prompt_count += len(prompts)
        rendered = [cut_left(self.tok.render_for_completion([{"role": "user", "content": p}]), context - max_tokens)
                    for p in prompts]
        # similar lengths share a batch, so little of it is padding; replies go back to the callers' order
        order = sorted(range(len(prompts)), key=lambda i: len(rendered[i]))
        replies = [None] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            gen = self.engine.generate([rendered[i] for i in batch], max_new_tokens=max_tokens,
                                       temperature=temperature, seed=seed + start, stop_tokens=self.stop)
            for i, ids in zip(batch, gen.completions()):
                replies[i] = self.tok.decode(ids[:-1] if ids and ids[-1] in self.stop else ids)
        return replies


def _retry_after(value):
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date); None if absent or unreadable."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, (email.utils.parsedate_to_datetime(value) - datetime.now(timezone.utc)).total_seconds())
    except (TypeError, ValueError):  # TypeError: a date without a zone cannot be compared with an aware one
        return None


def _error_message(body):
    """The server's own error message from an error body: OpenAI's {"error": {"message"}} or the raw text."""
    text = body.decode("utf-8", errors="replace")
    try:
        error = json.loads(text)["error"]
        text = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        pass
    text = text.strip()
    return text[:MAX_ERROR_CHARS] + ("..." if len(text) > MAX_ERROR_CHARS else "")


class OpenAIExecutor:
    def __init__(self, base_url, model, api_key_env="OPENAI_API_KEY", max_concurrency=8, timeout=60.0,
                 max_retries=4, backoff=1.0):
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.model, self.api_key_env = model, api_key_env
        self.max_concurrency, self.timeout = max_concurrency, timeout
        self.max_retries, self.backoff = max_retries, backoff
        self._api_key = os.environ.get(api_key_env)  # unset is fine: local servers need no key
        # jitter from a private generator: the worker threads must not advance the global `random` stream that
        # seeded code elsewhere relies on
        self._rng = random.Random()
        self._lock = threading.Lock()
        self.calls = 0
        self.prompt_count = 0
        self.retries = 0  # requests sent again after a transient failure: how flaky the server was

    def describe(self):
        key = f"key from ${self.api_key_env}" if self._api_key else f"no key (${self.api_key_env} unset)"
        return (f"OpenAI-compatible endpoint {self.url}, model {self.model}, {key}, up to {self.max_concurrency} "
                f"concurrent requests, timeout {self.timeout:g}s, {self.max_retries} retries")

    def complete(self, prompts, temperature=0.0, max_tokens=128, seed=0):
        self.calls += 1
        self.prompt_count += len(prompts)
        payloads = [{"model": self.model, "messages": [{"role": "user", "content": p}], "temperature": temperature,
                     "max_tokens": max_tokens, "seed": seed + i} for i, p in enumerate(prompts)]
        pool = ThreadPoolExecutor(max_workers=self.max_concurrency)
        try:
            return list(pool.map(self._request, payloads))  # map keeps the prompts' order
        finally:
            # after a failure, prompts not yet sent are not sent: the round has failed anyway
            pool.shutdown(cancel_futures=True)

    def _request(self, payload):
        """One chat completion, retried on transient failures; returns the reply's text."""
        headers = {"Content-Type": "application/json", "User-Agent": "nanochat-executor"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        data = json.dumps(payload).encode("utf-8")
        for attempt in range(self.max_retries + 1):
            wait = None
            try:
                request = urllib.request.Request(self.url, data=data, headers=headers, method="POST")
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    body = response.read()
                return self._reply_text(body)
            except urllib.error.HTTPError as e:  # before OSError: HTTPError is one, but it carries a status
                try:
                    message = _error_message(e.read())
                except (OSError, HTTPException):  # the error body itself may be cut off
                    message = "(unreadable error body)"
                if e.code != 429 and e.code < 500:
                    raise ExecutorError(f"{self.url} refused the request: HTTP {e.code}: {message}") from None
                problem = f"HTTP {e.code}: {message}"
                wait = _retry_after(e.headers.get("Retry-After"))
            except (OSError, HTTPException) as e:  # refused or reset connections, timeouts, truncated replies
                problem = f"{type(e).__name__}: {e}"
            if attempt == self.max_retries:
                break
            if wait is None:
                wait = self.backoff * 2 ** attempt * (1 + 0.1 * self._rng.random())
            with self._lock:
                self.retries += 1
            time.sleep(min(wait, MAX_WAIT))
        raise ExecutorError(f"{self.url} failed after {self.max_retries + 1} attempts; last problem: {problem}")

    def _reply_text(self, body):
        try:
            reply = json.loads(body)
        except ValueError:
            raise ExecutorError(f"{self.url} answered with malformed JSON: "
                                f"{body[:200].decode('utf-8', errors='replace')!r}") from None
        try:
            content = reply["choices"][0]["message"]["content"]
        except (KeyError, IndexError, TypeError):
            raise ExecutorError(f"{self.url} answered without choices[0].message.content: "
                                f"{json.dumps(reply)[:200]}") from None
        if not isinstance(content, str):
            raise ExecutorError(f"{self.url} answered with a non-text message content: {content!r}")
        return content
