"""Where the LLM enricher's rewrites come from: a local transformers model, or an OpenAI-compatible server.

Both back ends answer one call:

    generate(prompts, seeds) -> one item per prompt, in order

where a prompt is a list of chat messages (`{"role": ..., "content": ...}`) and `seeds[i]` is the
sampling seed of prompt i. An item is the generated text (a `str`), or a `GenerationError` (not
raised, returned in its place) when that one prompt could not be answered; the enricher then
falls back to a template rewrite for it and the run goes on. Anything raised aborts the run.

`batch_size` tells the enricher how many prompts to hand over per call (it writes its cache after
every call, so a killed run loses at most one batch). `prompt_tokenizer()` gives the tokenizer
that measures the history put into the prompt, or None when it cannot be had offline.

Nothing here imports torch or transformers at module level.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import socket
import time
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Protocol

from producers.enrich.options import LLMOptions
from producers.redact import redact_text, redact_url

Messages = list[dict[str, str]]

BACKOFF_S = 1.0
"""First wait before retrying a failed request; doubled on every further attempt."""
MAX_BACKOFF_S = 60.0
"""No wait is longer, whatever the attempt number or a server's Retry-After says."""


class GenerationError(RuntimeError):
    """One prompt got no answer (returned in place of its text by `generate`, never raised)."""


class Backend(Protocol):
    name: str  # "local" or "openai": recorded in the cache
    batch_size: int  # prompts per generate() call

    def generate(self, prompts: list[Messages], seeds: list[int]) -> list[str | GenerationError]:
        ...

    def prompt_tokenizer(self) -> Any | None:
        ...


def make_backend(options: LLMOptions, log: Callable[[str], None] = lambda _: None) -> Backend:
    if options.backend == "local":
        return LocalBackend(options, log=log)
    if options.backend == "openai":
        return OpenAIBackend(options, log=log)
    raise ValueError(f"unknown LLM backend {options.backend!r}: expected 'local' or 'openai'")


def stable_seed(*parts: object) -> int:
    """A 31-bit seed from the parts' text: the same on every machine and Python (unlike `hash()`)."""
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


# --------------------------------------------------------------------------------------------
# Local: a transformers causal LM
# --------------------------------------------------------------------------------------------

CHATML_TEMPLATE_FALLBACK = "<|im_start|>{role}\n{content}<|im_end|>\n"
"""How messages are laid out when the tokenizer has no chat template (e.g. a test model)."""


