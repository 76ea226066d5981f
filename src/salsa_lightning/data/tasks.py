"""The built-in task suite: SFT, preference, RL and evaluation data with a gold judge, written from a seed.

`generate_task_suite(TaskSuiteConfig(...))` writes, in the formats of the real datasets:

| file | rows | format of |
|---|---|---|
| `sft.jsonl` | `{"messages": [user, assistant], "family"}` | HuggingFaceH4/ultrachat_200k |
| `prefs_train.jsonl`, `prefs_test.jsonl` | `{"prompt", "chosen", "rejected", "family", "label_flipped"}` | HuggingFaceH4/ultrafeedback_binarized (string variant) |
| `rl_prompts.jsonl` | `{"prompt", "family"}` | RL prompts |
| `eval_id.jsonl`, `eval_ood.jsonl` | `{"prompt", "family", "split"}` | in- / out-of-distribution evaluation |
| `manifest.json` | seed, the content-defining config, row counts per family and file, sha256 of each file | |

Every prompt is unique across all files, so the in-distribution eval is on unseen instances, and the
out-of-distribution eval uses only templates (phrasings, harder ranges, held-out variants) that no
training file uses. Each file draws from its own random stream (`Random("salsa-tasks:{seed}:{file}")`),
so changing one count leaves the other files' prompts as they were; the same seed gives byte-identical
files wherever they are written.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from salsa_lightning.data.families import FAMILIES, Family, Task
from salsa_lightning.data.judge import parse_prompt
from salsa_lightning.errors import SalsaError
from salsa_lightning.stage import atomic_output_dir, check_output_dir, sha256_file

MANIFEST_FILE = "manifest.json"
FORMAT_VERSION = 1
_MILD_FLAWS = ("off_by_one", "slip", "swap", "dropped", "wrong_op", "title_case", "ignored_constraint", "wrong_format")


@dataclass
class TaskSuiteConfig:
    """Where and how to write the built-in task suite (`python -m salsa_lightning data --config ...`)."""

    output_dir: str = "outputs/quickstart/data"
    """Directory to create; it must not exist unless `overwrite` is set."""
    seed: int = 0
    """Seed of every random choice: the same seed writes byte-identical files."""
    num_sft: int = 192
    """Number of SFT conversations (sft.jsonl)."""
    num_prefs_train: int = 192
    """Number of training preference pairs (prefs_train.jsonl)."""
    num_prefs_test: int = 64
    """Number of held-out preference pairs (prefs_test.jsonl)."""
    num_rl_prompts: int = 128
    """Number of RL prompts (rl_prompts.jsonl)."""
    num_eval: int = 64
    """Number of evaluation prompts in EACH split (eval_id.jsonl, eval_ood.jsonl)."""
    imperfect_fraction: float = 0.1
    """Fraction of SFT responses that are plausibly flawed (off by one, wrong format...), as real SFT data is."""
    label_noise: float = 0.25
    """Fraction of preference pairs whose chosen/rejected are swapped (real preference data agrees ~70-75%)."""
    overwrite: bool = False
    """Replace `output_dir` if it exists."""


def _validate(cfg: TaskSuiteConfig) -> None:
    for name in ("num_sft", "num_prefs_train", "num_prefs_test", "num_rl_prompts", "num_eval"):
        value = getattr(cfg, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise SalsaError(f"{name} must be a non-negative integer, got {value!r}; set it to a count such as 100.")
    if not 0.0 <= cfg.imperfect_fraction <= 1.0:
        raise SalsaError(f"imperfect_fraction must be in [0, 1], got {cfg.imperfect_fraction}; use e.g. 0.1.")
    if not 0.0 <= cfg.label_noise <= 0.5:
        raise SalsaError(
            f"label_noise must be in [0, 0.5], got {cfg.label_noise}; above 0.5 the labels would mostly be inverted "
            "(use e.g. 0.25)."
        )


def _draw_tasks(rng: random.Random, split: str, n: int, used: set[str]) -> list[Task]:
    """n tasks of `split`, balanced over families, with prompts not in `used` (which is updated)."""
    families = list(FAMILIES.values())
    tasks = []
    for i in range(n):
        family = families[i % len(families)]
        tasks.append(_draw_one(rng, family, split, used))
    rng.shuffle(tasks)
    return tasks


def _draw_one(rng: random.Random, family: Family, split: str, used: set[str], tries: int = 500) -> Task:
    templates = [t for t in family.templates if t.split == split]
    for _ in range(tries):
        template = rng.choice(templates)
        prompt = template.render(family.sample_slots(rng, template))
        if prompt in used:
            continue
        task = parse_prompt(prompt)
        if task.family != family.name or task.split != split:  # a template clash would silently mislabel data
            raise RuntimeError(f"prompt {prompt!r} of {family.name}/{split} parses as {task.family}/{task.split}")
        used.add(prompt)
        return task
    raise SalsaError(
        f"Could not draw another distinct '{family.name}' prompt for the {split} split after {tries} tries; "
        "lower the counts in the task suite config."
    )


def _pick(rng: random.Random, n: int, fraction: float) -> set[int]:
    # an exact count (not a coin per row) so the file has exactly the configured rate
    return set(rng.sample(range(n), round(fraction * n)))


def _worse_response(family: Family, task: Task, rng: random.Random, than: float, mild: bool = False) -> str:
    for _ in range(100):
        kind, text = family.bad(task, rng)
        if mild and kind not in _MILD_FLAWS:
            continue
        if family.grade(task, text) < than:
            return text
    raise RuntimeError(f"no worse response found for {task.prompt!r}")  # a bug in a family's `bad`


def _sft_rows(rng: random.Random, tasks: list[Task], imperfect_fraction: float) -> list[dict[str, Any]]:
    flawed = _pick(rng, len(tasks), imperfect_fraction)
    rows = []
    for i, task in enumerate(tasks):
        family = FAMILIES[task.family]
        reply = _worse_response(family, task, rng, than=1.0, mild=True) if i in flawed else family.good(task, rng)
        messages = [{"role": "user", "content": task.prompt}, {"role": "assistant", "content": reply}]
        rows.append({"messages": messages, "family": task.family})
    return rows


def _pref_rows(rng: random.Random, tasks: list[Task], label_noise: float) -> list[dict[str, Any]]:
    flipped = _pick(rng, len(tasks), label_noise)
    rows = []
    for i, task in enumerate(tasks):
        family = FAMILIES[task.family]
        chosen = family.good(task, rng)
        rejected = _worse_response(family, task, rng, than=family.grade(task, chosen))
        if i in flipped:
            chosen, rejected = rejected, chosen
        rows.append(
            {
                "prompt": task.prompt,
                "chosen": chosen,
                "rejected": rejected,
                "family": task.family,
                "label_flipped": i in flipped,
            }
        )
    return rows


def build_task_suite(cfg: TaskSuiteConfig) -> dict[str, list[dict[str, Any]]]:
    """The suite's rows in memory, file name -> rows (what `generate_task_suite` writes)."""
    _validate(cfg)

    def stream(name: str) -> random.Random:
        return random.Random(f"salsa-tasks:{cfg.seed}:{name}")

    used: set[str] = set()
    # evaluation first, so its prompts depend only on the seed and num_eval, never on the training counts
    eval_ood = _draw_tasks(stream("eval_ood"), "ood", cfg.num_eval, used)
    eval_id = _draw_tasks(stream("eval_id"), "id", cfg.num_eval, used)
    rl = _draw_tasks(stream("rl_prompts"), "id", cfg.num_rl_prompts, used)
    prefs_test = _draw_tasks(stream("prefs_test"), "id", cfg.num_prefs_test, used)
    prefs_train = _draw_tasks(stream("prefs_train"), "id", cfg.num_prefs_train, used)
    sft = _draw_tasks(stream("sft"), "id", cfg.num_sft, used)

    def eval_rows(tasks: list[Task]) -> list[dict[str, Any]]:
        return [{"prompt": t.prompt, "family": t.family, "split": t.split} for t in tasks]

    return {
        "sft.jsonl": _sft_rows(stream("sft/responses"), sft, cfg.imperfect_fraction),
        "prefs_train.jsonl": _pref_rows(stream("prefs_train/responses"), prefs_train, cfg.label_noise),
        "prefs_test.jsonl": _pref_rows(stream("prefs_test/responses"), prefs_test, cfg.label_noise),
        "rl_prompts.jsonl": [{"prompt": t.prompt, "family": t.family} for t in rl],
        "eval_id.jsonl": eval_rows(eval_id),
        "eval_ood.jsonl": eval_rows(eval_ood),
    }


