"""The `landscape` stage: the grids as pure functions, and the stage on tiny full-weight and LoRA seeds — every file
written, the grid's seed points reproduce the seeds' own scores, bad grids refused, the cache reused; and the llm
judge over the landscape against the scripted endpoint of `llm_judge_server` (the real client, real sockets)."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl
from landscape_helpers import GEN, direct_scores, save_lora_seed, save_reward_model
from llm_judge_server import KEY_ENV, Answer, by_hash, shown, spec

from salsa_lightning.cli import cli_main, main
from salsa_lightning.data.tasks import TaskSuiteConfig, build_task_suite
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.llm_judge import LLMJudgeSpec, read_cache
from salsa_lightning.landscape import points as points_module
from salsa_lightning.landscape.config import LandscapeConfig, LineGrid, PlaneGrid
from salsa_lightning.landscape.grid import (
    VERTICES,
    alpha_grid,
    barycentric_grid,
    grid_divisions,
    landscape_points,
    line_weights,
    outside,
    to_xy,
)
from salsa_lightning.landscape.run import run_landscape
from salsa_lightning.stage import read_manifest

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- the grids (pure functions)
def test_alpha_grid_hand_cases():
    assert alpha_grid(-0.5, 1.5, 9) == [-0.5, -0.25, 0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5]
    assert alpha_grid(0.0, 1.0, 11)[3] == 0.3  # rounded: not 0.30000000000000004, so it meets `line.alphas: [0.3]`
    assert alpha_grid(0.2, 0.9, 1) == [0.2] and alpha_grid(0.0, 1.0, 0) == []
    assert line_weights(0.25, 2) == (0.75, 0.25) and line_weights(1.5, 3) == (-0.5, 1.5, 0.0)
    assert line_weights(0.0, 2) == (1.0, 0.0) and str(line_weights(1.0, 2)[0]) == "0.0"  # no -0.0


def test_grid_divisions_needs_a_whole_number_of_steps():
    assert grid_divisions(0.25) == 4 and grid_divisions(0.1) == 10 and grid_divisions(1.0) == 1
    assert grid_divisions(0.3) is None and grid_divisions(0.0) is None and grid_divisions(-0.5) is None


@pytest.mark.parametrize("d, reach", [(1, 0), (2, 0), (4, 0), (2, 1), (4, 2), (3, 1)])
def test_barycentric_grid_equals_a_naive_loop(d, reach):
    naive = set()
    for k1, k2, k3 in itertools.product(range(-reach, d + 2 * reach + 1), repeat=3):
        if k1 + k2 + k3 == d:
            naive.add(tuple(float(Fraction(k, d)) for k in (k1, k2, k3)))
    grid = barycentric_grid(d, reach)
    assert len(grid) == len(set(grid)) == len(naive) == (d + 3 * reach + 1) * (d + 3 * reach + 2) // 2
    assert {tuple(round(w, 9) for w in p) for p in grid} == {tuple(round(w, 9) for w in p) for p in naive}
    assert all(abs(sum(p) - 1) < 1e-9 for p in grid)
    assert {(1.0, 0.0, 0.0), (0.0, 1.0, 0.0), (0.0, 0.0, 1.0)} <= set(grid)  # the seeds are grid points
    assert any(outside(p) for p in grid) == (reach > 0)


def test_to_xy_puts_the_seeds_on_the_corners_and_the_soup_in_the_middle():
    for i, v in enumerate(VERTICES):
        assert to_xy([1.0 if j == i else 0.0 for j in range(3)]) == pytest.approx(v)
    assert to_xy([1 / 3] * 3) == pytest.approx((0.5, math.sqrt(3) / 6))
    assert to_xy([0.5, 0.5, 0.0]) == pytest.approx((0.5, 0.0))


def test_points_are_merged_and_labelled():
    points = landscape_points(3, LineGrid(-0.5, 1.5, 5), PlaneGrid(step=0.5, margin=0.5), extrapolate=True)
    by = {p.weights: p for p in points}
    assert len(by) == len(points) == 22  # 21 plane points (d=2, one ring outside) hold the line; plus the soup
    seed1 = by[(1.0, 0.0, 0.0)]
    assert (seed1.alpha, seed1.on_plane, seed1.label) == (0.0, True, "seed1")
    assert by[(0.0, 1.0, 0.0)].alpha == 1.0 and by[(0.0, 0.0, 1.0)].label == "seed3"
    assert by[(-0.5, 1.5, 0.0)].alpha == 1.5
    soup = next(p for p in points if p.label == "soup")
    assert soup.weights == pytest.approx((1 / 3,) * 3) and not soup.on_plane and soup.alpha is None
    two = landscape_points(2, LineGrid(0, 1, 3), None, extrapolate=False)
    assert [(p.weights, p.label) for p in two] == [((1.0, 0.0), "seed1"), ((0.5, 0.5), "soup"), ((0.0, 1.0), "seed2")]


@pytest.mark.parametrize(
    "n, line, plane, match",
    [
        (2, LineGrid(-0.5, 1.5, 5), None, r"beyond \[0, 1\].*extrapolate: true"),
        (2, LineGrid(0, 1, 2, alphas=[1.25]), None, r"α=1.25.*beyond \[0, 1\].*extrapolate: true"),
        (3, None, PlaneGrid(0.5, margin=0.5), r"outside the triangle.*extrapolate: true"),
        (3, None, PlaneGrid(0.5, points=[[1.5, -0.25, -0.25]]), r"plane.points\[0\].*outside.*extrapolate: true"),
        (3, None, PlaneGrid(0.5, points=[[0.5, 0.5, 0.5]]), r"plane.points\[0\].*sum to 1.5, not 1"),
        (3, None, PlaneGrid(0.5, points=[[0.5, 0.5]]), r"three, one per seed"),
        (3, None, PlaneGrid(0.3), r"plane.step 0.3 does not divide 1"),
        (2, None, PlaneGrid(0.5), r"needs three seeds"),
        (4, LineGrid(), None, r"two seeds .* or three"),
        (2, LineGrid(0, 1, 0), None, r"line has no points"),
    ],
)
def test_bad_grids_are_refused_in_one_sentence(n, line, plane, match):
    with pytest.raises(SalsaError, match=match):
        landscape_points(n, line, plane, extrapolate=False)


def test_weights_not_summing_to_one_are_refused_even_when_extrapolating():
    with pytest.raises(SalsaError, match="not 1"):
        landscape_points(3, None, PlaneGrid(0.5, points=[[2.0, 0.0, 0.0]]), extrapolate=True)


# ---------------------------------------------------------------- tiny seeds
@pytest.fixture(scope="module")
def inputs(tmp_path_factory, tiny_model_dir, tiny_tokenizer):
    from salsa_lightning.models.tiny import save_tiny_checkpoint

    root = tmp_path_factory.mktemp("landscape-inputs")
    suite = build_task_suite(TaskSuiteConfig(num_sft=0, num_prefs_train=0, num_prefs_test=0, num_rl_prompts=0,
                                             num_eval=5))  # fmt: skip
    return {
        "full": [str(save_tiny_checkpoint(root / f"full-seed{s}", seed=s)) for s in (1, 2, 3)],
        "lora": [str(save_lora_seed(root / f"lora-seed{s}", tiny_model_dir, s, tiny_tokenizer, r=s + 1)) for s in (1, 2, 3)],
        "rm": str(save_reward_model(root / "rm", tiny_tokenizer)),
        "eval": str(write_jsonl(root / "eval_id.jsonl", suite["eval_id.jsonl"])),
    }  # fmt: skip


def config(inputs: dict, kind: str, out: Path, **overrides) -> LandscapeConfig:
    kwargs = {
        "seeds": inputs[kind],
        "line": LineGrid(-0.5, 1.5, 5),
        "plane": PlaneGrid(step=0.5, margin=0.5),
        "extrapolate": True,
        "eval_file": inputs["eval"],
        "limit": 3,
        "judges": ["gold", "reward"],
        "reward_model": inputs["rm"],
        "bootstrap_samples": 100,
        "output_dir": str(out),
        **GEN,
        **overrides,
    }
    return LandscapeConfig(**kwargs)


def responses(out: Path, record: dict) -> list[dict]:
    return json.loads((out / "responses" / f"{record['key']}.json").read_text())["rows"]


@pytest.fixture(scope="module", params=["full", "lora"])
def landscape(request, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp(f"landscape-{request.param}") / "out"
    results = run_landscape(config(inputs, request.param, out), quiet=True)
    return request.param, out, results


def test_writes_every_file(landscape):
    _, out, results = landscape
    files = ["points.csv", "points.json", "line.png", "plane.png", "config.yaml"]
    files += ["soup_report.csv", "soup_report.json", "soup_report.md"]
    for name in [*files, "salsa_manifest.json"]:
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for png in ("line.png", "plane.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = read_manifest(out)
    assert manifest["stage"] == "landscape" and sorted(p.name for p in out.iterdir()) == manifest["files"]
    assert manifest["points"] == manifest["generated_points"] == 22 and manifest["reused_points"] == 0
    assert sorted(manifest["responses"]) == sorted(f"responses/{p.name}" for p in (out / "responses").iterdir())
    rows = list(csv.DictReader(open(out / "points.csv")))
    assert len(rows) == len(results["points"]) == 22
    assert {"w1", "w2", "w3", "alpha", "gold", "gold_lo", "reward_hi", "kl_seed1", "kl_soup"} <= set(rows[0])
    for r in results["points"]:
        assert r["reward_ci"][0] <= r["reward"] <= r["reward_ci"][1]
        assert len(responses(out, r)) == r["n"] == 3
    assert yaml.safe_load((out / "config.yaml").read_text())["plane"] == {"step": 0.5, "margin": 0.5, "points": []}


def test_seed_points_reproduce_the_seeds(landscape, inputs):
    """α = 0 and α = 1, and the plane's corners, are the seeds themselves: same responses, same scores."""
    kind, out, results = landscape
    by = {r["label"]: r for r in results["points"] if r["label"]}
    assert (by["seed1"]["alpha"], by["seed2"]["alpha"]) == (0.0, 1.0)
    own = []
    for i, seed in enumerate(inputs[kind]):
        record = by[f"seed{i + 1}"]
        assert record["on_plane"] and record["xy"] == pytest.approx(VERTICES[i])
        ids, golds, rewards = direct_scores(seed, inputs["eval"], inputs["rm"])
        assert [r["response_ids"] for r in responses(out, record)] == ids
        assert record["gold"] == sum(golds) / 3 and record["reward"] == sum(rewards) / 3
        own.append(ids)
    assert own[0] != own[1] != own[2] != own[0]  # the seeds answer differently: the match above is not by chance
    if kind == "full":  # the same weights in both passes: exactly 0
        assert by["seed1"]["kl"]["seed1"] == 0.0 and by["soup"]["kl"]["soup"] == 0.0
    assert by["seed1"]["kl"]["seed1"] == pytest.approx(0.0, abs=1e-4)
    assert by["seed2"]["kl"]["seed1"] != pytest.approx(0.0, abs=1e-4)


