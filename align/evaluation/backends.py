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

from align.core.errors import AlignError
from align.core.redact import mask_text


class BackendError(RuntimeError):
    """A generation request failed after its retries; the problem is reported and retried on rerun. Its message
    is masked when made: it names the server URL it came from, password and all, and goes to failures.jsonl."""

    def __init__(self, message: str):
        super().__init__(mask_text(message))


@dataclass
class ModelSpec:
    """One model role (actor or critic): where it runs and how it samples."""

    backend: str = field(default="local", metadata={"help": "local (transformers) or server (OpenAI-compatible)."})
    model: str = field(default="tiny-mixtral", metadata={"help": "local: hub id / folder / tiny-mixtral; server: the served model name."})
    adapter: str | None = field(default=None, metadata={"help": "local: a PEFT adapter folder (a stage's output)."})
    base_urls: list[str] = field(default_factory=list, metadata={"help": "server: one or several, shared round-robin."})
    api_key_env: str | None = field(default=None, metadata={"help": "server: name of the environment variable holding the key."})
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (0: greedy).", "range": (0.0, 10.0)})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass.", "range": (1e-6, 1.0)})
    max_new_tokens: int = field(default=256, metadata={"help": "Tokens per answer at most.", "range": (1, 1 << 20)})
    concurrency: int = field(default=8, metadata={"help": "server: requests in flight at most.", "range": (1, 4096)})
    request_timeout_s: float = field(default=120.0, metadata={"help": "server: deadline of one request, whole.", "range": (0.01, 86400.0)})
    max_retries: int = field(default=4, metadata={"help": "server: retries of a failed request.", "range": (0, 100)})
    backoff_s: float = field(default=1.0, metadata={"help": "server: first retry delay (doubles).", "range": (0.0, 600.0)})
    dtype: str = field(default="float32", metadata={"help": "local: float32, bfloat16 or float16."})
    decode: str = field(default="drop", metadata={
        "help": "local: drop (each finished answer leaves the batch and the KV cache; default) or generate "
                "(transformers' model.generate, every row to the longest answer's end)."})
    extra_body: dict = field(default_factory=dict, metadata={
        "help": "server: extra fields of every request body, for a server's own options. `transformers serve` "
                "samples only if the model's generation config says do_sample, whatever the temperature: give it "
                "{generation_config: '{\"do_sample\": true}'}."})


class RowSampler:
    """Temperature / top-p sampling where every row draws its noise from its own seeded generator
    (Gumbel-max), so a row's sample does not depend on the other rows of its batch. Used as a logits
    processor under greedy decoding: argmax(logits / T + Gumbel noise) is a sample of softmax(logits / T)."""

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        import torch

        self.generators = [torch.Generator().manual_seed(s) for s in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids, scores):
        return self.rows(scores, None)

    def rows(self, scores, rows: list[int] | None):
        """`rows`: which of the seeded rows `scores` holds (all, in order, when None)."""
        import torch

        generators = self.generators if rows is None else [self.generators[r] for r in rows]
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            drop_sorted = probs.cumsum(-1) - probs >= self.top_p  # the mass ranked above already reaches top_p
            scores = scores.masked_fill(torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted), float("-inf"))
        uniform = torch.stack([torch.rand(scores.shape[-1], generator=g) for g in generators])
        return scores - torch.log(-torch.log(uniform.clamp_min(1e-20)))


def decode_dropping_finished(model, input_ids, attention_mask, max_new_tokens: int, eos_ids: list[int],
                             sampler: RowSampler | None = None) -> list[list[int]]:
    """Greedy (or RowSampler) decoding of a left-padded batch that drops each row from the batch, and its
    entries from the KV cache, as soon as it ends (an EOS token), so later steps compute only the rows still
    going: `model.generate` runs every row to the longest one's end. Each row's positions come from its own
    attention mask. Returns each row's new tokens, its EOS included."""
    import inspect

    import torch
    from transformers import DynamicCache

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    cache_key = "cache" if "cache" in inspect.signature(type(base).forward).parameters else "past_key_values"
    rows = input_ids.shape[0]
    positions = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
    cache = DynamicCache(config=model.config)
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions, use_cache=True,
                logits_to_keep=1, **{cache_key: cache})
    alive = torch.arange(rows)
    next_position = positions[:, -1] + 1
    mask = attention_mask
    eos = torch.tensor(eos_ids or [-1])
    generated: list[list[int]] = [[] for _ in range(rows)]
    for step in range(max_new_tokens):
        scores = out.logits[:, -1, :]
        if sampler is not None:
            scores = sampler.rows(scores, alive.tolist())
        token = scores.argmax(-1)
        for row, t in zip(alive.tolist(), token.tolist()):
            generated[row].append(t)
        if step == max_new_tokens - 1:
            break
        going = ~torch.isin(token, eos)
        if not going.any():
            break
        if not going.all():
            keep = going.nonzero().squeeze(-1)
            cache.batch_select_indices(keep)
            alive, token, mask, next_position = alive[keep], token[keep], mask[keep], next_position[keep]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        out = model(input_ids=token[:, None], attention_mask=mask, position_ids=next_position[:, None],
                    use_cache=True, **{cache_key: cache})
        next_position = next_position + 1
    return generated


