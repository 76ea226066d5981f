"""The landscape's numbers (per-point records, the soup report) as CSV / JSON / Markdown / Rich, and its two plots:
the line `(1 - α)θ₁ + αθ₂` and the heat map of the plane of three seeds (paper Fig. 2), one panel per score: the
gold score, the reward, the llm judge's win rate against its reference point (`llm_win_vs_seed1`), and KL."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from rich.table import Table

from salsa_lightning.evaluation.stats import VERDICTS, bootstrap_interval, verdict_points
from salsa_lightning.landscape.grid import VERTICES, outside, to_xy

QUANTITIES = ("gold", "reward")
LLM_PREFIX = "llm_win_vs_"
TITLES = {"gold": "gold score", "reward": "reward", "kl_seed1": "KL(point ‖ seed 1)", "kl_soup": "KL(point ‖ soup)"}
LLM_OUTCOMES = ("win", "tie", "loss", "unparseable", "failed")


def llm_quantity(reference: str) -> str:
    """The llm judge's score against `reference` (`llm_win_vs_seed1`): the mean of win 1 / tie ½ / loss 0."""
    return LLM_PREFIX + reference


def title(q: str) -> str:
    if q.startswith(LLM_PREFIX):
        return f"llm win rate vs {q.removeprefix(LLM_PREFIX).replace('seed', 'seed ')} (tie ½)"
    return TITLES[q]


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if len(xs) else float("nan")  # as evaluate's means


def point_record(run, samples: int, seed: int, llm_reference: str | None = None) -> dict[str, Any]:
    """One point's means (with 95% bootstrap intervals over prompts for the scores) from its per-prompt values; with
    llm verdicts (`run.llm`), their mean against `llm_reference` over the prompts with a usable verdict (None if
    none had one) and every outcome counted (`llm_verdicts`)."""
    p = run.point
    rec: dict[str, Any] = {
        "weights": list(p.weights),
        "alpha": p.alpha,
        "on_plane": p.on_plane,
        "label": p.label,
        "outside": outside(p.weights),
        "n": len(run.texts),
        "length": _mean([float(len(t)) for t in run.token_ids]),
        "finished": _mean([float(f) for f in run.finished]),
        "kl": {ref: _mean(v) for ref, v in run.kl.items()},
        "reused": run.reused,
        "key": run.key,
    }
    for q in QUANTITIES:
        values = getattr(run, q)
        rec[q] = None if values is None else _mean(values)
        rec[f"{q}_ci"] = None if values is None else list(bootstrap_interval(values, samples, seed))
    if run.llm is not None:
        q = llm_quantity(llm_reference)
        judged = verdict_points([v for v in run.llm if v in VERDICTS], tie_value=0.5)  # (k,) k usable of n prompts
        rec[q] = float(judged.mean()) if judged.size else None
        rec[f"{q}_ci"] = list(bootstrap_interval(judged, samples, seed)) if judged.size else None
        rec["llm_verdicts"] = {v: run.llm.count(v) for v in LLM_OUTCOMES}
    if len(p.weights) == 3:
        rec["xy"] = list(to_xy(p.weights))
    return rec


def soup_report(records: Sequence[dict[str, Any]], n: int) -> list[dict[str, Any]]:
    """Each seed and the uniform soup: mean scores, KL(soup ‖ seed) on the soup's responses, KL(seed ‖ soup)."""
    by = {r["label"]: r for r in records if r["label"]}
    soup = by["soup"]
    rows = []
    for label in [*(f"seed{i + 1}" for i in range(n)), "soup"]:
        r = by[label]
        rows.append({
            "model": label, "weights": r["weights"],
            **{k: r[k] for q in (*QUANTITIES, *_llm(records)) for k in (q, f"{q}_ci")},
            "kl_soup_seed": soup["kl"].get(label) if label != "soup" else None,
            "kl_seed_soup": r["kl"]["soup"] if label != "soup" else None,
            "length": r["length"],
        })  # fmt: skip
    return rows


def _llm(records: Sequence[dict[str, Any]]) -> list[str]:
    return [k for k in (records[0] if records else {}) if k.startswith(LLM_PREFIX) and not k.endswith("_ci")]


def _present(records: Sequence[dict[str, Any]]) -> list[str]:
    """The scores the records (or soup rows) hold, in column order: gold, reward, the llm judge's."""
    return [q for q in QUANTITIES if records and records[0][q] is not None] + _llm(records)


def _ci(r: dict[str, Any], q: str) -> tuple[Any, Any]:
    return tuple(r[f"{q}_ci"] or (None, None))  # no interval: the llm judge had no usable verdict on this point


