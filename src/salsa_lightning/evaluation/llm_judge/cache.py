"""The llm judge's cache: each reply is kept in the output's judgements.jsonl under a hash of everything that
decides it (the question, the two responses in their order, the judge model, the template text, temperature,
max_tokens), so re-judging into the same output (`overwrite: true`) only asks what is new."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from salsa_lightning.evaluation.llm_judge.spec import LLMJudgeSpec


def reply_key(spec: LLMJudgeSpec, template_text: str, question: str, answer_a: str, answer_b: str) -> str:
    """The cache key of one request: answer_a shown as A, answer_b as B, asked of `spec.model` with the template
    whose whole file text is `template_text`."""
    content = {
        "model": spec.model,
        "template": template_text,
        "temperature": spec.temperature,
        "max_tokens": spec.max_tokens,
        "question": question,
        "answer_a": answer_a,
        "answer_b": answer_b,
    }
    return hashlib.sha256(json.dumps(content, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


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
