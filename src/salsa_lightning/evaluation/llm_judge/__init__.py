"""The `llm` judge of `evaluate`: pairwise verdicts from a chat model behind an OpenAI-compatible HTTP endpoint.

Every comparison is asked twice, with the two responses in both orders (A = system a's, then A = system b's).
When the two answers agree they are the verdict; when they disagree the comparison is a tie, which cancels
the judge's position bias (the protocol of the SALSA paper, §4). A reply with no readable verdict makes the
comparison `unparseable` and a request that still fails after its retries makes it `failed`: neither is ever
turned into a tie; both are counted and left out of the win rates' n.

Each reply is cached in the output's judgements.jsonl under a hash of everything that decides it (the
question, the two responses in their order, the judge model, the template text, temperature, max_tokens),
so re-judging into the same output (`overwrite: true`) only asks what is new.

- `spec`: `LLMJudgeSpec`, the `llm_judge` config block;
- `template`: the pairwise prompt and what the judge is shown of one comparison;
- `verdicts`: a reply's verdict, the two orders combined, the replies left out;
- `cache`: the key of each reply and the cache read back from judgements.jsonl;
- `client`: `LLMJudge`, the pre-flight and the requests (thread pool, retries, back-off, usage).
"""

from salsa_lightning.evaluation.llm_judge.cache import read_cache, reply_key
from salsa_lightning.evaluation.llm_judge.client import JudgeUsage, LLMJudge
from salsa_lightning.evaluation.llm_judge.spec import LLMJudgeSpec
from salsa_lightning.evaluation.llm_judge.template import (
    DEFAULT_TEMPLATE,
    LATER_TURN_NOTE,
    PLACEHOLDERS,
    Comparison,
    PairwiseTemplate,
    comparison,
    load_template,
    question_text,
)
from salsa_lightning.evaluation.llm_judge.verdicts import (
    Choice,
    PairJudgement,
    Reply,
    combine_orders,
    combine_replies,
    parse_verdict,
    split_verdicts,
)

__all__ = [
    "DEFAULT_TEMPLATE",
    "LATER_TURN_NOTE",
    "PLACEHOLDERS",
    "Choice",
    "Comparison",
    "JudgeUsage",
    "LLMJudge",
    "LLMJudgeSpec",
    "PairJudgement",
    "PairwiseTemplate",
    "Reply",
    "combine_orders",
    "combine_replies",
    "comparison",
    "load_template",
    "parse_verdict",
    "question_text",
    "read_cache",
    "reply_key",
    "split_verdicts",
]