def test_soup_report_has_every_seed_and_the_soup(landscape):
    _, out, results = landscape
    rows = results["soup_report"]
    assert [r["model"] for r in rows] == ["seed1", "seed2", "seed3", "soup"]
    soup = next(r for r in results["points"] if r["label"] == "soup")
    for i, r in enumerate(rows[:3]):
        assert r["kl_soup_seed"] == soup["kl"][f"seed{i + 1}"]  # KL(soup ‖ seed i) on the soup's responses
    assert rows[3]["kl_soup_seed"] is None and rows[3]["reward"] == soup["reward"]
    md = (out / "soup_report.md").read_text()
    assert "KL(soup‖·)" in md and "| soup |" in md
    saved = json.loads((out / "soup_report.json").read_text())  # the same table as the soup command's report
    assert saved["rows"] == rows and saved["judges"] == ["gold", "reward"] and saved["prompts"]["n"] == 3


def test_rerun_reuses_the_cache_and_generates_nothing(landscape, inputs, monkeypatch):
    kind, out, first = landscape

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached point was generated again")

    monkeypatch.setattr(points_module, "generate_responses", no_generation)
    second = run_landscape(config(inputs, kind, out, overwrite=True), quiet=True)
    manifest = read_manifest(out)
    assert (manifest["generated_points"], manifest["reused_points"]) == (0, 22)
    assert all(r["reused"] for r in second["points"])
    strip = ("reused",)
    assert [{k: v for k, v in r.items() if k not in strip} for r in second["points"]] == [
        {k: v for k, v in r.items() if k not in strip} for r in first["points"]
    ]


