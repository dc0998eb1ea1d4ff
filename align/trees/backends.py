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


class RowSampler:
    """Temperature / top-p sampling where every row draws its noise from its own seeded generator
    (Gumbel-max), so a row's sample does not depend on the other rows of its batch. Used as a logits
    processor under greedy decoding: argmax(logits / T + Gumbel noise) is a sample of softmax(logits / T)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        import torch

        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop_sorted = probs.cumsum(-1) - probs >= self.top_p  # the mass ranked above already reaches top_p
            scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in self.generators])
        return scores - torch.log(-torch.log(uniform.clamp_min(1e-20)))


class LocalBackend:
    """transformers generation on a causal LM folder (plus an optional adapter).

    `generate_batch` runs many requests as one left-padded batch; each sample has its own seed
    (request seed + sample index), so what a request gets depends on its seed and on the batch it was
    run in, never on timing. The tree builder makes that batch a fixed group of trees."""

    def __init__(self, spec: ModelSpec):
        from align.models import load_for_generation, load_tokenizer, resolve_model_path

        path = resolve_model_path(spec.model)
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.adapter or path)
        self.tokenizer.padding_side = "left"
        self.model = load_for_generation(path, spec.adapter, spec.dtype)
        self._lock = threading.Lock()
        self.name = spec.model + (f"+{spec.adapter}" if spec.adapter else "")

    def generate_batch(self, requests: list[tuple[list[dict], int, int]]) -> list[list[str]]:
        """(messages, n, seed) per request -> its n texts. Greedy (temperature 0) decodes once per request."""
        import torch
        from transformers import LogitsProcessorList

        greedy = self.spec.temperature <= 0
        chats, seeds = [], []
        for messages, n, seed in requests:
            for i in range(1 if greedy else n):
                chats.append(messages)
                seeds.append(seed + i)
        if not chats:
            return []
        enc = self.tokenizer.apply_chat_template(chats, add_generation_prompt=True, padding=True, return_tensors="pt",
                                                 return_dict=True)
        processors = None if greedy else LogitsProcessorList([RowSampler(seeds, self.spec.temperature, self.spec.top_p)])
        with self._lock, torch.no_grad():
            out = self.model.generate(**enc, do_sample=False, temperature=None, top_p=None, top_k=None,
                                      logits_processor=processors, max_new_tokens=self.spec.max_new_tokens,
                                      pad_token_id=self.tokenizer.pad_token_id)
        texts = [t.strip() for t in self.tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
        results, row = [], 0
        for _, n, _ in requests:
            results.append([texts[row]] * n if greedy else texts[row:row + n])
            row += 1 if greedy else n
        return results

    async def generate(self, messages: list[dict], n: int, seed: int) -> list[str]:
        return (await asyncio.to_thread(self.generate_batch, [(messages, n, seed)]))[0]

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