def _cell(x: Any, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}g}" if isinstance(x, float) else str(x)


def write_points_csv(path: Path, records: Sequence[dict[str, Any]], n: int) -> None:
    qs = _present(records)
    refs = list(dict.fromkeys(k for r in records for k in r["kl"]))
    header = [*(f"w{i + 1}" for i in range(n)), "alpha", "on_plane", "label", "outside", "x", "y", "n"]
    header += [c for q in qs for c in (q, f"{q}_lo", f"{q}_hi")] + [f"kl_{k}" for k in refs]
    llm = bool(_llm(records))
    header += ["length", "finished", "reused"] + (["llm_unparseable", "llm_failed"] if llm else [])
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        for r in records:
            xy = r.get("xy") or [None, None]
            row = [*r["weights"], r["alpha"], r["on_plane"], r["label"], r["outside"], *xy, r["n"]]
            row += [v for q in qs for v in (r[q], *_ci(r, q))] + [r["kl"].get(k) for k in refs]
            row += [r["length"], r["finished"], r["reused"]]
            row += [r["llm_verdicts"][k] for k in ("unparseable", "failed")] if llm else []
            w.writerow([_cell(x, 8) for x in row])


def _soup_rows(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    qs = _present(rows)
    header = ["model", "weights", *(f"{q} [95% CI]" for q in qs), "KL(soup‖·)", "KL(·‖soup)"]
    out = []
    for r in rows:
        cells = [r["model"], ", ".join(f"{w:.2g}" for w in r["weights"])]
        for q in qs:
            lo, hi = _ci(r, q)
            cells.append("–" if r[q] is None else f"{r[q]:.3f} [{lo:.3f}, {hi:.3f}]")
        cells += [_cell(r["kl_soup_seed"]) or "–", _cell(r["kl_seed_soup"]) or "–"]
        out.append(cells + [f"{r['length']:.1f}"])
    return header + ["length"], out


def soup_markdown(rows: Sequence[dict[str, Any]]) -> str:
    header, body = _soup_rows(rows)
    lines = ["| " + " | ".join(header) + " |", "|---|---|" + "---:|" * (len(header) - 2)]
    lines += ["| " + " | ".join(c) + " |" for c in body]
    lines += ["", "KL(soup‖·): mean over prompts of Σ_t log π_soup(y_t) - log π_model(y_t) on the soup's (row "
              "`soup`) responses; KL(·‖soup): the same on the model's own responses. Intervals: bootstrap over prompts."]  # fmt: skip
    return "\n".join(lines) + "\n"


def soup_table(rows: Sequence[dict[str, Any]]) -> Table:
    """The soup report as printed by `soup` (with `report:`) and `landscape`: one row per seed and the soup."""
    header, body = _soup_rows(rows)
    table = Table(title="Soup report (means over the eval prompts, bootstrap 95% intervals)")
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i < 2 else "right")
    for cells in body:
        table.add_row(*cells)
    return table


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers or CI
    import matplotlib.pyplot as plt

    return plt


def _values(records: Sequence[dict[str, Any]], q: str) -> np.ndarray:
    """(P,) the score `q` of each record, NaN where there is none (a point without a usable llm verdict)."""
    return np.array([np.nan if r[q] is None else r[q] for r in records], dtype=float)


