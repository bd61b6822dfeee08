"""Settings of the LLM enricher (kept apart so the CLI can build them without importing torch)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from producers.shared.models import DEFAULT_MODEL


@dataclass(frozen=True)
class LLMOptions:
    backend: Literal["local", "openai", "lexical"] = "local"  # lexical: intents label only (producers.intents.lexical)
    model: str = DEFAULT_MODEL  # local: registry name, folder or hub id; openai: the served model's name
    endpoint: str | None = None  # OpenAI-compatible base URL (vLLM, llama.cpp server, Ollama), e.g. http://127.0.0.1:8000/v1
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key, if the server wants one
    concurrency: int = 4  # requests in flight (openai backend)
    # A hung endpoint costs at most (retries + 1) x timeout_s + backoff per request (about 1.5
    # minutes with these defaults; 120 s x 4 attempts used to make it 8 minutes).
    timeout_s: float = 30.0  # per attempt
    retries: int = 2  # more attempts per request, with exponential backoff
    batch_size: int = 4  # prompts per generate() call (local backend)
    temperature: float = 0.8
    top_p: float = 0.95
    max_new_tokens: int = 1024
    max_input_tokens: int = 1536  # the serialized history in the prompt is cut to this many tokens