class LocalBackend:
    """`AutoModelForCausalLM` from `resolve_model(options.model)`, sampled in batches.

    The model is loaded lazily, once, on the first `generate` (the tokenizer earlier, since the
    enricher needs it to cut histories): bfloat16 on CUDA, float32 on CPU. Prompts go through the
    tokenizer's chat template (`add_generation_prompt=True`; a ChatML layout when it has none),
    left-padded, then `generate(do_sample=True, temperature, top_p, max_new_tokens)`.

    Seeds: transformers samples a whole batch from one torch generator, so per-row seeds are not
    practical. Each call does `torch.manual_seed(stable_seed(*seeds))`: the same batch (same
    prompts, same seeds, same order) gives the same texts on the same hardware, but a user's text
    depends on which users share its batch, so a resumed run may sample differently from an
    uninterrupted one.
    """

    name = "local"

    def __init__(self, options: LLMOptions, log: Callable[[str], None] = lambda _: None):
        self.options = options
        self.batch_size = max(1, options.batch_size)
        self._log = log
        self._path: str | None = None
        self._tokenizer = None
        self._model = None
        self._device = None

    def _resolved(self) -> str:
        if self._path is None:
            from producers.shared.models import resolve_model

            self._path = resolve_model(self.options.model, progress=self._log)
        return self._path

    def prompt_tokenizer(self):
        if self._tokenizer is None:
            from producers.shared.models import load_tokenizer

            tokenizer = load_tokenizer(self._resolved())
            tokenizer.padding_side = "left"
            if tokenizer.pad_token is None:
                tokenizer.pad_token = tokenizer.eos_token
            self._tokenizer = tokenizer
        return self._tokenizer

    def _load(self):
        if self._model is None:
            import torch

            from producers.shared.devices import inference_dtype
            from producers.shared.models import load_causal_lm

            self._device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
            dtype = inference_dtype(self._device)
            self._log(f"loading {self.options.model} ({self._resolved()}) on {self._device}, {dtype}")
            self._model = load_causal_lm(self._resolved(), dtype=dtype).to(self._device)
        return self._model

    def _chat_text(self, messages: Messages) -> str:
        tokenizer = self.prompt_tokenizer()
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        text = "".join(CHATML_TEMPLATE_FALLBACK.format(**m) for m in messages)
        return text + "<|im_start|>assistant\n"

    def generate(self, prompts: list[Messages], seeds: list[int]) -> list[str | GenerationError]:
        if not prompts:
            return []
        import torch

        tokenizer = self.prompt_tokenizer()
        model = self._load()
        texts = [self._chat_text(m) for m in prompts]
        # The chat template already holds BOS where the model wants one.
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self._device)
        torch.manual_seed(stable_seed(*seeds))
        with torch.no_grad():
            out = model.generate(
                **batch, do_sample=True, temperature=self.options.temperature, top_p=self.options.top_p,
                max_new_tokens=self.options.max_new_tokens, pad_token_id=tokenizer.pad_token_id,
            )
        new = out[:, batch["input_ids"].shape[1]:]
        return tokenizer.batch_decode(new, skip_special_tokens=True)

    def score_choices(self, messages: Messages, choices: list[str], norm: str = "sum") -> list[float]:
        """The log-likelihood of each choice as the model's whole answer to `messages`.

        A choice is scored as its tokens followed by the end-of-turn token (the tokenizer's EOS),
        so a name that is a prefix of another ("card" vs "card_payment") is not favoured for being
        shorter. `norm="mean"` divides by the number of tokens scored. The prompt is run once; each
        choice is run on its KV cache, which is cut back to the prompt afterwards. No sampling:
        the same prompt gives the same scores.
        """
        import copy
        import inspect

        import torch

        tokenizer = self.prompt_tokenizer()
        model = self._load()
        prompt_ids = tokenizer(self._chat_text(messages), add_special_tokens=False)["input_ids"]
        end = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        scores = []
        # transformers 5 renamed `past_key_values` to `cache` (the old name goes in 5.40).
        new_api = "cache" in inspect.signature(model.forward).parameters
        with torch.no_grad():
            out = model(torch.tensor([prompt_ids], device=self._device), use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            past = out.cache if new_api else out.past_key_values
            for choice in choices:
                ids = tokenizer(choice, add_special_tokens=False)["input_ids"] + end
                total = float(first[ids[0]])
                if len(ids) > 1:
                    cache = past if hasattr(past, "crop") else copy.deepcopy(past)
                    step = model(torch.tensor([ids[:-1]], device=self._device), use_cache=True,
                                 **{"cache" if new_api else "past_key_values": cache})
                    logp = torch.log_softmax(step.logits[0].float(), dim=-1)
                    total += float(logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum())
                    if hasattr(past, "crop"):
                        # Back to the prompt alone for the next choice. A negative count (tokens to
                        # drop) means the same in transformers 4 and 5; a positive one does not.
                        past.crop(-(len(ids) - 1))
                scores.append(total / len(ids) if norm == "mean" else total)
        return scores


# --------------------------------------------------------------------------------------------
# OpenAI-compatible server (vLLM, llama.cpp server, Ollama, ...)
# --------------------------------------------------------------------------------------------


class OpenAIBackend:
    """POST `{endpoint}/chat/completions`, `concurrency` requests in flight (a thread pool, urllib).

    Each request sends `model`, `messages`, `temperature`, `top_p`, `max_tokens` and its own
    `seed` (servers that honour it give reproducible texts per user and variant). A request is
    retried `retries` times with exponential backoff (`BACKOFF_S`, doubled each time, at least a
    429's Retry-After) after a timeout, a connection error, HTTP 429 or 5xx; any other 4xx, or an
    unreadable answer, fails at once. A request that fails for good becomes a `GenerationError`
    naming the endpoint, its credentials redacted (`producers.redact`). The key, when `api_key_env`
    is set in the environment, goes out as
    `Authorization: Bearer`.
    """

    name = "openai"

    def __init__(self, options: LLMOptions, log: Callable[[str], None] = lambda _: None,
                 backoff_s: float = BACKOFF_S):
        if not options.endpoint:
            raise ValueError("the openai LLM backend needs an endpoint (the server's base URL, "
                             "e.g. http://127.0.0.1:8000/v1)")
        self.options = options
        parts = urllib.parse.urlsplit(options.endpoint)
        parts = parts._replace(path=parts.path.rstrip("/") + "/chat/completions")  # a query stays after the path
        self.shown_url = redact_url(urllib.parse.urlunsplit(parts))  # what messages say: no credentials
        if parts.scheme not in ("http", "https"):
            raise ValueError(f"the openai LLM backend needs an http(s) endpoint, not {self.shown_url!r}")
        # user:password@ in the URL becomes Basic authentication (urllib would take it for the host).
        self._basic = None
        if parts.username is not None or parts.password is not None:
            pair = f"{urllib.parse.unquote(parts.username or '')}:{urllib.parse.unquote(parts.password or '')}"
            self._basic = "Basic " + base64.b64encode(pair.encode()).decode()
            host = f"[{parts.hostname}]" if ":" in (parts.hostname or "") else (parts.hostname or "")
            parts = parts._replace(netloc=host + (f":{parts.port}" if parts.port else ""))
        self.url = urllib.parse.urlunsplit(parts)
        self.concurrency = max(1, options.concurrency)
        # Several rounds of requests per call keep every worker busy while the slowest one finishes.
        self.batch_size = self.concurrency * 4
        self.backoff_s = backoff_s
        self._log = log
        log(f"openai backend: {self.shown_url}, model {options.model}, {self.concurrency} request(s) in flight; "
            f"{describe_timeouts(options, backoff_s)}")

    def prompt_tokenizer(self):
        """The served model's tokenizer when it is a registry name or a local folder; else None.

        A hub id would need the hub, which may be out of reach; the enricher then estimates tokens
        from characters.
        """
        from producers.shared.models import REGISTRY, load_tokenizer, resolve_model

        model = self.options.model
        if model in REGISTRY or Path(model).expanduser().is_dir():
            return load_tokenizer(resolve_model(model, progress=self._log))
        return None

    def generate(self, prompts: list[Messages], seeds: list[int]) -> list[str | GenerationError]:
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(prompts))) as pool:
            return list(pool.map(self._complete, prompts, seeds))

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = os.environ.get(self.options.api_key_env) if self.options.api_key_env else None
        if key:
            headers["Authorization"] = f"Bearer {key}"
        elif self._basic:
            headers["Authorization"] = self._basic
        return headers

    def _complete(self, messages: Messages, seed: int) -> str | GenerationError:
        o = self.options
        body = json.dumps({"model": o.model, "messages": messages, "temperature": o.temperature, "top_p": o.top_p,
                           "max_tokens": o.max_new_tokens, "seed": seed}).encode()
        attempts = max(0, o.retries) + 1
        last = "no attempt made"
        for attempt in range(attempts):
            wait = min(MAX_BACKOFF_S, self.backoff_s * 2 ** attempt)
            try:
                request = urllib.request.Request(self.url, data=body, headers=self._headers(), method="POST")
                with urllib.request.urlopen(request, timeout=o.timeout_s) as response:
                    raw = response.read()
            except urllib.error.HTTPError as e:
                last = redact_text(f"HTTP {e.code} {e.reason}: {_snippet(e)}")
                if e.code != 429 and e.code < 500:
                    return GenerationError(f"{self.shown_url} refused the request ({last}); not retried")
                wait = max(wait, _retry_after(e))
            except TimeoutError as e:
                last = f"timed out after {o.timeout_s:g} s ({e})"
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException, OSError, ValueError) as e:
                reason = getattr(e, "reason", e)
                last = (f"timed out after {o.timeout_s:g} s" if isinstance(reason, (TimeoutError, socket.timeout))
                        else redact_text(f"connection error: {reason}"))
            else:
                try:
                    content = json.loads(raw)["choices"][0]["message"]["content"]
                except (ValueError, KeyError, IndexError, TypeError) as e:
                    return GenerationError(f"{self.shown_url} gave an unreadable answer ({type(e).__name__}: {e}): "
                                           f"{raw[:200]!r}")
                return content or ""
            if attempt + 1 < attempts:
                time.sleep(min(MAX_BACKOFF_S, wait))
        return GenerationError(f"{self.shown_url}: all {attempts} attempt(s) failed; last: {last}")


def worst_case_s(options: LLMOptions, backoff_s: float = BACKOFF_S) -> float:
    """The longest one request can take on a hung endpoint: every attempt times out, every backoff is waited."""
    attempts = max(0, options.retries) + 1
    return attempts * options.timeout_s + sum(min(MAX_BACKOFF_S, backoff_s * 2 ** a) for a in range(attempts - 1))


def describe_timeouts(options: LLMOptions, backoff_s: float = BACKOFF_S) -> str:
    attempts = max(0, options.retries) + 1
    return (f"timeout {options.timeout_s:g} s x {attempts} attempt(s) with backoff: at most "
            f"{worst_case_s(options, backoff_s):.0f} s per request on an unresponsive endpoint (--timeout, --retries)")


def _snippet(error: urllib.error.HTTPError, limit: int = 200) -> str:
    try:
        return error.read()[:limit].decode("utf-8", "replace").strip() or "(empty body)"
    except (OSError, http.client.HTTPException):  # the body itself may time out or be cut
        return "(body unreadable)"


def _retry_after(error: urllib.error.HTTPError) -> float:
    try:
        return float(error.headers.get("Retry-After") or 0)
    except (TypeError, ValueError):  # an HTTP date: ignore it, the backoff applies
        return 0.0