def plot_line(path: Path, records: Sequence[dict[str, Any]], n: int) -> None:
    """Mean score (with its interval band) and KL against α; the seeds at α = 0 and 1, the soup marked."""
    plt = _pyplot()
    line = sorted((r for r in records if r["alpha"] is not None), key=lambda r: r["alpha"])
    soup = next(r for r in records if r["label"] == "soup")
    panels = [*_present(records), "kl"]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.8), squeeze=False)
    a = np.array([r["alpha"] for r in line])
    for ax, q in zip(axes[0], panels, strict=True):
        ax.axvspan(min(a.min(), 0.0), 0.0, color="0.92", zorder=0)  # beyond the seeds: extrapolation
        ax.axvspan(1.0, max(a.max(), 1.0), color="0.92", zorder=0)
        if q == "kl":
            for ref in ("seed1", "soup"):
                ax.plot(a, [r["kl"][ref] for r in line], "o-", ms=3, label=title(f"kl_{ref}"))
            ax.set_ylabel("KL (nats, summed over tokens)")
        else:
            y = _values(line, q)
            lo, hi = np.array([_ci(r, q) for r in line], dtype=float).T  # NaN: no usable llm verdict there
            ax.fill_between(a, lo, hi, alpha=0.25)
            ax.plot(a, y, "o-", ms=3, label=f"mean {title(q)} (95% CI)")
            for r, v in zip(line, y, strict=True):
                if r["label"] in ("seed1", "seed2"):
                    ax.plot(r["alpha"], v, "s", color="C3", ms=8, zorder=3)
                    ax.annotate(r["label"].replace("seed", "seed "), (r["alpha"], v), textcoords="offset points",
                                xytext=(0, 8), ha="center")  # fmt: skip
            if q.startswith(LLM_PREFIX):
                ax.axhline(0.5, color="0.4", ls=":", lw=1)  # as good as the reference
            if soup[q] is not None and n == 2:  # None: the soup had no usable llm verdict
                ax.plot(0.5, soup[q], "*", color="C2", ms=14, zorder=4, label="uniform soup")
            elif soup[q] is not None:
                ax.axhline(soup[q], color="C2", ls="--", lw=1, label="uniform soup of 3 seeds")
            ax.set_ylabel(title(q))
        ax.set_xlabel("α   ((1 - α)·θ₁ + α·θ₂)")
        ax.legend(fontsize="small")
    fig.suptitle("Along the line between seed 1 and seed 2 (grey: beyond the seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_plane(path: Path, records: Sequence[dict[str, Any]]) -> None:
    """Heat maps over the plane of three seeds (barycentric -> Cartesian), the triangle and the seeds drawn."""
    from matplotlib.tri import Triangulation

    plt = _pyplot()
    plane = [r for r in records if r["on_plane"]]
    soup = next(r for r in records if r["label"] == "soup")
    panels = [*_present(records), "kl_soup"]
    x, y = np.array([r["xy"][0] for r in plane]), np.array([r["xy"][1] for r in plane])
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.4), squeeze=False)
    for ax, q in zip(axes[0], panels, strict=True):
        values = np.array([r["kl"]["soup"] for r in plane]) if q == "kl_soup" else _values(plane, q)
        keep = np.isfinite(values)  # a point without a usable llm verdict is left out of the mesh
        if keep.sum() >= 3:
            mesh = ax.tripcolor(Triangulation(x[keep], y[keep]), values[keep], shading="gouraud", cmap="viridis")
            fig.colorbar(mesh, ax=ax, shrink=0.8, label=title(q))
        ax.plot(x, y, ".", color="white", ms=2, alpha=0.6)
        corners = np.array([*VERTICES, VERTICES[0]])
        ax.plot(corners[:, 0], corners[:, 1], "-", color="white", lw=1.5)
        for i, (vx, vy) in enumerate(VERTICES):
            ax.plot(vx, vy, "s", color="C3", ms=8, mec="white")
            ax.annotate(f"seed {i + 1}", (vx, vy), textcoords="offset points", xytext=(0, -14 if vy == 0 else 8),
                        ha="center", color="black")  # fmt: skip
        ax.plot(*soup["xy"], "*", color="C1", ms=14, mec="white", label="uniform soup")
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(title(q))
        ax.legend(fontsize="small", loc="upper right")
    fig.suptitle("Over the plane of three seeds (barycentric; outside the triangle: extrapolation)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


SOUP_REPORT_FILES = ("soup_report.csv", "soup_report.json", "soup_report.md")


def write_soup_report(directory: Path, soup_rows, n: int, about: dict[str, Any]) -> list[str]:
    """soup_report.csv/.json/.md (the same files in a landscape's and a soup's output); `about` (prompts, judges,
    generation settings) goes into the JSON beside the rows."""
    with open(directory / "soup_report.csv", "w", newline="") as f:
        w = csv.writer(f)
        keys = ["model", *(f"w{i + 1}" for i in range(n)), *_present(soup_rows)]
        keys += ["kl_soup_seed", "kl_seed_soup", "length"]
        w.writerow(keys)
        for r in soup_rows:
            w.writerow([r["model"], *r["weights"], *(_cell(r[k], 8) for k in keys[n + 1 :])])
    (directory / "soup_report.json").write_text(json.dumps({"rows": list(soup_rows), **about}, indent=2) + "\n")
    (directory / "soup_report.md").write_text(soup_markdown(soup_rows))
    return list(SOUP_REPORT_FILES)


def write_outputs(tmp: Path, records, soup_rows, n: int, line: bool, plane: bool, about: dict[str, Any]) -> list[str]:
    """points.csv, soup_report.csv/.json/.md, and line.png / plane.png for the grids that were asked for."""
    write_points_csv(tmp / "points.csv", records, n)
    files = ["points.csv", *write_soup_report(tmp, soup_rows, n, about)]
    if line:
        plot_line(tmp / "line.png", records, n)
        files.append("line.png")
    if plane:
        plot_plane(tmp / "plane.png", records)
        files.append("plane.png")
    return files