class LocalBackend:
    """transformers generation on a causal LM folder (plus an optional adapter).

    `generate_batch` runs many requests as one left-padded batch; each sample has its own seed
    (request seed + sample index), so what a request gets depends on its seed and on the batch it was
    run in, never on timing. The tree builder makes that batch a fixed group of trees."""

    def __init__(self, spec: ModelSpec):
        from align.train.model_check import check_model_and_adapter, has_tokenizer
        from align.train.models import load_for_generation, load_tokenizer, resolve_model_path

        check_model_and_adapter(spec.model, spec.adapter)  # one line, not a traceback from the load below
        path = resolve_model_path(spec.model)
        self.spec = spec
        self.tokenizer = load_tokenizer(spec.adapter if spec.adapter and has_tokenizer(spec.adapter) else path)
        self.tokenizer.padding_side = "left"
        self.model = load_for_generation(path, spec.adapter, spec.dtype)
        eos = getattr(self.model.generation_config, "eos_token_id", None)
        eos = [eos] if isinstance(eos, int) else list(eos or [])
        self.eos_ids = sorted({*eos, *([self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else [])})
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
        from align.train.chat import prompt_text

        # the model's own template, a system message placed as training placed it (align/train/chat.py); tokenized as
        # apply_chat_template tokenizes its rendering (no special tokens added: the template writes them)
        enc = self.tokenizer([prompt_text(self.tokenizer, chat) for chat in chats], add_special_tokens=False,
                             padding=True, return_tensors="pt")
        sampler = None if greedy else RowSampler(seeds, self.spec.temperature, self.spec.top_p)
        with self._lock, torch.no_grad():
            if self.spec.decode == "generate":
                out = self.model.generate(**enc, do_sample=False, temperature=None, top_p=None, top_k=None,
                                          logits_processor=LogitsProcessorList([sampler]) if sampler else None,
                                          max_new_tokens=self.spec.max_new_tokens, pad_token_id=self.tokenizer.pad_token_id)
                tokens = out[:, enc["input_ids"].shape[1]:].tolist()
            else:
                tokens = decode_dropping_finished(self.model, enc["input_ids"], enc["attention_mask"],
                                                  self.spec.max_new_tokens, self.eos_ids, sampler)
        texts = [t.strip() for t in self.tokenizer.batch_decode(tokens, skip_special_tokens=True)]
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
RETRY_AFTER_CAP_S = 60.0


class UnusableReply(ValueError):
    """A 200 reply with no usable text (content missing, null, a number, a list ...)."""


def reply_text(completion) -> str:
    """The assistant text of a chat completion, checked: a string, lone surrogates replaced."""
    try:
        content = completion.choices[0].message.content
    except (AttributeError, IndexError, KeyError, TypeError):
        raise UnusableReply("no choices[0].message.content in the reply") from None
    if not isinstance(content, str):
        raise UnusableReply(f"content is {type(content).__name__}, not text")
    if len(content) > MAX_REPLY_CHARS:
        raise UnusableReply(f"content of {len(content)} characters (at most {MAX_REPLY_CHARS})")
    return content.encode("utf-8", "replace").decode("utf-8") if _has_surrogates(content) else content


MAX_REPLY_CHARS = 1 << 20  # a reply longer than this is no model's answer: refused (and retried)


def _has_surrogates(text: str) -> bool:
    try:
        text.encode("utf-8")
        return False
    except UnicodeEncodeError:
        return True


def _retry_after(headers) -> float | None:
    """Seconds from a Retry-After header (a number or an HTTP date), None when absent or unreadable."""
    value = headers.get("retry-after") if headers is not None else None
    if not value:
        return None
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            import datetime

            seconds = (parsedate_to_datetime(value) - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
        except Exception:  # TypeError, ValueError, OverflowError (a year 99999999999999999999): no header
            return None
    return seconds if seconds == seconds and seconds >= 0 else None


class ServerBackend:
    """An OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, SGLang, `transformers serve`, hosted APIs),
    through the `openai` client.

    Each of the n samples is its own request (seed + i), since not every server honours `n`. Requests are
    limited by a semaphore; base URLs are used round-robin. The retries are ours, not the client's
    (`max_retries=0`): its timeout applies to each read, so a server trickling a byte every half second
    answered after 10.6 s under `timeout=1` (measured); and it does not retry a 200 whose content is
    unusable. Here each attempt has a deadline for the whole request (`request_timeout_s`); a timeout,
    a connection error, a 408/409/425/429/5xx, or a reply without text is retried with exponential backoff
    and jitter, or after the server's Retry-After (capped at 60 s); after `max_retries` it is a
    BackendError, which the builder records in failures.jsonl.
    """

    def __init__(self, spec: ModelSpec):
        from openai import AsyncOpenAI

        if not spec.base_urls:
            raise AlignError("server backend: 'base_urls' is empty")
        self.spec = spec
        self.name = spec.model
        key = "EMPTY"  # local servers take any key; the client refuses none
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise AlignError(f"server backend: environment variable {spec.api_key_env} (api_key_env) is not set")
        self._clients = [AsyncOpenAI(base_url=url.rstrip("/"), api_key=key, max_retries=0,
                                     timeout=spec.request_timeout_s) for url in spec.base_urls]
        self._next = itertools.cycle(range(len(self._clients)))
        self._semaphore = asyncio.Semaphore(spec.concurrency)
        self.in_flight = 0
        self.max_in_flight = 0
        self.requests = 0
        self.retries = 0

    async def _attempt(self, client, messages: list[dict], seed: int) -> str:
        async with self._semaphore:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)
            self.requests += 1
            try:
                completion = await asyncio.wait_for(client.chat.completions.create(
                    model=self.spec.model, messages=messages, max_tokens=self.spec.max_new_tokens,
                    temperature=self.spec.temperature, top_p=self.spec.top_p, seed=seed,
                    extra_body=self.spec.extra_body or None), self.spec.request_timeout_s)
            finally:
                self.in_flight -= 1
        return reply_text(completion)

    async def _one(self, messages: list[dict], seed: int) -> str:
        import openai

        last = "no attempt"
        rng = random.Random(seed)
        for attempt in range(self.spec.max_retries + 1):
            client = self._clients[next(self._next)]
            wait = None
            try:
                return await self._attempt(client, messages, seed)
            except asyncio.TimeoutError:
                last = f"Timeout: no complete reply within {self.spec.request_timeout_s:g} s from {client.base_url}"
            except openai.APIStatusError as err:
                last = f"HTTP {err.status_code} from {client.base_url}: {' '.join(str(err.message).split())[:200]}"
                if err.status_code not in RETRY_STATUS and err.status_code < 500:
                    raise BackendError(last) from None
                wait = _retry_after(err.response.headers)
            except UnusableReply as err:
                last = f"unusable reply from {client.base_url}: {err}"
            except Exception as err:  # connection errors, bodies that are not JSON or not gzip, ...: retried
                last = f"{type(err).__name__} from {client.base_url}: {' '.join(str(err).split())[:200]}"
            if attempt < self.spec.max_retries:
                self.retries += 1
                backoff = self.spec.backoff_s * (2 ** attempt) * (0.5 + rng.random())
                await asyncio.sleep(min(wait, RETRY_AFTER_CAP_S) if wait is not None else backoff)
        raise BackendError(f"gave up after {self.spec.max_retries + 1} attempts: {last}")

    async def generate(self, messages: list[dict], n: int, seed: int) -> list[str]:
        """The n samples; when one gives up the others are cancelled (no request outlives its problem)."""
        tasks = [asyncio.ensure_future(self._one(messages, seed + i)) for i in range(n)]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def check_endpoints(self, role: str = "actor") -> None:
        """One request to each base URL before the first problem (GET <url>/models, no retry, a deadline of
        at most CHECK_TIMEOUT_S): any HTTP reply counts as a server that answers. A URL that does not answer
        is left out with one warning line; when none answers, the one-line error names each URL and why,
        instead of every problem spending its whole retry budget on a dead server."""
        timeout = min(self.spec.request_timeout_s, CHECK_TIMEOUT_S)
        results = await asyncio.gather(*(_probe(client, timeout) for client in self._clients))
        dead = [(client, why) for client, why in zip(self._clients, results) if why]
        if len(dead) == len(self._clients):
            await self.aclose()
            named = "; ".join(f"{client.base_url}: {why}" for client, why in dead)
            raise AlignError(f"{role}: no server answers at base_urls ({named}); start the server, or fix {role}.base_urls")
        import sys

        for client, why in dead:
            print(mask_text(f"align: warning: {role}: {client.base_url} does not answer ({why}); using the other base_urls"),
                  file=sys.stderr, flush=True)
            self._clients.remove(client)
            await client.close()
        self._next = itertools.cycle(range(len(self._clients)))

    async def aclose(self):
        for client in self._clients:
            await client.close()


CHECK_TIMEOUT_S = 10.0


async def _probe(client, timeout: float) -> str | None:
    """None when the server at the client's base URL sends any HTTP reply, else what went wrong."""
    import openai

    try:
        await asyncio.wait_for(client.with_options(timeout=timeout).models.list(), timeout)
    except (asyncio.TimeoutError, openai.APITimeoutError):
        return f"no reply within {timeout:g} s"
    except (openai.APIConnectionError, OSError) as err:  # refused, unknown host, TLS ...: the cause says most
        cause = err.__cause__ or err.__context__ or err
        return f"{type(cause).__name__}: {' '.join(str(cause).split())[:200] or type(err).__name__}"
    except Exception:  # an HTTP error status or a body that is no model list: a server answered (the
        return None    # requests will say what it thinks of them)
    return None


def make_backend(spec: ModelSpec):
    if spec.backend == "local":
        return LocalBackend(spec)
    if spec.backend == "server":
        return ServerBackend(spec)
    raise AlignError(f"backend must be local or server, got {spec.backend!r}")