def test_a_finer_grid_generates_only_the_new_points(inputs, tmp_path):
    cache = tmp_path / "cache"
    common = {"plane": None, "cache_dir": str(cache), "judges": ["gold"], "reward_model": None}
    run_landscape(config(inputs, "full", tmp_path / "coarse", line=LineGrid(-0.5, 1.5, 5), **common), quiet=True)
    assert read_manifest(tmp_path / "coarse")["generated_points"] == 7  # 5 on the line, seed 3, the soup of 3 seeds
    run_landscape(config(inputs, "full", tmp_path / "fine", line=LineGrid(-0.5, 1.5, 9), **common), quiet=True)
    manifest = read_manifest(tmp_path / "fine")
    assert (manifest["generated_points"], manifest["reused_points"]) == (4, 7)  # α = -0.25, 0.25, 0.75, 1.25 are new
    assert not (tmp_path / "fine" / "plane.png").exists() and (tmp_path / "fine" / "line.png").is_file()


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"extrapolate": False}, r"the line beyond \[0, 1\].*needs `extrapolate: true`"),
        ({"plane": PlaneGrid(0.5, points=[[0.2, 0.2, 0.2]])}, r"sum to 0.6, not 1"),
        ({"judges": ["reward"], "reward_model": None}, "needs a reward model"),
        ({"eval_file": "missing/eval.jsonl"}, r"eval_file: .*does not exist"),
        ({"seeds": ["./missing/seed1", "./missing/seed2"], "plane": None}, "does not exist"),
        ({"max_new_tokens": 0}, "max_new_tokens must be >= 1"),
    ],
)
def test_bad_input_is_refused_and_leaves_nothing(inputs, tmp_path, overrides, match):
    with pytest.raises(SalsaError, match=match):
        run_landscape(config(inputs, "full", tmp_path / "out", **overrides), quiet=True)
    assert list(tmp_path.iterdir()) == []


