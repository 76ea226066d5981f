"""`LLMJudge`: the HTTP side of the llm judge — the pre-flight check of key, endpoint and model, then every request
sent through one thread pool (`max_concurrency` at a time), retried with exponential back-off on rate limits,
server errors and time-outs, with the cost of a run counted."""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from typing import Any

from salsa_lightning.data.chat import Messages
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.llm_judge.cache import reply_key
from salsa_lightning.evaluation.llm_judge.spec import LLMJudgeSpec
from salsa_lightning.evaluation.llm_judge.template import Comparison, load_template
from salsa_lightning.evaluation.llm_judge.verdicts import PairJudgement, Reply, combine_replies

_MAX_BACKOFF_S = 60.0


@dataclass
class JudgeUsage:
    """What judging cost this run (cached replies cost nothing and are counted apart)."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    cached_replies: int = 0
    failed_replies: int = 0  # no reply after every retry (or a 4xx)
    unparseable_replies: int = 0  # a reply without a readable verdict, cached or new
    prompt_tokens: int = 0
    completion_tokens: int = 0


def _status_error_text(err: Any) -> str:
    return f"HTTP {err.status_code}: {str(err.message)[:200]}"


class LLMJudge:
    """Asks `spec.model` for pairwise verdicts; `connect()` first (the pre-flight), then `judge(...)`."""

    def __init__(self, spec: LLMJudgeSpec, cache: Mapping[str, dict[str, Any]] | None = None) -> None:
        self.spec = spec
        self.template = load_template(spec.template)
        self.cache = dict(cache or {})
        self.usage = JudgeUsage()
        self._client: Any = None

    # -- pre-flight
    def connect(self) -> None:
        """Build the client and check, before any model is loaded, that the key is set and the endpoint answers.

        The check is `GET /models` (free, no tokens): it fails fast on an unreachable host, a refused key or a
        model the endpoint does not list. An endpoint without /models (404) gets a 1-token chat request instead.
        """
        try:
            import openai
        except ImportError as err:
            raise SalsaError(
                "The llm judge needs the `openai` package; install it with `pip install 'salsa_lightning[llm]'`."
            ) from err
        spec = self.spec
        key = "none"  # the client insists on some key; a local server ignores it
        if spec.api_key_env is not None:
            key = os.environ.get(spec.api_key_env, "")
            if not key:
                raise SalsaError(
                    f"The llm judge's API key variable {spec.api_key_env} is not set; `export {spec.api_key_env}=...` "
                    "(or set llm_judge.api_key_env to the variable that holds it) and run again."
                )
        # max_retries=0: our own loop in `_ask` retries, with a back-off the config sets and a count we report
        # (the client's own retries would work too, but their fixed 0.5-8 s back-off makes the tests slow and
        # their number is invisible)
        self._client = openai.OpenAI(base_url=spec.base_url, api_key=key, timeout=spec.timeout_s, max_retries=0)
        endpoint = f"The llm judge endpoint {spec.base_url}"
        try:
            try:
                listed = [m.id for m in self._client.models.list()]
            except openai.NotFoundError:
                listed = []
                self._client.chat.completions.create(
                    model=spec.model, messages=[{"role": "user", "content": "Reply with A."}], max_tokens=1
                )
        except openai.APIConnectionError as err:  # time-outs included
            raise SalsaError(
                f"Cannot reach the llm judge endpoint {spec.base_url} ({type(err).__name__}: {err}); "
                "check llm_judge.base_url and that the server runs."
            ) from err
        except (openai.AuthenticationError, openai.PermissionDeniedError) as err:
            raise SalsaError(
                f"{endpoint} refused the key in {spec.api_key_env} ({_status_error_text(err)}); check the key."
            ) from err
        except openai.APIStatusError as err:
            raise SalsaError(
                f"{endpoint} answered the pre-flight check with {_status_error_text(err)}; "
                "check llm_judge.base_url and llm_judge.model."
            ) from err
        if listed and spec.model not in listed:
            shown = ", ".join(listed[:10]) + (", ..." if len(listed) > 10 else "")
            raise SalsaError(
                f"{endpoint} does not serve the model {spec.model!r} (it lists {shown}); "
                "set llm_judge.model to one of them."
            )

    # -- one request, with retries
    def _backoff(self, attempt: int, err: Exception) -> float:
        delay = min(self.spec.backoff_s * 2**attempt, _MAX_BACKOFF_S)
        response = getattr(err, "response", None)
        retry_after = response.headers.get("retry-after") if response is not None else None
        try:
            delay = max(delay, min(float(retry_after), _MAX_BACKOFF_S)) if retry_after else delay
        except ValueError:  # an HTTP date: keep our own delay
            pass
        return delay * (1.0 + 0.25 * random.random())  # jitter: the pool's threads do not retry in lockstep

    def _ask(self, key: str, messages: Messages) -> Reply:
        import openai

        reply = Reply(key)
        for attempt in range(self.spec.max_retries + 1):
            reply.attempts += 1
            try:
                response = self._client.chat.completions.create(
                    model=self.spec.model,
                    messages=messages,
                    temperature=self.spec.temperature,
                    max_tokens=self.spec.max_tokens,
                )
            except (openai.RateLimitError, openai.InternalServerError, openai.APIConnectionError) as err:
                # 429, 5xx, time-outs, dropped connections: the same request may well succeed later
                reply.error = _status_error_text(err) if isinstance(err, openai.APIStatusError) else type(err).__name__
                if attempt < self.spec.max_retries:
                    time.sleep(self._backoff(attempt, err))
                continue
            except openai.APIStatusError as err:  # another 4xx: asking again gets the same answer
                reply.error = _status_error_text(err)
                return reply
            except (openai.APIResponseValidationError, ValueError) as err:  # a body that is not a chat completion
                return Reply(key, "", error=f"malformed response: {str(err)[:200]}", attempts=reply.attempts)
            try:
                text = response.choices[0].message.content
            except (AttributeError, IndexError, TypeError):
                text = None
            usage = getattr(response, "usage", None)
            prompt_tokens = int(getattr(usage, "prompt_tokens", 0) or 0)
            completion_tokens = int(getattr(usage, "completion_tokens", 0) or 0)
            if not isinstance(text, str):  # a reply arrived but holds no message: unparseable, and not cached
                return Reply(key, "", prompt_tokens, completion_tokens, "malformed response", attempts=reply.attempts)
            return Reply(key, text, prompt_tokens, completion_tokens, attempts=reply.attempts)
        return reply

    # -- many comparisons
    def judge(
        self, comparisons: Sequence[Comparison], on_reply: Callable[[int, int], None] | None = None
    ) -> list[PairJudgement]:
        """System a's verdict on each comparison, both orders asked, `spec.max_concurrency` requests at a time.

        Replies in the cache are not asked again; new successful replies join it. `on_reply(done, total)` is
        called as replies arrive (for a progress bar; `total` counts the requests not in the cache).
        """
        if self._client is None:
            self.connect()
        keys: list[tuple[str, str]] = []
        pending: dict[str, Messages] = {}  # key -> messages, each distinct request once
        replies: dict[str, Reply] = {}
        for c in comparisons:
            pair = (
                reply_key(self.spec, self.template.text, c.question, c.response_a, c.response_b),
                reply_key(self.spec, self.template.text, c.question, c.response_b, c.response_a),
            )
            keys.append(pair)
            for key, (x, y) in zip(pair, ((c.response_a, c.response_b), (c.response_b, c.response_a)), strict=True):
                if key in replies or key in pending:
                    continue
                if key in self.cache:
                    hit = self.cache[key]
                    replies[key] = Reply(
                        key, hit["reply"], int(hit.get("prompt_tokens", 0)), int(hit.get("completion_tokens", 0)),
                        cached=True,
                    )  # fmt: skip
                    self.usage.cached_replies += 1
                    # a cached prose reply is as unusable as a fresh one: the count describes every reply this
                    # run's tables used, so a cached re-run does not report "0 unparseable" beside a table of them
                    if replies[key].choice is None:
                        self.usage.unparseable_replies += 1
                else:
                    pending[key] = self.template.messages(c.question, x, y)
        if pending:
            with ThreadPoolExecutor(max_workers=self.spec.max_concurrency, thread_name_prefix="llm-judge") as pool:
                futures = [pool.submit(self._ask, key, messages) for key, messages in pending.items()]
                for done, future in enumerate(as_completed(futures), 1):
                    reply = future.result()
                    replies[reply.key] = reply
                    self._account(reply)
                    if on_reply is not None:
                        on_reply(done, len(futures))
        return [combine_replies(replies[k1], replies[k2]) for k1, k2 in keys]

    def _account(self, reply: Reply) -> None:
        u = self.usage
        u.requests += reply.attempts
        u.retries += reply.attempts - 1
        u.prompt_tokens += reply.prompt_tokens
        u.completion_tokens += reply.completion_tokens
        if reply.text is None:
            u.failed_replies += 1
        elif reply.choice is None:
            u.unparseable_replies += 1
        if reply.text is not None and reply.error is None:
            self.cache[reply.key] = reply.record()

    def report(self) -> dict[str, Any]:
        """The judge's settings and this run's usage, for results.json and the manifest."""
        u = self.usage
        return {
            "model": self.spec.model,
            "base_url": self.spec.base_url,
            "api_key_env": self.spec.api_key_env,
            "template": self.template.path,
            "template_sha256": hashlib.sha256(self.template.text.encode()).hexdigest(),
            "temperature": self.spec.temperature,
            "max_tokens": self.spec.max_tokens,
            "requests": u.requests,
            "retries": u.retries,
            "cached_replies": u.cached_replies,
            "failed_replies": u.failed_replies,
            "unparseable_replies": u.unparseable_replies,
            "prompt_tokens": u.prompt_tokens,
            "completion_tokens": u.completion_tokens,
        }