def _family_counts(rows: list[dict[str, Any]]) -> dict[str, int]:
    counts = dict.fromkeys(FAMILIES, 0)
    for row in rows:
        counts[row["family"]] += 1
    return counts


def generate_task_suite(cfg: TaskSuiteConfig) -> dict[str, Any]:
    """Write the suite to `cfg.output_dir` (whole or not at all) and return its manifest."""
    check_output_dir(cfg.output_dir, cfg.overwrite)  # before any work
    files = build_task_suite(cfg)
    # where it is written and whether it replaced something do not change the content, so they stay out
    # of the manifest: the same seed then gives byte-identical directories
    content_config = {k: v for k, v in asdict(cfg).items() if k not in ("output_dir", "overwrite")}
    with atomic_output_dir(cfg.output_dir, cfg.overwrite) as tmp:
        for name, rows in files.items():
            with open(tmp / name, "w", encoding="utf-8", newline="\n") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False) + "\n")
        manifest = {
            "format_version": FORMAT_VERSION,
            "seed": cfg.seed,
            "config": content_config,
            "families": list(FAMILIES),
            "splits": {"id": [name for name in files if name != "eval_ood.jsonl"], "ood": ["eval_ood.jsonl"]},
            "files": {
                name: {"rows": len(rows), "per_family": _family_counts(rows), "sha256": sha256_file(tmp / name)}
                for name, rows in files.items()
            },
            "label_flipped": {
                name: sum(r["label_flipped"] for r in rows) for name, rows in files.items() if name.startswith("prefs")
            },
        }
        (tmp / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return manifest


def run_data(cfg: TaskSuiteConfig) -> None:
    """The `data` subcommand: write the task suite and print a summary table."""
    from rich.console import Console
    from rich.table import Table

    manifest = generate_task_suite(cfg)
    files = manifest["files"]
    # families as rows and files as columns: seven narrow columns fit an 80-column terminal
    table = Table(title=f"Task suite (seed {cfg.seed}) written to {Path(cfg.output_dir)}")
    table.add_column("family", no_wrap=True)
    for name in files:
        table.add_column(name.removesuffix(".jsonl").replace("_", " "), justify="right")
    for family in manifest["families"]:
        table.add_row(family, *(str(info["per_family"][family]) for info in files.values()))
    table.add_row("total", *(str(info["rows"]) for info in files.values()), style="bold")
    console = Console()
    console.print(table)
    flipped = ", ".join(f"{k.removesuffix('.jsonl')} {v}" for k, v in manifest["label_flipped"].items())
    console.print(
        f"Preference label noise {cfg.label_noise:.0%} (pairs swapped: {flipped}); "
        f"imperfect SFT responses {cfg.imperfect_fraction:.0%}."
    )