def test_cli_runs_the_command_from_yaml(inputs, tmp_path):
    cfg = {"seeds": inputs["full"][:2], "line": {"start": 0.0, "stop": 1.0, "num": 3}, "eval_file": inputs["eval"],
           "limit": 2, "bootstrap_samples": 20, "output_dir": str(tmp_path / "out"), **GEN}  # fmt: skip
    path = tmp_path / "landscape.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cli = cli_main(["landscape", "--config", str(path), "--line.num", "2"])
    assert [r["alpha"] for r in cli.result["points"]] == [0.0, 1.0, None]  # the soup of two is not on a 2-point line
    assert yaml.safe_load((tmp_path / "out" / "config.yaml").read_text())["line"]["num"] == 2


def test_quickstart_landscape_config_parses(capsys):
    with pytest.raises(SystemExit) as exc:
        cli_main(["landscape", "--config", str(ROOT / "configs/quickstart/landscape.yaml"), "--print_config"])
    assert exc.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert len(printed["seeds"]) == 3 and printed["extrapolate"] is True
    assert printed["line"]["start"] < 0 < 1 < printed["line"]["stop"] and printed["plane"]["margin"] > 0


def test_the_three_judged_stages_share_one_settings_dataclass():
    """evaluate, landscape and the soup report inherit their generation/judging fields from `JudgedGeneration`, and
    the landscape's and the soup report's fields keep the order users know (their YAML keys are unchanged)."""
    from dataclasses import fields

    from salsa_lightning.evaluation.config import EvalConfig
    from salsa_lightning.evaluation.settings import JudgedGeneration
    from salsa_lightning.soup.config import SoupReport

    shared = [f.name for f in fields(JudgedGeneration)]
    assert shared[:2] == ["limit", "judges"] and shared[-3:] == ["dtype", "backend", "vllm"]
    for cls in (EvalConfig, LandscapeConfig, SoupReport):
        assert issubclass(cls, JudgedGeneration)
    assert [f.name for f in fields(SoupReport)] == ["eval_file", *shared]
    landscape = [f.name for f in fields(LandscapeConfig)]
    assert landscape[: 5 + len(shared)] == ["seeds", "line", "plane", "extrapolate", "eval_file", *shared]
    head = ["systems", "pairs", "eval_files", "hub_splits", "prompt_columns"]
    assert [f.name for f in fields(EvalConfig)][:5] == head


