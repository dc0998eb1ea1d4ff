"""Where actions come from: a local transformers model, or any OpenAI-compatible server.

Both expose `async generate(messages, n, seed) -> list[str]`, so the builder drives either the same way.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import random
import threading
from dataclasses import dataclass, field

from align.errors import AlignError


class BackendError(RuntimeError):
    """A generation request failed after its retries; the problem is reported and retried on rerun."""


@dataclass
class ModelSpec:
    """One model role (actor or critic): where it runs and how it samples."""

    backend: str = "local"  # local | server
    model: str = "tiny-mixtral"  # local: hub id / folder / tiny-mixtral; server: the served model name
    adapter: str | None = None  # local: a PEFT adapter folder (a stage's output)
    base_urls: list[str] = field(default_factory=list)  # server: one or several, shared round-robin
    api_key_env: str | None = None  # server: name of the environment variable holding the key
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    concurrency: int = 8  # server: requests in flight at most
    request_timeout_s: float = 120.0
    max_retries: int = 4
    backoff_s: float = 1.0
    dtype: str = "float32"


class LocalBackend:
    """transformers generation on a causal LM folder (plus an optional adapter); the n samples of one
    request are one batch. Requests run one at a time under a lock with their own seed, so results do
    not depend on scheduling: the same seed gives the same trees."""

    def __init__(self, spec: ModelSpec):
        from align.models import load_for_generation, load_tokenizer, resolve_model_path

        path = resolve_model_path(spec.model)
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.adapter or path)
        self.model = load_for_generation(path, spec.adapter, spec.dtype)
        self._lock = threading.Lock()
        self.name = spec.model + (f"+{spec.adapter}" if spec.adapter else "")

    def generate_sync(self, messages: list[dict], n: int, seed: int) -> list[str]:
        import torch

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)
        greedy = self.spec.temperature <= 0
        with self._lock, torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            out = self.model.generate(
                input_ids=ids["input_ids"], attention_mask=ids["attention_mask"],
                do_sample=not greedy, temperature=None if greedy else self.spec.temperature,
                top_p=None if greedy else self.spec.top_p, top_k=None,
                max_new_tokens=self.spec.max_new_tokens, num_return_sequences=1 if greedy else n,
                pad_token_id=self.tokenizer.pad_token_id,
            )
        texts = self.tokenizer.batch_decode(out[:, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        texts = [t.strip() for t in texts]
        return texts * n if greedy else texts

    async def generate(self, messages: list[dict], n: int, seed: int) -> list[str]:
        return await asyncio.to_thread(self.generate_sync, messages, n, seed)

    async def aclose(self):
        pass


RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ServerBackend:
    """An OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang, `transformers serve`, hosted APIs).

    Each of the n samples is its own request (seed + i), since not every server honours `n`. Requests
    are limited by a semaphore, time out, and are retried with exponential backoff and jitter on 429,
    5xx and connection errors; base URLs are used round-robin.
    """

    def __init__(self, spec: ModelSpec):
        import httpx

        if not spec.base_urls:
            raise AlignError("server backend: 'base_urls' is empty")
        self.spec = spec
        self.name = spec.model
        self._urls = itertools.cycle([u.rstrip("/") for u in spec.base_urls])
        headers = {}
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise AlignError(f"server backend: environment variable {spec.api_key_env} (api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self._client = httpx.AsyncClient(headers=headers, timeout=spec.request_timeout_s)
        self._semaphore = asyncio.Semaphore(spec.concurrency)
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.retries = 0

    async def _one(self, messages: list[dict], seed: int) -> str:
        import httpx

        body = {"model": self.spec.model, "messages": messages, "max_tokens": self.spec.max_new_tokens,
                "temperature": self.spec.temperature, "top_p": self.spec.top_p, "seed": seed}
        last = "no attempt"
        rng = random.Random(seed)
        for attempt in range(self.spec.max_retries + 1):
            url = next(self._urls) + "/chat/completions"
            async with self._semaphore:
                self.in_flight += 1
                self.max_in_flight = max(self.max_in_flight, self.in_flight)
                self.requests += 1
                try:
                    response = await self._client.post(url, json=body)
                except (httpx.TransportError, httpx.TimeoutException) as err:
                    last = f"{type(err).__name__} from {url}"
                    response = None
                finally:
                    self.in_flight -= 1
            if response is not None:
                if response.status_code == 200:
                    try:
                        return response.json()["choices"][0]["message"]["content"] or ""
                    except (ValueError, KeyError, IndexError, TypeError):
                        last = f"malformed response from {url}"
                elif response.status_code in RETRY_STATUS:
                    last = f"HTTP {response.status_code} from {url}"
                else:
                    raise BackendError(f"HTTP {response.status_code} from {url}: {response.text[:200]}")
            if attempt < self.spec.max_retries:
                self.retries += 1
                await asyncio.sleep(self.spec.backoff_s * (2 ** attempt) * (0.5 + rng.random()))
        raise BackendError(f"gave up after {self.spec.max_retries + 1} attempts: {last}")

    async def generate(self, messages: list[dict], n: int, seed: int) -> list[str]:
        return list(await asyncio.gather(*(self._one(messages, seed + i) for i in range(n))))

    async def aclose(self):
        await self._client.aclose()


def make_backend(spec: ModelSpec):
    if spec.backend == "local":
        return LocalBackend(spec)
    if spec.backend == "server":
        return ServerBackend(spec)
    raise AlignError(f"backend must be local or server, got {spec.backend!r}")
