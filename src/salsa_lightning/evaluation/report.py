"""The evaluation's tables (Rich, CSV, Markdown) and the reward-distribution plot (paper Fig. 3).

Inputs are the plain records `run_evaluate` puts in results.json:

- a pair record: {judge, split, a, b, wins, losses, ties, n, win_rate, win_rate_ci, adjusted_win_rate,
  adjusted_win_rate_ci}, and for the llm judge {unparseable, failed}: prompts left out of n (the rates and
  intervals None when n = 0);
- a system record: {system, split, n, gold_score, reward, length, finished, kl: {reference: value}}.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

PAIR_COLUMNS = [
    "judge", "split", "system_a", "system_b", "wins", "losses", "ties", "n",
    "win_rate", "win_rate_lo", "win_rate_hi", "adjusted_win_rate", "adjusted_win_rate_lo", "adjusted_win_rate_hi",
    "unparseable", "failed",
]  # fmt: skip


def _splits(records: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(r["split"] for r in records))


def _pairs(records: Sequence[dict[str, Any]]) -> list[tuple[str, str]]:
    return list(dict.fromkeys((r["a"], r["b"]) for r in records))


def _ci(ci: Sequence[float] | None) -> str:
    return "–" if ci is None else f"[{ci[0]:.1f}, {ci[1]:.1f}]"  # None: no usable verdict (n = 0)


def _rate(r: dict[str, Any], key: str) -> str:
    """A rate with its interval, or a dash where there is none (the llm judge's n = 0)."""
    return "–" if r[key] is None else f"{r[key]:.2f} {_ci(r[key + '_ci'])}"


def _csv_rate(r: dict[str, Any], key: str) -> list[str]:
    """A rate and its interval's ends as CSV cells (empty where n = 0)."""
    if r[key] is None:
        return ["", "", ""]
    return [f"{r[key]:.4f}", f"{r[key + '_ci'][0]:.4f}", f"{r[key + '_ci'][1]:.4f}"]


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def write_win_rates_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(PAIR_COLUMNS)
        for r in records:
            w.writerow([
                r["judge"], r["split"], r["a"], r["b"], r["wins"], r["losses"], r["ties"], r["n"],
                *_csv_rate(r, "win_rate"), *_csv_rate(r, "adjusted_win_rate"),
                r.get("unparseable", ""), r.get("failed", ""),
            ])  # fmt: skip


def win_rates_markdown(
    records: Sequence[dict[str, Any]], confidence: float = 0.95, notes: dict[str, str] | None = None
) -> str:
    """One table per judge in the layout of the paper's Tables 2–4, transposed to one row per pair: for each
    split, Win / Loss / Tie, Win Rate and Adj. Win Rate (×100), each rate with its bootstrap interval; for a
    judge whose records count prompts left out (the llm judge), Unparseable and Failed too. `notes`: judge ->
    a line printed under its table."""
    lines = []
    for judge in dict.fromkeys(r["judge"] for r in records):
        rows = [r for r in records if r["judge"] == judge]
        splits = _splits(rows)
        left_out = any("unparseable" in r for r in rows)
        lines.append(f"### Judge: {judge}\n")
        header = ["Comparison"]
        for s in splits:
            header += [f"{s} Win", f"{s} Loss", f"{s} Tie", f"{s} Win Rate", f"{s} Adj. Win Rate"]
            header += [f"{s} Unparseable", f"{s} Failed"] if left_out else []
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|---|" + "---:|" * (len(header) - 1))
        by_key = {(r["a"], r["b"], r["split"]): r for r in rows}
        for a, b in _pairs(rows):
            cells = [f"{a} vs {b}"]
            for s in splits:
                r = by_key[(a, b, s)]
                cells += [
                    str(r["wins"]),
                    str(r["losses"]),
                    str(r["ties"]),
                    _rate(r, "win_rate"),
                    _rate(r, "adjusted_win_rate"),
                ]
                cells += [str(r.get("unparseable", 0)), str(r.get("failed", 0))] if left_out else []
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
        if notes and judge in notes:
            lines += [notes[judge], ""]
    lines.append(
        f"Rates are ×100 from the first system's side; [lo, hi] is a {confidence:.0%} bootstrap interval over prompts. "
        "Adj. Win Rate = (wins + ties/2) / n."
    )
    return "\n".join(lines) + "\n"


def win_rates_table(records: Sequence[dict[str, Any]]) -> Table:
    """One row per judge, pair and split (narrow enough for an 80-column terminal; the Markdown has the paper's
    wide layout)."""
    table = Table(title="Pairwise win rates (×100, first system's side)")
    table.add_column("judge")
    table.add_column("comparison", no_wrap=True)
    table.add_column("split")
    table.add_column("W/L/T", justify="right")
    table.add_column("win rate", justify="right")
    table.add_column("adj. win rate", justify="right")
    table.add_column("95% CI", justify="right", no_wrap=True)
    left_out = any("unparseable" in r for r in records)
    if left_out:
        table.add_column("unparsed/failed", justify="right")
    for r in records:
        table.add_row(
            r["judge"],
            f"{r['a']} vs {r['b']}",
            r["split"],
            f"{r['wins']}/{r['losses']}/{r['ties']}",
            _fmt(r["win_rate"], 2),
            f"[bold]{_fmt(r['adjusted_win_rate'], 2)}[/]",
            _ci(r["adjusted_win_rate_ci"]),
            *([f"{r['unparseable']}/{r['failed']}" if "unparseable" in r else ""] if left_out else []),
        )
    return table


def _kl_names(records: Sequence[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(k for r in records for k in r.get("kl", {})))


def _system_rows(records: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    kls = _kl_names(records)
    header = ["system", "split", "n", "gold_score", "reward", "length", "finished", *(f"kl_{k}" for k in kls)]
    rows = []
    for r in records:
        rows.append([
            r["system"], r["split"], str(r["n"]), _fmt(r.get("gold_score")), _fmt(r.get("reward")),
            _fmt(r["length"], 1), _fmt(r["finished"], 2), *(_fmt(r.get("kl", {}).get(k)) for k in kls),
        ])  # fmt: skip
    return header, rows


def write_systems_csv(path: Path, records: Sequence[dict[str, Any]]) -> None:
    kls = _kl_names(records)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["system", "split", "n", "gold_score", "reward", "length", "finished", *(f"kl_{k}" for k in kls)])
        for r in records:
            raw = [
                r.get("gold_score"),
                r.get("reward"),
                r["length"],
                r["finished"],
                *(r.get("kl", {}).get(k) for k in kls),
            ]
            w.writerow([r["system"], r["split"], r["n"], *("" if x is None else f"{x:.6g}" for x in raw)])


def systems_markdown(records: Sequence[dict[str, Any]]) -> str:
    header, rows = _system_rows(records)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    lines.append("")
    lines.append(
        "gold_score: mean gold-judge score in [0, 1]; reward: mean raw reward; length: mean response tokens; "
        "finished: share of responses that ended with an end-of-turn token; kl_<ref>: mean over prompts of "
        "Σ_t log π(y_t) - log π_ref(y_t) on the system's own responses."
    )
    return "\n".join(lines) + "\n"


def systems_table(records: Sequence[dict[str, Any]]) -> Table:
    header, rows = _system_rows(records)
    table = Table(title="Systems (means over prompts)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for row in rows:
        table.add_row(*row)
    return table


def _smooth_density(x: np.ndarray, grid: np.ndarray) -> np.ndarray | None:
    """A Gaussian kernel density estimate on `grid` (Silverman's bandwidth); None when `x` is constant."""
    std = float(x.std(ddof=1)) if x.size > 1 else 0.0
    if std <= 0:
        return None
    bw = 1.06 * std * x.size ** (-1 / 5)
    z = (grid[:, None] - x[None, :]) / bw  # (G, n)
    return np.exp(-0.5 * z**2).sum(axis=1) / (x.size * bw * np.sqrt(2 * np.pi))  # (G,)


def plot_distributions(
    path: Path, values: dict[str, dict[str, Sequence[float]]], quantity: str, title: str | None = None
) -> None:
    """Overlaid histograms and smoothed densities of `quantity` for two (or more) systems, one panel per split.

    `values`: split -> system -> one number per prompt. Each system's mean is drawn as a dashed line
    and given in the legend, as in the paper's Fig. 3.
    """
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    splits = list(values)
    fig, axes = plt.subplots(1, len(splits), figsize=(5.5 * len(splits), 4), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, split in zip(axes[0], splits, strict=True):
        data = {name: np.asarray(v, dtype=np.float64) for name, v in values[split].items()}
        all_x = np.concatenate(list(data.values()))
        lo, hi = float(all_x.min()), float(all_x.max())
        pad = 0.1 * (hi - lo) or 0.5
        grid = np.linspace(lo - pad, hi + pad, 200)
        bins = np.linspace(lo - pad, hi + pad, 21)
        for k, (name, x) in enumerate(data.items()):
            color = colors[k % len(colors)]
            ax.hist(x, bins=bins, density=True, alpha=0.35, color=color, label=f"{name} (mean {x.mean():.3g})")
            density = _smooth_density(x, grid)
            if density is not None:
                ax.plot(grid, density, color=color, lw=2)
            ax.axvline(x.mean(), color=color, ls="--", lw=1.5)
        ax.set_title(split)
        ax.set_xlabel(quantity)
        ax.set_ylabel("density")
        ax.legend(fontsize="small")
    fig.suptitle(title or f"{quantity} distribution: " + " vs ".join(next(iter(values.values()))))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