# ---------------------------------------------------------------- the llm judge
def llm_config(inputs: dict, out: Path, server, template: str, **overrides) -> LandscapeConfig:
    """Three full-weight seeds, the line 0, ½, 1: five points (seed 1, the midpoint, seed 2, seed 3, the soup)."""
    kwargs = {"line": LineGrid(0.0, 1.0, 3), "plane": None, "judges": ["gold", "llm"], "reward_model": None,
              "llm_judge": spec(server, template), **overrides}  # fmt: skip
    return config(inputs, "full", out, **kwargs)


def hash_verdict(mine: str, reference: str) -> float:
    """What `by_hash` makes of a point's response against the reference's, as a point: win 1, tie ½, loss 0."""
    a, b = (hashlib.sha256(x.encode()).hexdigest() for x in (mine, reference))
    return 1.0 if a > b else 0.0 if a < b else 0.5


def test_llm_judge_scores_every_point_against_seed1(inputs, server_factory, template, tmp_path):
    server = server_factory(by_hash)
    out = tmp_path / "out"
    results = run_landscape(llm_config(inputs, out, server, template), quiet=True)

    by = {tuple(r["weights"]): r for r in results["points"]}
    assert len(by) == 5
    ref = next(r for r in results["points"] if r["label"] == "seed1")
    ref_texts = [row["response"] for row in responses(out, ref)]
    judgements = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert len(judgements) == 4 * 3 and all(len(j["orders"]) == 2 for j in judgements)
    assert ref["key"] not in {j["point"] for j in judgements}  # the reference is not compared with itself
    for r in results["points"]:
        if r is ref:
            continue
        expected = [hash_verdict(row["response"], t) for row, t in zip(responses(out, r), ref_texts, strict=True)]
        assert r["llm_win_vs_seed1"] == pytest.approx(sum(expected) / 3)
        lo, hi = r["llm_win_vs_seed1_ci"]
        assert lo <= r["llm_win_vs_seed1"] <= hi
        assert r["llm_verdicts"]["unparseable"] == r["llm_verdicts"]["failed"] == 0
        mine = [j["verdict"] for j in judgements if j["point"] == r["key"]]
        assert [{"win": 1.0, "loss": 0.0, "tie": 0.5}[v] for v in mine] == expected
    # the reference's own row: ½ by definition, three ties that cost no request
    assert ref["llm_win_vs_seed1"] == 0.5 and ref["llm_win_vs_seed1_ci"] == [0.5, 0.5]
    assert ref["llm_verdicts"] == {"win": 0, "tie": 3, "loss": 0, "unparseable": 0, "failed": 0}
    assert all(a in ref_texts or b in ref_texts for _, a, b in map(shown, server.bodies))  # always against seed 1

    rows = {row["label"] or row["alpha"]: row for row in csv.DictReader(open(out / "points.csv"))}
    assert {"llm_win_vs_seed1", "llm_win_vs_seed1_lo", "llm_win_vs_seed1_hi", "llm_unparseable"} <= set(rows["seed1"])
    assert float(rows["seed1"]["llm_win_vs_seed1"]) == 0.5 and rows["0.5"]["llm_unparseable"] == "0"
    assert [r["llm_win_vs_seed1"] for r in results["soup_report"]] == [
        by[tuple(r["weights"])]["llm_win_vs_seed1"] for r in results["soup_report"]
    ]
    assert "llm_win_vs_seed1 [95% CI]" in (out / "soup_report.md").read_text()
    manifest = read_manifest(out)
    assert "judgements.jsonl" in manifest["files"] and sorted(p.name for p in out.iterdir()) == manifest["files"]
    assert manifest["llm_judge"]["requests"] == len(server.bodies) == results["llm_judge"]["requests"] > 0
    assert results["llm_judge"]["reference"] == "seed1"
    assert "test-key" not in (out / "config.yaml").read_text()


