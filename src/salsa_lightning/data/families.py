"""The task families of the built-in suite: prompt templates, parameter sampling, answers, responses, grading.

Each family owns its prompt templates. A template is a format string whose `{slots}` become named regex
groups, so the same text both generates prompts and parses them back: the gold judge recovers the task
(and so the answer) from the prompt alone. The answer is computed in one place only, `Family.solve`,
from the parsed slots; generation renders a prompt and then parses it, so a generated answer can never
disagree with the judge's.

Templates are tagged `id` (used for training data and the in-distribution eval) or `ood` (used only
for the out-of-distribution eval). `ood` templates are unseen phrasings, sample harder parameters,
and some are held-out variants of a family (three-operand arithmetic, counting vowels, descending
sort, two-step unit conversions, unseen JSON keys and questions).

Scores (the gold judge's scale, shared by all families):

| score | meaning |
|---|---|
| 1.0  | right answer in the requested form |
| 0.5  | right content, wrong presentation: longer than `MAX_WORDS` words (rambling), or the JSON family's value given outside a JSON object / under another key, or the exact-words family's count met without mentioning the topic (singular or plural) |
| 0.25 | upper-case family: the right words, not all in capitals (the constraint ignored) |
| 0.0  | anything else: a wrong or hedged answer ("12 or 13"), a wrong word count, empty |
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from decimal import Decimal
from fractions import Fraction
from typing import Any

FULL = 1.0
FORMAT_SLIP = 0.5
CONSTRAINT_IGNORED = 0.25
WRONG = 0.0

MAX_WORDS = 40
"""Responses longer than this are 'rambling' and capped at FORMAT_SLIP (the suite asks for short answers)."""

SPLITS = ("id", "ood")

# ----------------------------------------------------------------------------------------------------------------------
# Vocabulary (written for this suite; lower case, ASCII)

LETTER_WORDS_ID = [
    "banana", "apple", "letter", "coffee", "garden", "pepper", "yellow", "window", "rabbit", "summer",
    "butter", "kitten", "puzzle", "bottle", "mirror", "cotton", "pillow", "tomato", "orange", "carrot",
    "little", "bubble", "people", "cheese", "balloon", "hammer", "dinner", "ladder", "mammal", "cookie",
    "button", "paper", "river", "banner", "tennis", "coconut", "giraffe", "spoon", "moon", "sheep",
]  # fmt: skip
LETTER_WORDS_OOD = [
    "strawberry", "mississippi", "bookkeeper", "committee", "assessment", "possession", "engineering",
    "unnecessary", "accommodate", "millennium", "parallelogram", "successfully", "embarrassment",
    "grasshopper", "tennessee", "peppermint", "referee", "woodpecker", "chimpanzee", "abracadabra",
]  # fmt: skip
LIST_WORDS = [
    "apple", "pear", "fig", "plum", "kiwi", "lime", "grape", "mango", "peach", "melon", "cherry", "lemon",
    "dog", "cat", "owl", "fox", "bee", "cow", "hen", "yak", "lion", "wolf", "bear", "deer", "seal", "frog",
]  # fmt: skip
SUBJECTS = ["dog", "cat", "bird", "child", "farmer", "teacher", "robot", "fox", "girl", "boy", "baker", "pilot"]
VERBS = ["chased", "found", "painted", "carried", "watched", "opened", "dropped", "cleaned", "lifted", "followed"]
OBJECTS = ["ball", "box", "door", "kite", "book", "cup", "letter", "basket", "window", "fence", "hat", "boat"]
ADJECTIVES = ["small", "red", "happy", "old", "quiet", "bright", "tall", "lazy", "green", "clever", "young", "tiny"]
PLACES = ["park", "garden", "kitchen", "market", "forest", "library", "yard", "station", "village", "harbor"]
TOPICS = [
    "coffee", "rain", "music", "winter", "summer", "books", "mountains", "gardens", "cats", "dogs", "bicycles",
    "oceans", "friendship", "cooking", "trains", "stars", "forests", "painting", "chess", "tea", "bread",
    "libraries", "rivers", "snow", "autumn", "spring", "swimming", "running", "museums", "cities", "birds",
    "flowers", "sunsets", "breakfast", "holidays", "puzzles", "gardening", "camping", "history", "science",
]  # fmt: skip
DESCRIPTORS = [
    "calm", "warm", "bright", "simple", "lovely", "peaceful", "familiar", "exciting", "gentle", "cheerful",
    "quiet", "wonderful", "relaxing", "pleasant", "fresh", "charming", "colorful", "soothing", "lively", "cozy",
    "timeless", "curious", "rich", "inspiring", "restful", "joyful", "elegant", "playful", "steady", "humble",
]  # fmt: skip
COUNTABLE_THINGS = ["apples", "marbles", "books", "stamps", "coins", "pencils", "shells", "cards", "stickers"]
RAMBLE = [
    "That is a really interesting question, and I want to make sure I give it the attention it deserves.",
    "There are many ways to think about problems like this one, and people often approach them differently.",
    "Before answering, it helps to slow down and consider every detail of what was asked.",
    "I always find that careful reasoning leads to better results than rushing to a conclusion.",
    "Of course, it is worth double-checking everything, because small mistakes are easy to make.",
    "Let me know if you would like me to explain any part of this in more detail.",
]
REFUSALS = [
    "I'm sorry, but I can't help with that.",
    "I am not able to answer this question.",
    "Could you please clarify what you mean?",
]

# ----------------------------------------------------------------------------------------------------------------------
# Templates: text with {slots}; each slot name maps to the regex its value must match.

INT = r"-?\d+"
_SLOT_PATTERNS = {
    "a": INT,
    "b": INT,
    "c": INT,
    "op": r"[-+*]",
    "op2": r"[-+*]",
    "v": r"\d+(?:\.\d+)?",
    "n": r"\d+",
    "word": r"[a-z]+",
    "letter": r"[a-z]",
    "sentence": r"[a-z]+(?: [a-z]+)*",
    "items": r"[^\[\]]+",
    "unit_a": r"[a-z]+",
    "unit_b": r"[a-z]+",
    "topic": r"[a-z]+",
    "key": r"[a-z_]+",
    "thing": r"[a-z]+",
}
_SLOT_RE = re.compile(r"\{(\w+)\}")


@dataclass(frozen=True)
class Template:
    text: str
    split: str
    variant: str
    regex: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        parts, seen, pos = [], set(), 0
        for m in _SLOT_RE.finditer(self.text):
            parts.append(re.escape(self.text[pos : m.start()]))
            name = m.group(1)
            # a slot used twice must hold the same value both times
            parts.append(f"(?P={name})" if name in seen else f"(?P<{name}>{_SLOT_PATTERNS[name]})")
            seen.add(name)
            pos = m.end()
        parts.append(re.escape(self.text[pos:]))
        object.__setattr__(self, "regex", re.compile("".join(parts), re.IGNORECASE))

    def render(self, slots: dict[str, Any]) -> str:
        return self.text.format(**slots)


@dataclass(frozen=True)
class Task:
    """A parsed prompt: everything the judge needs, recovered from the prompt text alone."""

    family: str
    variant: str
    split: str
    prompt: str
    slots: dict[str, str]
    answer: Any


# ----------------------------------------------------------------------------------------------------------------------
# Reading answers out of free text


def words_of(text: str) -> list[str]:
    """Whitespace-separated tokens that contain a letter or digit (a lone dash or emoji is not a word)."""
    return [t for t in text.split() if any(c.isalnum() for c in t)]


_NUMBER_RE = re.compile(r"(?<![\w.])-?\d+(?:,\d{3})*(?:\.\d+)?|(?<=\w)\d+(?:\.\d+)?")
_ANSWER_CUE_RE = re.compile(r"answer\s*(?:is|:|=|would be|will be)\s*(?:about\s*)?(-?\d[\d,]*(?:\.\d+)?)", re.I)
_HEDGE_RE = re.compile(r"\d\s+or\s+-?\d", re.I)
_NUMBER_WORDS = (
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty"
).split()
_NUMBER_WORD_RE = re.compile(r"\b(" + "|".join(_NUMBER_WORDS) + r")\b", re.I)


def _to_fraction(s: str) -> Fraction:
    return Fraction(s.replace(",", ""))


def extract_number(response: str) -> Fraction | None:
    """The final numeric answer of a free-text response, or None (no number, or a hedge like '12 or 13').

    An explicit 'the answer is N' wins; otherwise the last number counts, the usual convention for
    grading worked answers ('7 + 5 = 12'). Number words up to twenty count only when no digit appears.
    """
    if _HEDGE_RE.search(response):
        return None
    cues = _ANSWER_CUE_RE.findall(response)
    if cues:
        return _to_fraction(cues[-1])
    nums = _NUMBER_RE.findall(response)
    if nums:
        return _to_fraction(nums[-1])
    names = _NUMBER_WORD_RE.findall(response)
    if names:
        return Fraction(_NUMBER_WORDS.index(names[-1].lower()))
    return None


def fmt_number(x: Fraction | int) -> str:
    """'3', '2.5', '-0.125': exact decimals (every answer in the suite has a terminating expansion)."""
    x = Fraction(x)
    if x.denominator == 1:
        return str(x.numerator)
    d = Decimal(x.numerator) / Decimal(x.denominator)
    return format(d.normalize(), "f")


def cap_verbose(score: float, response: str) -> float:
    return min(score, FORMAT_SLIP) if len(words_of(response)) > MAX_WORDS else score


def ramble(rng: random.Random, tail: str = "") -> str:
    """A response padded with filler until it is clearly over MAX_WORDS words."""
    pool = RAMBLE[:]
    rng.shuffle(pool)
    out: list[str] = []
    while len(words_of(" ".join(out))) <= MAX_WORDS + 5:
        out.append(pool[len(out) % len(pool)])
    return " ".join(out + ([tail] if tail else []))


def _int_list(rng: random.Random, n: int, lo: int, hi: int) -> list[int]:
    return [rng.randint(lo, hi) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------------
# Families


class Family:
    """One task family. Subclasses define templates, sampling, the answer, grading and example responses."""

    name: str
    templates: list[Template]

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        raise NotImplementedError

    def solve(self, variant: str, slots: dict[str, str]) -> Any:
        raise NotImplementedError

    def grade(self, task: Task, response: str) -> float:
        raise NotImplementedError

    def good(self, task: Task, rng: random.Random) -> str:
        raise NotImplementedError

    def bad(self, task: Task, rng: random.Random) -> tuple[str, str]:
        """A plausible wrong or worse response: (kind, text). Kinds: off_by_one, wrong_format,
        ignored_constraint, rambling, empty, refusal, and family-specific slips."""
        raise NotImplementedError

    def _generic_bad(self, kind: str, rng: random.Random) -> str | None:
        if kind == "empty":
            return ""
        if kind == "refusal":
            return rng.choice(REFUSALS)
        return None


class NumericFamily(Family):
    """Families whose answer is one number; graded by `extract_number`."""

    def grade(self, task: Task, response: str) -> float:
        got = extract_number(response)
        if got is None or got != Fraction(task.answer):
            return WRONG
        return cap_verbose(FULL, response)

    def wrong_value(self, task: Task, rng: random.Random) -> Fraction:
        step = 1 if Fraction(task.answer).denominator == 1 else Fraction(1, 2)
        delta = rng.choice([-step, step])
        if task.answer + delta < 0:  # counts are never negative; stay plausible
            delta = step
        return Fraction(task.answer) + delta

    def say(self, task: Task, value: Fraction | int, rng: random.Random) -> str:
        raise NotImplementedError

    def good(self, task: Task, rng: random.Random) -> str:
        return self.say(task, task.answer, rng)

    def bad(self, task: Task, rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(["off_by_one", "off_by_one", "slip", "rambling", "rambling_wrong", "empty", "refusal"])
        generic = self._generic_bad(kind, rng)
        if generic is not None:
            return kind, generic
        if kind == "off_by_one":
            return kind, self.say(task, self.wrong_value(task, rng), rng)
        if kind == "rambling":
            return kind, ramble(rng, f"The answer is {fmt_number(task.answer)}.")
        if kind == "rambling_wrong":
            return kind, ramble(rng, f"I think it is roughly {fmt_number(self.wrong_value(task, rng))}.")
        return kind, self.say(task, self.slip(task, rng), rng)

    def slip(self, task: Task, rng: random.Random) -> Fraction:
        """A family-specific plausible mistake (wrong operation, wrong factor...)."""
        return self.wrong_value(task, rng)


_OPS = {"+": lambda x, y: x + y, "-": lambda x, y: x - y, "*": lambda x, y: x * y}


def _evaluate(a: int, op: str, b: int, op2: str | None = None, c: int | None = None) -> int:
    """a op b [op2 c] with the usual precedence (* before + and -)."""
    if op2 is None:
        return _OPS[op](a, b)
    if op2 == "*" and op != "*":
        return _OPS[op](a, b * c)
    return _OPS[op2](_OPS[op](a, b), c)


class Arithmetic(NumericFamily):
    name = "arithmetic"
    templates = [
        Template("What is {a} {op} {b}?", "id", "binary"),
        Template("Calculate {a} {op} {b}.", "id", "binary"),
        Template("Work out {a} {op} {b} for me.", "id", "binary"),
        Template("What is {a} plus {b}?", "id", "plus"),
        Template("What is {a} minus {b}?", "id", "minus"),
        Template("What is {a} times {b}?", "id", "times"),
        Template("Add {a} and {b}.", "id", "plus"),
        Template("Find the value of {a} {op} {b} {op2} {c}.", "ood", "three"),
        Template("Evaluate the expression {a} {op} {b} {op2} {c}, please.", "ood", "three"),
        Template("Subtract {b} from {a}. What number do you get?", "ood", "minus"),
        Template("If you multiply {a} by {b}, what is the result?", "ood", "times"),
        Template("I have {a} {thing} and get {b} more. How many {thing} do I have now?", "ood", "plus"),
    ]

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        hard = template.split == "ood"
        variant = template.variant
        op = {"plus": "+", "minus": "-", "times": "*"}.get(variant) or rng.choice("+-*")
        if op == "*":
            a, b = (rng.randint(13, 99), rng.randint(3, 19)) if hard else (rng.randint(2, 12), rng.randint(2, 12))
        else:
            a, b = (rng.randint(100, 999), rng.randint(10, 999)) if hard else (rng.randint(0, 50), rng.randint(0, 50))
        slots: dict[str, Any] = {"a": a, "op": op, "b": b}
        if variant == "three":
            slots.update(a=rng.randint(2, 60), b=rng.randint(2, 30), op2=rng.choice("+-*"), c=rng.randint(2, 30))
        if "{thing}" in template.text:
            slots["thing"] = rng.choice(COUNTABLE_THINGS)
        return slots

    def solve(self, variant: str, slots: dict[str, str]) -> int:
        a, b = int(slots["a"]), int(slots["b"])
        op = {"plus": "+", "minus": "-", "times": "*"}.get(variant) or slots["op"]
        if variant == "three":
            return _evaluate(a, op, b, slots["op2"], int(slots["c"]))
        return _evaluate(a, op, b)

    def _expr(self, task: Task) -> str:
        s = task.slots
        op = {"plus": "+", "minus": "-", "times": "*"}.get(task.variant) or s["op"]
        expr = f"{s['a']} {op} {s['b']}"
        return expr + (f" {s['op2']} {s['c']}" if task.variant == "three" else "")

    def say(self, task: Task, value: Fraction | int, rng: random.Random) -> str:
        v = fmt_number(value)
        return rng.choice([v, f"The answer is {v}.", f"{self._expr(task)} = {v}.", f"{self._expr(task)} equals {v}."])

    def slip(self, task: Task, rng: random.Random) -> Fraction:
        # the classic slip: the wrong operation (or, for three operands, left-to-right instead of precedence)
        s = task.slots
        a, b = int(s["a"]), int(s["b"])
        if task.variant == "three":
            c, op = int(s["c"]), s["op"]
            candidates = [_OPS[s["op2"]](_OPS[op](a, b), c), a + b + c]
        else:
            candidates = [a + b, a - b, a * b]
        wrong = [x for x in candidates if x != task.answer]
        return Fraction(rng.choice(wrong)) if wrong else self.wrong_value(task, rng)


class Counting(NumericFamily):
    name = "counting"
    templates = [
        Template('How many times does the letter "{letter}" appear in the word "{word}"?', "id", "letter"),
        Template('In the word "{word}", how many times does "{letter}" occur?', "id", "letter"),
        Template('Count the letter "{letter}" in "{word}".', "id", "letter"),
        Template('How many words are in this sentence: "{sentence}"?', "id", "words"),
        Template('Count the words in the sentence "{sentence}".', "id", "words"),
        Template('Tell me the number of occurrences of the character "{letter}" in "{word}".', "ood", "letter"),
        Template('If you counted every word in "{sentence}", what number would you reach?', "ood", "words"),
        Template('What is the total number of vowels (a, e, i, o, u) in "{word}"?', "ood", "vowels"),
    ]

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        hard = template.split == "ood"
        if template.variant == "words":
            return {"sentence": make_sentence(rng, hard)}
        word = rng.choice(LETTER_WORDS_OOD if hard else LETTER_WORDS_ID)
        # mostly a letter that repeats (the interesting case), sometimes any letter of the word
        repeated = sorted({ch for ch in word if word.count(ch) > 1})
        pool = repeated if repeated and rng.random() < 0.7 else sorted(set(word))
        return {"word": word, "letter": rng.choice(pool)}

    def solve(self, variant: str, slots: dict[str, str]) -> int:
        if variant == "words":
            return len(slots["sentence"].split())
        word = slots["word"].lower()
        if variant == "vowels":
            return sum(word.count(v) for v in "aeiou")
        return word.count(slots["letter"].lower())

    def say(self, task: Task, value: Fraction | int, rng: random.Random) -> str:
        v = fmt_number(value)
        if task.variant == "words":
            return rng.choice([v, f"There are {v} words.", f"That sentence has {v} words.", f"The answer is {v}."])
        if task.variant == "vowels":
            return rng.choice([v, f'"{task.slots["word"]}" has {v} vowels.', f"There are {v} vowels."])
        letter, word = task.slots["letter"], task.slots["word"]
        return rng.choice(
            [v, f'The letter "{letter}" appears {v} times in "{word}".', f"There are {v}.", f"The answer is {v}."]
        )

    def slip(self, task: Task, rng: random.Random) -> Fraction:
        # counting the wrong thing: all letters of the word, or characters of the sentence
        if task.variant == "words":
            return Fraction(len(task.slots["sentence"].replace(" ", "")))
        return Fraction(len(task.slots["word"]))


def make_sentence(rng: random.Random, hard: bool) -> str:
    """A simple lower-case sentence: 5-9 words in distribution, 12-20 (two clauses) out of it."""

    def clause() -> list[str]:
        words = ["the"] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else []) + [rng.choice(SUBJECTS)]
        words += [rng.choice(VERBS), "the"] + ([rng.choice(ADJECTIVES)] if rng.random() < 0.5 else [])
        words += [rng.choice(OBJECTS)]
        if rng.random() < 0.5:
            words += ["in", "the", rng.choice(PLACES)]
        return words

    words = clause()
    if hard:
        words += ["and", "then"] + clause()
    return " ".join(words)


_UNITS: dict[str, tuple[str, int]] = {
    # canonical plural name -> (dimension, size in the dimension's base unit)
    "millimetres": ("length", 1),
    "centimetres": ("length", 10),
    "metres": ("length", 1000),
    "kilometres": ("length", 1_000_000),
    "milligrams": ("mass", 1),
    "grams": ("mass", 1000),
    "kilograms": ("mass", 1_000_000),
    "millilitres": ("volume", 1),
    "litres": ("volume", 1000),
    "seconds": ("time", 1),
    "minutes": ("time", 60),
    "hours": ("time", 3600),
    "days": ("time", 86400),
    "weeks": ("time", 604800),
}


def _unit_aliases() -> dict[str, str]:
    out = {}
    for name in _UNITS:
        for spelled in {name, name.replace("tres", "ters")}:
            out[spelled] = name
            out[spelled[:-1]] = name  # singular
    return out


_UNIT_ALIASES = _unit_aliases()
# adjacent pairs (one factor) are in distribution; two-step pairs are the held-out variant
_ID_UNIT_PAIRS = [
    ("kilometres", "metres"), ("metres", "centimetres"), ("centimetres", "millimetres"), ("kilograms", "grams"),
    ("grams", "milligrams"), ("litres", "millilitres"), ("hours", "minutes"), ("minutes", "seconds"),
    ("days", "hours"), ("weeks", "days"),
]  # fmt: skip
_OOD_UNIT_PAIRS = [
    ("kilometres", "centimetres"), ("metres", "millimetres"), ("kilograms", "milligrams"), ("hours", "seconds"),
    ("weeks", "hours"), ("days", "minutes"),
]  # fmt: skip


def unit_name(name: str, value: Fraction) -> str:
    return name[:-1] if value == 1 else name


class Units(NumericFamily):
    name = "units"
    templates = [
        Template("Convert {v} {unit_a} to {unit_b}.", "id", "convert"),
        Template("How many {unit_b} are in {v} {unit_a}?", "id", "convert"),
        Template("What is {v} {unit_a} in {unit_b}?", "id", "convert"),
        Template("Express {v} {unit_a} in {unit_b}, please.", "ood", "two_step"),
        Template("{v} {unit_a} equals how many {unit_b}?", "ood", "two_step"),
    ]

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        hard = template.split == "ood"
        big, small = rng.choice(_OOD_UNIT_PAIRS if hard else _ID_UNIT_PAIRS)
        ratio = Fraction(_UNITS[big][1], _UNITS[small][1])
        if rng.random() < 0.5:  # big -> small: multiply
            v = (
                Fraction(rng.randint(11, 400), rng.choice([1, 4]))
                if hard
                else Fraction(rng.randint(1, 20) * 2 + rng.choice([0, 1]), 2)
            )
            src, dst = big, small
        else:  # small -> big: pick a friendly result, then the source that gives it
            result = Fraction(rng.randint(1, 40), 4) if hard else Fraction(rng.randint(1, 20), 2)
            v = result * ratio
            src, dst = small, big
        return {"v": fmt_number(v), "unit_a": unit_name(src, v), "unit_b": dst}

    def solve(self, variant: str, slots: dict[str, str]) -> Fraction:
        src, dst = _UNIT_ALIASES.get(slots["unit_a"].lower()), _UNIT_ALIASES.get(slots["unit_b"].lower())
        if src is None or dst is None or _UNITS[src][0] != _UNITS[dst][0]:
            raise ValueError(f"not a known conversion: {slots['unit_a']} -> {slots['unit_b']}")
        return _to_fraction(slots["v"]) * _UNITS[src][1] / _UNITS[dst][1]

    def say(self, task: Task, value: Fraction | int, rng: random.Random) -> str:
        v, dst = fmt_number(value), unit_name(_UNIT_ALIASES[task.slots["unit_b"].lower()], Fraction(value))
        src = f"{task.slots['v']} {task.slots['unit_a']}"
        return rng.choice([f"{src} is {v} {dst}.", f"That is {v} {dst}.", f"{v} {dst}", f"It comes to {v} {dst}."])

    def slip(self, task: Task, rng: random.Random) -> Fraction:
        # the two classic unit slips: dividing instead of multiplying, or a factor that is off by 10
        v = _to_fraction(task.slots["v"])
        ratio = task.answer / v
        return rng.choice([v / ratio, task.answer * 10, task.answer / 10])


_BULLET_RE = re.compile(r"^(?:\d+[.)]|[-*\u2022])\s+")


class ListOps(Family):
    name = "list"
    templates = [
        Template("Reverse the list [{items}].", "id", "reverse"),
        Template("Write the list [{items}] in reverse order.", "id", "reverse"),
        Template("What is [{items}] backwards?", "id", "reverse"),
        Template("Sort the list [{items}] from smallest to largest.", "id", "ascending"),
        Template("Put these numbers in ascending order: [{items}].", "id", "ascending"),
        Template("Give me the elements of [{items}] in the opposite order.", "ood", "reverse"),
        Template("Arrange [{items}] from largest to smallest.", "ood", "descending"),
        Template("Alphabetize the following words: [{items}].", "ood", "alphabetical"),
    ]

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        hard = template.split == "ood"
        n = rng.randint(6, 8) if hard else rng.randint(3, 5)
        words = template.variant == "alphabetical" or (template.variant == "reverse" and rng.random() < 0.4)
        if words:
            items = [str(w) for w in rng.sample(LIST_WORDS, n)]
        else:
            items = [str(x) for x in (_int_list(rng, n, -50, 999) if hard else _int_list(rng, n, 0, 50))]
        return {"items": ", ".join(items)}

    @staticmethod
    def _items(text: str) -> list[str]:
        out = []
        for raw in text.split(","):
            item = raw.strip().strip("\"'`").strip().lower()
            if item:
                out.append(item)
        return out

    def solve(self, variant: str, slots: dict[str, str]) -> list[str]:
        items = self._items(slots["items"])
        if variant == "reverse":
            return items[::-1]
        if variant == "alphabetical":
            return sorted(items)
        return sorted(items, key=int, reverse=variant == "descending")

    def grade(self, task: Task, response: str) -> float:
        lists = re.findall(r"\[([^\[\]]*)\]", response)
        lines = [ln.strip() for ln in response.splitlines() if ln.strip() and not ln.strip().endswith(":")]
        if lists:
            got = self._items(lists[-1])
        elif len(lines) > 1:  # one item per line, as a numbered or bulleted list: the order is what counts
            got = self._items(",".join(_BULLET_RE.sub("", ln).rstrip(".") for ln in lines))
        else:  # a bare comma-separated answer, possibly after a lead-in ending in ':'
            tail = response.rsplit(":", 1)[-1].strip().rstrip(".")
            got = self._items(re.sub(r",?\s+and\s+", ", ", tail))
        return cap_verbose(FULL, response) if got == task.answer else WRONG

    def _show(self, items: list[str], rng: random.Random) -> str:
        return rng.choice(["[" + ", ".join(items) + "]", ", ".join(items)])

    def good(self, task: Task, rng: random.Random) -> str:
        shown = "[" + ", ".join(task.answer) + "]"
        return rng.choice([shown, f"Here is the result: {shown}", f"{shown}.", f"The answer is {shown}."])

    def bad(self, task: Task, rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(["unchanged", "wrong_op", "swap", "dropped", "rambling", "empty", "refusal"])
        generic = self._generic_bad(kind, rng)
        if generic is not None:
            return kind, generic
        items = self._items(task.slots["items"])
        if kind == "unchanged":  # ignored the instruction and echoed the input
            got = items
        elif kind == "wrong_op":  # reversed when asked to sort, or sorted when asked to reverse
            got = items[::-1] if task.variant != "reverse" else sorted(items)
        elif kind == "swap":  # nearly right: two neighbours swapped
            got = list(task.answer)
            i = rng.randrange(len(got) - 1)
            got[i], got[i + 1] = got[i + 1], got[i]
        elif kind == "dropped":
            got = list(task.answer)
            del got[rng.randrange(len(got))]
        else:
            return kind, ramble(rng, "I hope this helps you think about the list.")
        if got == task.answer:  # e.g. an already-sorted input: fall back to a clear miss
            got = task.answer[:-1]
        return kind, "[" + ", ".join(got) + "]"


class UpperCase(Family):
    name = "uppercase"
    templates = [
        Template('Rewrite this sentence in upper case: "{sentence}"', "id", "upper"),
        Template('Write the following in all capital letters: "{sentence}"', "id", "upper"),
        Template('Convert to uppercase: "{sentence}"', "id", "upper"),
        Template('Repeat this sentence using only capital letters: "{sentence}"', "id", "upper"),
        Template('Shout this sentence back at me in capitals: "{sentence}"', "ood", "upper"),
        Template('Transform the text that follows so that every letter is upper case: "{sentence}"', "ood", "upper"),
    ]

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        return {"sentence": make_sentence(rng, template.split == "ood")}

    def solve(self, variant: str, slots: dict[str, str]) -> str:
        return slots["sentence"].upper()

    def grade(self, task: Task, response: str) -> float:
        target = task.answer.split()
        got = re.findall(r"[A-Za-z']+", response)
        best = WRONG
        # the target may sit after a short lead-in ("Sure: ...") and may be quoted or end with a period
        for i in range(len(got) - len(target) + 1):
            window = got[i : i + len(target)]
            if [w.upper() for w in window] == target:
                best = max(best, FULL if all(w.isupper() for w in window) else CONSTRAINT_IGNORED)
        extra = len(words_of(response)) - len(target)
        return min(best, FORMAT_SLIP) if extra > 8 or len(words_of(response)) > MAX_WORDS else best

    def good(self, task: Task, rng: random.Random) -> str:
        s = task.answer
        return rng.choice([s, f"{s}.", f'"{s}"', f"Here it is: {s}"])

    def bad(self, task: Task, rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(["ignored_constraint", "title_case", "dropped_word", "rambling", "empty", "refusal"])
        generic = self._generic_bad(kind, rng)
        if generic is not None:
            return kind, generic
        sentence = task.slots["sentence"]
        if kind == "ignored_constraint":
            return kind, sentence[:1].upper() + sentence[1:] + "."
        if kind == "title_case":
            return kind, sentence.title()
        if kind == "dropped_word":
            words = task.answer.split()
            del words[rng.randrange(1, len(words))]
            return kind, " ".join(words)
        return kind, ramble(rng, "Capital letters are used for emphasis.")


def _stem(topic: str) -> str:
    """'cities' -> 'city', 'cats' -> 'cat': the topic counts as mentioned in the singular or the plural."""
    if topic.endswith("ies"):
        return topic[:-3] + "y"
    return topic[:-1] if topic.endswith("s") and not topic.endswith("ss") else topic


class ExactWords(Family):
    name = "exact_words"
    templates = [
        Template("Write a sentence about {topic} in exactly {n} words.", "id", "exact"),
        Template("Describe {topic} using exactly {n} words.", "id", "exact"),
        Template("In exactly {n} words, tell me about {topic}.", "id", "exact"),
        Template("Give me a {n}-word sentence about {topic}.", "id", "exact"),
        Template("Compose one sentence of precisely {n} words on the subject of {topic}.", "ood", "exact"),
        Template("Using no more and no fewer than {n} words, say something about {topic}.", "ood", "exact"),
    ]
    _STARTERS = ["I find {t}", "Many people find {t}", "I would call {t}", "My friends find {t}", "People call {t}"]

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        n = rng.randint(11, 16) if template.split == "ood" else rng.randint(4, 10)
        return {"topic": rng.choice(TOPICS), "n": n}

    def solve(self, variant: str, slots: dict[str, str]) -> tuple[int, str]:
        return int(slots["n"]), slots["topic"].lower()

    def grade(self, task: Task, response: str) -> float:
        # the constraint applies to the whole reply, so no lead-in is forgiven here
        n, topic = task.answer
        if len(words_of(response)) != n:
            return WRONG
        text = response.lower()
        return FULL if topic in text or _stem(topic) in text else FORMAT_SLIP

    def write(self, topic: str, n: int, rng: random.Random) -> str:
        starters = [s for s in self._STARTERS if len(s.split()) <= n - 1]
        words = rng.choice(starters).format(t=topic).split()
        rest = n - len(words)
        if rest == 2:
            adjs = ["very", rng.choice(DESCRIPTORS)]
        else:
            picked = rng.sample(DESCRIPTORS, rest if rest == 1 else rest - 1)
            adjs = [picked[0]] if rest == 1 else [w + "," for w in picked[:-2]] + [picked[-2], "and", picked[-1]]
        return " ".join(words + adjs) + "."

    def good(self, task: Task, rng: random.Random) -> str:
        n, topic = task.answer
        return self.write(topic, n, rng)

    def bad(self, task: Task, rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(["off_by_one", "off_by_one", "off_topic", "rambling", "empty", "refusal"])
        generic = self._generic_bad(kind, rng)
        if generic is not None:
            return kind, generic
        n, topic = task.answer
        if kind == "off_by_one":
            # one word short or long (never below the shortest sentence `write` can make)
            return kind, self.write(topic, n + (1 if n <= 4 else rng.choice([-1, 1])), rng)
        if kind == "off_topic":
            other = rng.choice([t for t in TOPICS if topic not in t and _stem(topic) not in t])
            return kind, self.write(other, n, rng)
        return kind, ramble(rng, f"Anyway, {topic} is nice.")


_JSON_FRAMES_ID = [
    'Reply with a JSON object with the key "{key}" set to {q}.',
    'Answer in JSON, using the key "{key}" for {q}.',
    'Return JSON where "{key}" holds {q}.',
]
_JSON_FRAMES_OOD = [
    'Produce a JSON object. Its only field, "{key}", must contain {q}.',
    'Format your reply as JSON: put {q} under "{key}".',
]
_JSON_QUESTIONS = {
    "sum": ("the sum of {a} and {b}", "id"),
    "length": ('the number of letters in the word "{word}"', "id"),
    "product": ("the product of {a} and {b}", "ood"),
    "largest": ("the largest number in [{items}]", "ood"),
}
JSON_KEYS_ID = ["answer", "result", "value", "total", "count"]
JSON_KEYS_OOD = ["output", "solution", "final_answer"]


def _json_templates() -> list[Template]:
    out = []
    for split, frames in (("id", _JSON_FRAMES_ID), ("ood", _JSON_FRAMES_OOD)):
        for frame in frames:
            for variant, (q, q_split) in _JSON_QUESTIONS.items():
                if split == "id" and q_split == "ood":
                    continue  # held-out questions appear only out of distribution
                out.append(Template(frame.replace("{q}", q), split, variant))
    return out


class JsonKey(Family):
    name = "json"
    templates = _json_templates()

    def sample_slots(self, rng: random.Random, template: Template) -> dict[str, Any]:
        hard = template.split == "ood"
        slots: dict[str, Any] = {"key": rng.choice(JSON_KEYS_OOD if hard else JSON_KEYS_ID)}
        if template.variant in ("sum", "product"):
            hi = 99 if hard else 30
            slots.update(a=rng.randint(2, hi), b=rng.randint(2, hi if template.variant == "sum" else 19))
        elif template.variant == "length":
            slots["word"] = rng.choice(LETTER_WORDS_OOD if hard else LETTER_WORDS_ID)
        else:
            slots["items"] = ", ".join(str(x) for x in _int_list(rng, rng.randint(4, 7), -20, 200))
        return slots

    def solve(self, variant: str, slots: dict[str, str]) -> tuple[str, int]:
        if variant == "sum":
            value = int(slots["a"]) + int(slots["b"])
        elif variant == "product":
            value = int(slots["a"]) * int(slots["b"])
        elif variant == "length":
            value = len(slots["word"])
        else:
            value = max(int(x) for x in slots["items"].split(","))
        return slots["key"].lower(), value

    @staticmethod
    def _find_object(response: str) -> dict | None:
        start, end = response.find("{"), response.rfind("}")
        if start < 0 or end < start:
            return None
        try:
            obj = json.loads(response[start : end + 1])
        except json.JSONDecodeError:
            return None
        return obj if isinstance(obj, dict) else None

    @staticmethod
    def _matches(value: Any, expected: int) -> bool:
        if isinstance(value, bool):
            return False
        if isinstance(value, int | float):
            return value == expected
        if isinstance(value, str):
            return extract_number(value) == expected
        return False

    def grade(self, task: Task, response: str) -> float:
        key, expected = task.answer
        obj = self._find_object(response)
        if obj is not None:
            if key in obj and self._matches(obj[key], expected):
                return cap_verbose(FULL, response)
            # right value under another key (or only one value at all): the format asked for is missed
            if any(self._matches(v, expected) for v in obj.values()):
                return cap_verbose(FORMAT_SLIP, response)
            return WRONG
        return FORMAT_SLIP if extract_number(response) == expected and len(words_of(response)) <= MAX_WORDS else WRONG

    def good(self, task: Task, rng: random.Random) -> str:
        key, value = task.answer
        obj = json.dumps({key: value})
        return rng.choice([obj, f"Here is the JSON: {obj}", f"```json\n{obj}\n```", f"Sure! {obj}"])

    def bad(self, task: Task, rng: random.Random) -> tuple[str, str]:
        kind = rng.choice(["wrong_format", "wrong_key", "python_dict", "off_by_one", "rambling", "empty"])
        generic = self._generic_bad(kind, rng)
        if generic is not None:
            return kind, generic
        key, value = task.answer
        if kind == "wrong_format":  # the right value, but not as JSON
            return kind, rng.choice([str(value), f"The answer is {value}."])
        if kind == "wrong_key":
            other = rng.choice([k for k in JSON_KEYS_ID + JSON_KEYS_OOD if k != key])
            return kind, json.dumps({other: value})
        if kind == "python_dict":
            return kind, "{'" + key + "': " + str(value) + "}"
        if kind == "off_by_one":
            return kind, json.dumps({key: value + rng.choice([-1, 1])})
        return kind, ramble(rng, f"The value you want is probably {value + 1}.")


FAMILIES: dict[str, Family] = {
    f.name: f for f in (Arithmetic(), Counting(), Units(), ListOps(), UpperCase(), ExactWords(), JsonKey())
}
