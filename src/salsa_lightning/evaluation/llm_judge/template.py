"""What the llm judge is shown: the pairwise prompt template (a YAML file with `system` and `user` texts) and the
question and two answers of one comparison, a later turn of a conversation shown as each system's whole transcript."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from salsa_lightning.data.chat import Messages
from salsa_lightning.errors import SalsaError

DEFAULT_TEMPLATE = Path(__file__).parents[1] / "templates" / "pairwise.yaml"
PLACEHOLDERS = ("question", "answer_a", "answer_b")
_PLACEHOLDER = re.compile(r"\{(question|answer_a|answer_b)\}")


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
