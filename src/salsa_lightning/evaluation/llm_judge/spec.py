"""`LLMJudgeSpec`: the `llm_judge` block of `evaluate` — an OpenAI-compatible chat endpoint and how to ask it for
pairwise verdicts, checked when the config is read (each field's docstring becomes its `--help`)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.llm_judge.template import load_template

_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


@dataclass
class LLMJudgeSpec:
    """An OpenAI-compatible chat endpoint and how to ask it for pairwise verdicts (the `llm` judge)."""

    model: str
    """The judge model's name as the endpoint knows it, e.g. gpt-4o-2024-08-06 (part of every cache key)."""
    base_url: str = "https://api.openai.com/v1"
    """The API root, ending in /v1, e.g. http://localhost:8000/v1 for a local vLLM server."""
    api_key_env: str | None = "OPENAI_API_KEY"
    """The NAME of the environment variable that holds the API key (the key never goes in a config file);
    null for a local server that needs none."""
    template: str | None = None
    """YAML file with the `system` and `user` prompts ({question}, {answer_a}, {answer_b} in `user`); null: the
    shipped salsa_lightning/evaluation/templates/pairwise.yaml."""
    max_concurrency: int = 8
    """Requests in flight at once."""
    max_retries: int = 5
    """Further tries of a request after a rate limit (429), a server error (5xx), a time-out or a dropped connection."""
    backoff_s: float = 1.0
    """The first retry waits this long, each further one twice as long (at most 60 s; a 429's Retry-After wins)."""
    timeout_s: float = 60.0
    """Seconds to wait for one reply before it counts as a time-out."""
    temperature: float = 0.0
    """Sampling temperature of the judge (0: its most likely verdict, repeatable)."""
    max_tokens: int = 1024
    """Longest reply: room for the short comparison the prompt asks for and the verdict after it."""

    def __post_init__(self) -> None:
        if not self.model or not self.model.strip():
            raise SalsaError("llm_judge.model is empty; name the judge model, e.g. `model: gpt-4o-2024-08-06`.")
        if not re.match(r"^https?://", self.base_url):
            raise SalsaError(
                f"llm_judge.base_url {self.base_url!r} is not an http(s) URL; use e.g. http://localhost:8000/v1."
            )
        if self.api_key_env is not None and not _ENV_NAME.match(self.api_key_env):
            raise SalsaError(
                f"llm_judge.api_key_env must be the NAME of an environment variable (e.g. OPENAI_API_KEY), not "
                f"{'a key' if len(self.api_key_env) > 20 else repr(self.api_key_env)}; export the key as an environment "
                "variable and put that variable's name here."
            )
        for key, low in (("max_concurrency", 1), ("max_retries", 0), ("max_tokens", 1)):
            if getattr(self, key) < low:
                raise SalsaError(f"llm_judge.{key} must be >= {low}, got {getattr(self, key)}.")
        if not self.timeout_s > 0:
            raise SalsaError(f"llm_judge.timeout_s must be > 0, got {self.timeout_s}; use e.g. 60.")
        if not self.backoff_s >= 0:
            raise SalsaError(f"llm_judge.backoff_s must be >= 0, got {self.backoff_s}; use e.g. 1.")
        if not self.temperature >= 0:
            raise SalsaError(
                f"llm_judge.temperature must be >= 0, got {self.temperature}; use 0 for repeatable verdicts."
            )
        load_template(self.template)  # a bad template is found when the config is read, not after generation