def test_llm_verdicts_are_cached_so_a_rerun_asks_nothing(inputs, server_factory, template, tmp_path):
    server = server_factory(by_hash)
    cache = tmp_path / "cache"
    first = run_landscape(llm_config(inputs, tmp_path / "a", server, template, cache_dir=str(cache)), quiet=True)
    asked = len(server.bodies)
    assert asked > 0 and (cache / "judgements.jsonl").is_file()

    def scores(results: dict) -> list:
        return [(r["weights"], r["llm_win_vs_seed1"], r["llm_verdicts"]) for r in results["points"]]

    # the same output again (overwrite: its judgements.jsonl), and another output sharing the cache_dir
    again = run_landscape(llm_config(inputs, tmp_path / "a", server, template, overwrite=True), quiet=True)
    shared = run_landscape(llm_config(inputs, tmp_path / "b", server, template, cache_dir=str(cache)), quiet=True)
    assert len(server.bodies) == asked  # not one chat request more
    for results in (again, shared):
        assert scores(results) == scores(first)
        assert results["llm_judge"]["requests"] == 0 and results["llm_judge"]["cached_replies"] == asked
    lines = (cache / "judgements.jsonl").read_text().splitlines()
    assert len(lines) == 4 * 3  # the second run had nothing to add to the shared cache


def test_unparseable_replies_are_counted_never_tied(inputs, server_factory, template, tmp_path):
    """The judge answers garbage about the first prompt: each point's verdict there is unparseable, counted, and its
    mean is over the other two prompts; with `llm_reference: soup` the soup's own row is the ½ one."""
    from salsa_lightning.landscape.run import load_eval_prompts

    first_question = load_eval_prompts(inputs["eval"], 3, True).messages[0][-1]["content"]

    def script(body: dict, attempt: int) -> Answer:
        return Answer("Both have merits.") if shown(body)[0] == first_question else by_hash(body, attempt)

    server = server_factory(script)
    out = tmp_path / "out"
    results = run_landscape(llm_config(inputs, out, server, template, llm_reference="soup"), quiet=True)
    soup = next(r for r in results["points"] if r["label"] == "soup")
    soup_texts = [row["response"] for row in responses(out, soup)]
    assert soup["llm_win_vs_soup"] == 0.5 and "llm_win_vs_seed1" not in soup
    for r in results["points"]:
        if r is soup:
            continue
        assert r["llm_verdicts"]["unparseable"] == 1 and sum(r["llm_verdicts"].values()) == 3
        rest = [hash_verdict(row["response"], t) for row, t in zip(responses(out, r)[1:], soup_texts[1:], strict=True)]
        assert r["llm_win_vs_soup"] == pytest.approx(sum(rest) / 2)  # over the two usable prompts, not a tie
    judgements = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert {j["verdict"] for j in judgements if j["index"] == 0} == {"unparseable"}
    assert results["llm_judge"]["unparseable_replies"] == 4 * 2  # both orders of four points' first prompt
    assert all(row["llm_unparseable"] == ("0" if row["label"] == "soup" else "1")
               for row in csv.DictReader(open(out / "points.csv")))  # fmt: skip


