"""The `llm` judge of `evaluate`: pairwise verdicts from a chat model behind an OpenAI-compatible HTTP endpoint.

Every comparison is asked twice, with the two responses in both orders (A = system a's, then A = system b's).
When the two answers agree they are the verdict; when they disagree the comparison is a tie, which cancels
the judge's position bias (the protocol of the SALSA paper, §4). A reply with no readable verdict makes the
comparison `unparseable` and a request that still fails after its retries makes it `failed`: neither is ever
turned into a tie; both are counted and left out of the win rates' n.

Each reply is cached in the output's judgements.jsonl under a hash of everything that decides it (the
question, the two responses in their order, the judge model, the template text, temperature, max_tokens),
so re-judging into the same output (`overwrite: true`) only asks what is new.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml

from salsa_lightning.data.chat import Messages
from salsa_lightning.errors import SalsaError

DEFAULT_TEMPLATE = Path(__file__).with_name("templates") / "pairwise.yaml"
Choice = Literal["A", "B", "C"]  # C: a tie
PLACEHOLDERS = ("question", "answer_a", "answer_b")
_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MAX_BACKOFF_S = 60.0


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


# ---------------------------------------------------------------- the prompt
@dataclass(frozen=True)
class PairwiseTemplate:
    system: str
    user: str
    text: str  # the file's whole text: part of every cache key
    path: str

    def messages(self, question: str, answer_a: str, answer_b: str) -> Messages:
        values = {"question": question, "answer_a": answer_a, "answer_b": answer_b}
        # one pass, so a response that itself contains "{answer_b}" is not expanded again
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user)
        return ([{"role": "system", "content": self.system}] if self.system else []) + [
            {"role": "user", "content": user}
        ]


def load_template(path: str | None = None) -> PairwiseTemplate:
    """The pairwise prompt in `path` (default: the shipped one); a `SalsaError` naming the file if it is unusable."""
    f = Path(path).expanduser() if path else DEFAULT_TEMPLATE
    if not f.is_file():
        raise SalsaError(f"The llm_judge template {f} does not exist; point `llm_judge.template` at a YAML file.")
    text = f.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise SalsaError(f"The llm_judge template {f} is not valid YAML ({err}).") from err
    if not isinstance(data, dict) or not isinstance(data.get("user"), str):
        raise SalsaError(f"The llm_judge template {f} needs a `user:` text (and optionally `system:`).")
    system = data.get("system") or ""
    if not isinstance(system, str):
        raise SalsaError(f"The llm_judge template {f} has a `system:` that is not text.")
    missing = [p for p in PLACEHOLDERS if "{" + p + "}" not in data["user"]]
    if missing:
        raise SalsaError(
            f"The llm_judge template {f} lacks {', '.join('{' + p + '}' for p in missing)} in `user`; "
            "the question and both answers must appear in it."
        )
    return PairwiseTemplate(system, data["user"], text, str(f.resolve()))


def _transcript(messages: Messages) -> str:
    return "\n\n".join(f"{m['role'].capitalize()}: {m['content']}" for m in messages if m.get("role") != "system")


def question_text(messages: Messages) -> str:
    """What the judge is shown as the question: the user's request, or the whole conversation if it has several
    turns (a system prompt is left out: it instructs the policy, not the judge)."""
    turns = [m for m in messages if m.get("role") != "system"]
    if len(turns) == 1:
        return str(turns[0]["content"])
    return _transcript(turns)


# ---------------------------------------------------------------- reading a verdict
_DOUBLE = re.compile(r"\[\[\s*([ABC])\s*\]\]")
_SINGLE = re.compile(r"(?<!\[)\[\s*([ABC])\s*\](?!\])")
_FINAL_LINE = re.compile(r"^[*_#>\s]*(?:final\s+)?verdict[*_\s]*[:\-–][*_\s]*\[{0,2}(A|B|C|tie)\]{0,2}[*_.!\s]*$", re.I)


def parse_verdict(reply: str | None) -> Choice | None:
    """The judge's choice in `reply`, or None when it cannot be read with confidence.

    Accepted, in this order: bracketed letters `[[A]]` / `[[B]]` / `[[C]]`, then single-bracketed `[A]` ..., each
    only if every such mark in the reply names the same letter; then a last line `Final verdict: A` (or
    `Verdict: B`, `Final verdict: tie`, with Markdown emphasis). Free prose ("A is better") is not guessed at.
    """
    if not reply:
        return None
    for pattern in (_DOUBLE, _SINGLE):
        found = set(pattern.findall(reply))
        if found:
            return found.pop() if len(found) == 1 else None  # two different marks: ambiguous
    lines = [line.strip() for line in reply.splitlines() if line.strip()]
    m = _FINAL_LINE.match(lines[-1]) if lines else None
    if m is None:
        return None
    choice = m.group(1).upper()
    return "C" if choice == "TIE" else choice  # type: ignore[return-value]


def combine_orders(first: Choice | None, second: Choice | None) -> str | None:
    """System a's verdict from the choice with a's response shown as A (`first`) and with b's shown as A (`second`).

    Agreement gives the verdict, disagreement a tie (position bias cancels); None if either could not be read.
    """
    if first is None or second is None:
        return None
    v1 = {"A": "win", "B": "loss", "C": "tie"}[first]
    v2 = {"A": "loss", "B": "win", "C": "tie"}[second]  # the labels are swapped in the second order
    return v1 if v1 == v2 else "tie"


# ---------------------------------------------------------------- asking
@dataclass(frozen=True)
class Comparison:
    question: str
    response_a: str
    response_b: str


LATER_TURN_NOTE = (
    "(This request is the last turn of a conversation. Each reply below shows the assistant's whole conversation "
    "with the user; judge its answer to this last request, in the light of the turns before it.)"
)


def comparison(prompt_a: Messages, response_a: str, prompt_b: Messages, response_b: str) -> Comparison:
    """What the judge is shown for two systems' responses to the same item.

    The same prompt (a first turn, or a later one after equal answers): its `question_text` and the two responses. Different prompts (a later turn of
    a multi-turn set, each prompt holding its own system's earlier answers): the last user turn, marked as such,
    and each system's whole conversation ending in its response, so the judge sees what each answer follows.
    """
    if prompt_a == prompt_b:
        return Comparison(question_text(prompt_a), response_a, response_b)
    question = f"{LATER_TURN_NOTE}\n\n{prompt_a[-1]['content']}"
    shown = [
        _transcript([*prompt, {"role": "assistant", "content": response}])
        for prompt, response in ((prompt_a, response_a), (prompt_b, response_b))
    ]
    return Comparison(question, shown[0], shown[1])


@dataclass
class Reply:
    """One request's outcome: the reply text (None when the request failed) and its token counts."""

    key: str
    text: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None  # the last error; a reply with an error is not cached
    cached: bool = False
    attempts: int = 0  # requests sent for it in this run

    @property
    def choice(self) -> Choice | None:
        return parse_verdict(self.text)

    def record(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "reply": self.text,
            "choice": self.choice,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            **({"error": self.error} if self.error else {}),
        }


@dataclass
class PairJudgement:
    """One comparison: system a's verdict ('win'/'loss'/'tie', or 'unparseable'/'failed') and the two replies."""

    verdict: str
    replies: tuple[Reply, Reply]  # (a's response shown as A, b's response shown as A)

    def orders(self) -> list[dict[str, Any]]:
        return [{"a_shown_as": "A", **self.replies[0].record()}, {"a_shown_as": "B", **self.replies[1].record()}]


@dataclass
class JudgeUsage:
    """What judging cost this run (cached replies cost nothing and are counted apart)."""

    requests: int = 0  # HTTP requests sent, retries included
    retries: int = 0
    cached_replies: int = 0
    failed_replies: int = 0  # no reply after every retry (or a 4xx)
    unparseable_replies: int = 0  # a reply without a readable verdict
    prompt_tokens: int = 0
    completion_tokens: int = 0


def read_cache(path: str | Path) -> dict[str, dict[str, Any]]:
    """Cached replies by key from a previous run's judgements.jsonl (missing file or unreadable lines: skipped)."""
    f = Path(path)
    cache: dict[str, dict[str, Any]] = {}
    if not f.is_file():
        return cache
    for line in f.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        for order in record.get("orders", []) if isinstance(record, dict) else []:
            if isinstance(order, dict) and isinstance(order.get("reply"), str) and not order.get("error"):
                cache[order["key"]] = order
    return cache


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

    def _key(self, question: str, answer_a: str, answer_b: str) -> str:
        content = {
            "model": self.spec.model,
            "template": self.template.text,
            "temperature": self.spec.temperature,
            "max_tokens": self.spec.max_tokens,
            "question": question,
            "answer_a": answer_a,
            "answer_b": answer_b,
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()

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
                self._key(c.question, c.response_a, c.response_b),
                self._key(c.question, c.response_b, c.response_a),
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
        return [self._combine(replies[k1], replies[k2]) for k1, k2 in keys]

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

    @staticmethod
    def _combine(first: Reply, second: Reply) -> PairJudgement:
        if first.text is None or second.text is None:
            return PairJudgement("failed", (first, second))
        verdict = combine_orders(first.choice, second.choice)
        return PairJudgement(verdict or "unparseable", (first, second))

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


def split_verdicts(judgements: Iterable[PairJudgement]) -> tuple[list[str], int, int]:
    """The win/loss/tie verdicts (for `stats.win_rate_summary`) and the unparseable and failed counts left out."""
    verdicts, unparseable, failed = [], 0, 0
    for j in judgements:
        if j.verdict == "unparseable":
            unparseable += 1
        elif j.verdict == "failed":
            failed += 1
        else:
            verdicts.append(j.verdict)
    return verdicts, unparseable, failed
