"""How much a group estimator can learn from a policy on the task suite, before any RL: per family, the greedy gold
score, the mean gold score of `n` samples per prompt, pass@n (a sample scores > 0), full@n (a sample scores 1.0) and
the fraction of prompts whose `n` samples do not all score the same — the groups that carry a GRPO/RLOO gradient
(`model.ppo.filter_groups` keeps exactly these). A family with full@n = 0 cannot be learned by sampling: no rollout
ever shows the policy the answer it would be rewarded for.

    python benchmarks/rl_signal.py                                   # the quickstart's SFT seed 1, eval_id, n 8, T 0.7
    python benchmarks/rl_signal.py --policy outputs/quickstart/soup --n 16 --temperature 1.0
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
QS = ROOT / "outputs" / "quickstart"


def family_table(families: list[str], greedy: list[float], sampled: list[list[float]]) -> list[dict]:
    """One row per family (and `all`): the statistics above from per-prompt greedy scores and sample scores."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(families):
        by[f].append(i)
    rows = []
    for name, idx in [*sorted(by.items()), ("all", list(range(len(families))))]:
        groups = [sampled[i] for i in idx]
        rows.append({
            "family": name, "prompts": len(idx),
            "greedy": sum(greedy[i] for i in idx) / len(idx),
            "sampled": sum(sum(g) / len(g) for g in groups) / len(idx),
            "pass": sum(max(g) > 0 for g in groups) / len(idx),
            "full": sum(max(g) >= 1.0 for g in groups) / len(idx),
            "signal": sum(len(set(g)) > 1 for g in groups) / len(idx),
        })  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default=str(QS / "sft-seed1"))
    ap.add_argument("--eval-file", default=str(QS / "data" / "eval_id.jsonl"))
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (x n rows when sampling)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None, help="also write the table and every sample here (JSON)")
    args = ap.parse_args()

    from salsa_lightning.data import judge
    from salsa_lightning.data.prompts import prompt_messages
    from salsa_lightning.data.sources import load_rows
    from salsa_lightning.evaluation.generation import encode_prompts, generate_responses
    from salsa_lightning.evaluation.runtime import load_frozen_lm
    from salsa_lightning.models.loading import load_tokenizer
    from salsa_lightning.models.spec import ModelSpec

    rows = [dict(r) for r in load_rows(args.eval_file, split="test")]
    messages = [prompt_messages(r, i) for i, r in enumerate(rows)]
    families = [judge.parse_prompt(m[-1]["content"]).family for m in messages]
    tokenizer = load_tokenizer(ModelSpec(args.policy), padding_side="left")
    model = load_frozen_lm(args.policy, "float32")
    ids, _ = encode_prompts(tokenizer, messages, 512)
    greedy = generate_responses(model, tokenizer, ids, args.max_new_tokens, args.batch_size)
    torch.manual_seed(args.seed)
    repeated = [p for p in ids for _ in range(args.n)]
    samples = generate_responses(model, tokenizer, repeated, args.max_new_tokens, args.batch_size * args.n, True,
                                 args.temperature)  # fmt: skip
    g = judge.gold_reward(messages, [x.text for x in greedy])
    s = judge.gold_reward([m for m in messages for _ in range(args.n)], [x.text for x in samples])
    table = family_table(families, g, [s[i * args.n : (i + 1) * args.n] for i in range(len(messages))])
    print(f"{args.policy} on {args.eval_file}: greedy vs {args.n} samples at T={args.temperature}, "
          f"<= {args.max_new_tokens} new tokens")  # fmt: skip
    print(f"| family | prompts | greedy | sampled | pass@{args.n} | full@{args.n} | groups with signal |")
    print("|---|---|---|---|---|---|---|")
    for r in table:
        print(f"| {r['family']} | {r['prompts']} | {r['greedy']:.3f} | {r['sampled']:.3f} | {r['pass']:.2f} | "
              f"{r['full']:.2f} | {r['signal']:.2f} |")  # fmt: skip
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        dump = {"args": {k: str(v) for k, v in vars(args).items()}, "table": table, "greedy": [x.text for x in greedy],
                "samples": [x.text for x in samples], "greedy_gold": g, "sample_gold": s}  # fmt: skip
        args.out.write_text(json.dumps(dump, indent=1))


if __name__ == "__main__":
    main()