def test_a_judge_that_never_answers_usably_still_writes_the_landscape(inputs, server_factory, template, tmp_path,
                                                                      capsys):  # fmt: skip
    """Prose for every request: one warning, every point but the reference without an llm score (never ½), the
    plots and the replies (the cache) written all the same."""
    server = server_factory(lambda body, attempt: Answer("The response of the first reply is better."))
    out = tmp_path / "out"
    results = run_landscape(llm_config(inputs, out, server, template), quiet=True)
    assert "no usable verdict for any point against seed1" in " ".join(capsys.readouterr().err.split())
    for r in results["points"]:
        if r["label"] == "seed1":
            continue  # the reference: a tie with itself by definition
        assert r["llm_win_vs_seed1"] is None and r["llm_verdicts"]["unparseable"] == 3
    assert {"line.png", "judgements.jsonl", "points.csv"} <= {f.name for f in out.iterdir()}
    assert read_cache(out / "judgements.jsonl")  # the prose replies, kept


def test_missing_llm_key_is_one_sentence_before_generation(inputs, server_factory, template, tmp_path, monkeypatch,
                                                           capsys):  # fmt: skip
    server = server_factory(by_hash)
    monkeypatch.delenv(KEY_ENV)

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before the llm judge's pre-flight")

    monkeypatch.setattr(points_module, "generate_responses", no_generation)
    cfg = {"seeds": inputs["full"][:2], "line": {"num": 2}, "eval_file": inputs["eval"], "limit": 2,
           "judges": ["gold", "llm"], "output_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache"),
           "llm_judge": {"model": "judge-model", "base_url": server.url, "api_key_env": KEY_ENV,
                         "template": template}}  # fmt: skip
    path = tmp_path / "landscape.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as exc:
        main(["landscape", "--config", str(path)])
    assert exc.value.code == 2
    err = " ".join(capsys.readouterr().err.split())
    assert f"error: The llm judge's API key variable {KEY_ENV} is not set;" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "cache").exists() and server.bodies == []


def test_llm_judge_mistakes_are_refused_before_any_work(inputs, tmp_path):
    with pytest.raises(SalsaError, match="The llm judge needs `llm_judge`"):
        run_landscape(config(inputs, "full", tmp_path / "out", judges=["gold", "llm"]), quiet=True)
    with pytest.raises(SalsaError, match="`llm_judge` is set but `llm` is not in `judges`"):
        run_landscape(config(inputs, "full", tmp_path / "out", llm_judge=LLMJudgeSpec(model="m")), quiet=True)
    two = {"seeds": inputs["full"][:2], "plane": None, "judges": ["llm"], "llm_judge": LLMJudgeSpec(model="m")}
    with pytest.raises(SalsaError, match=r"llm_reference seed3 is not a point .* use one of seed1, seed2, soup"):
        run_landscape(config(inputs, "full", tmp_path / "out", llm_reference="seed3", **two), quiet=True)
    assert list(tmp_path.iterdir()) == []
