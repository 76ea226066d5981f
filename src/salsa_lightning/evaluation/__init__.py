"""Evaluation (paper §4, DESIGN §5): pairwise win rates of systems on evaluation prompts, plus per-system
means (gold score, reward, length, KL to references) and the reward distributions of two systems.

    python -m salsa_lightning evaluate --config configs/quickstart/eval.yaml

- `stats`: `win_rate`, `adjusted_win_rate`, `bootstrap_interval` — pure functions, as in the paper's tables;
- `generation`: batched greedy generation and log-probs of stored responses;
- `prompts`: each benchmark's prompt column read into turns; later turns built from a system's own answers;
- `kl`: per-response KL of a policy to a reference on the policy's own responses;
- `report`: Rich / CSV / Markdown tables and the distribution plot;
- `llm_judge`: the `llm` judge — pairwise verdicts from a chat model over an OpenAI-compatible endpoint;
- `checks`: everything checked before a model is loaded; `splits`: each split's prompts, loaded and checked;
- `responses`: each system's responses, generated or reused, and their files; `scoring`: KL, reward, gold score;
- `judging`: each pair judged by each judge into win-rate records; `runtime`: device, model loading, progress bar
  and model signatures, shared with the landscape;
- `run`: `run_evaluate(EvalConfig)`, the stage itself.
"""

from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.stats import adjusted_win_rate, bootstrap_interval, count_verdicts, win_rate

__all__ = ["EvalConfig", "adjusted_win_rate", "bootstrap_interval", "count_verdicts", "win_rate"]
