"""The `llm` judge: the real `openai` client over real sockets against a scripted OpenAI-compatible server on
127.0.0.1 (`llm_judge_server`, started by the `server_factory` fixture). Both orders are asked and combined, disagreement is a
tie, replies are cached, 429 / 5xx / time-outs are retried, garbage is counted, and bad input is one sentence."""

from __future__ import annotations

import csv
import hashlib
import json
import socket
import time
from pathlib import Path

import pytest
import yaml
from helpers import write_jsonl
from llm_judge_server import KEY_ENV, MODEL, OTHER_MODEL, TEST_TEMPLATE, Answer, by_hash, prefers, shown, spec

from salsa_lightning.cli import cli_main
from salsa_lightning.data.tasks import TaskSuiteConfig, build_task_suite
from salsa_lightning.errors import SalsaError
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.llm_judge import (
    DEFAULT_TEMPLATE,
    Comparison,
    LLMJudge,
    LLMJudgeSpec,
    combine_orders,
    load_template,
    parse_verdict,
    read_cache,
)
from salsa_lightning.evaluation.run import run_evaluate
from salsa_lightning.models.tiny import save_tiny_checkpoint
from salsa_lightning.stage import read_manifest

GOOD_BAD = [Comparison("q1", "a good answer", "a bad answer"), Comparison("q2", "a bad answer", "a good answer")]


# ---------------------------------------------------------------- pure parts
@pytest.mark.parametrize(
    "reply, expected",
    [
        ("Both are fine, but A is more precise.\n[[A]]", "A"),
        ("[[B]]", "B"),
        ("They are equally good. [[C]]", "C"),
        ("Final decision: [[ A ]]", "A"),
        ("A mentions the unit. [[A]] ... again, [[A]]", "A"),
        ("My choice is [B].", "B"),
        ("Reasoning...\nFinal verdict: A", "A"),
        ("Reasoning...\n**Final Verdict:** B.", "B"),
        ("Reasoning...\nVerdict: tie", "C"),
        ("Reasoning...\nFinal verdict - [C]", "C"),
        # not read: prose, conflicting marks, a verdict line that is not the last line, lowercase brackets
        ("Assistant A is better.", None),
        ("[[A]] if A is better, [[B]] if B is better.", None),
        ("Final verdict: A\nbut maybe B after all", None),
        ("[[a]]", None),
        ("", None),
        (None, None),
    ],
)
def test_parse_verdict_accepts_clear_forms_only(reply, expected):
    assert parse_verdict(reply) == expected


@pytest.mark.parametrize(
    "first, second, expected",
    [
        ("A", "B", "win"),  # a's response preferred in both positions
        ("B", "A", "loss"),
        ("C", "C", "tie"),
        ("A", "A", "tie"),  # the judge always picks the first shown: position bias, cancelled
        ("B", "B", "tie"),
        ("A", "C", "tie"),
        ("A", None, None),
        (None, "B", None),
    ],
)
def test_combine_orders(first, second, expected):
    assert combine_orders(first, second) == expected


def test_shipped_template_renders_both_answers_and_is_package_data():
    t = load_template()
    assert Path(t.path) == DEFAULT_TEMPLATE.resolve()
    msgs = t.messages("What is 2+2?", "four {answer_b}", "5")
    assert [m["role"] for m in msgs] == ["system", "user"]
    user = msgs[1]["content"]
    assert "What is 2+2?" in user and user.index("four {answer_b}") < user.index("\n5\n")  # one substitution pass
    assert "[[A]]" in msgs[0]["content"] and "[[C]]" in msgs[0]["content"]
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"salsa_lightning.evaluation" = ["templates/*.yaml"]' in pyproject


@pytest.mark.parametrize(
    "overrides, match",
    [
        ({"model": ""}, "model is empty"),
        ({"base_url": "localhost:8000"}, "not an http"),
        ({"api_key_env": "sk-proj-0123456789abcdefghijklmnop"}, r"NAME of an environment variable .*, not a key"),
        ({"max_concurrency": 0}, "max_concurrency must be >= 1"),
        ({"max_retries": -1}, "max_retries must be >= 0"),
        ({"timeout_s": 0}, "timeout_s must be > 0"),
        ({"temperature": -0.5}, "temperature must be >= 0"),
        ({"template": "missing/template.yaml"}, "does not exist"),
    ],
)
def test_spec_refuses_bad_fields(overrides, match):
    kwargs = {"model": MODEL, **overrides}
    with pytest.raises(SalsaError, match=match):
        LLMJudgeSpec(**kwargs)


def test_template_without_a_placeholder_is_refused(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump({"user": "{question} {answer_a}"}))
    with pytest.raises(SalsaError, match=r"lacks \{answer_b\}"):
        LLMJudgeSpec(model=MODEL, template=str(path))


# ---------------------------------------------------------------- against the server
def test_both_orders_are_asked_and_combined(server_factory, template):
    server = server_factory(prefers("good"))
    judge = LLMJudge(spec(server, template))
    judged = judge.judge(GOOD_BAD)
    assert [j.verdict for j in judged] == ["win", "loss"]
    # each comparison was shown once each way round; the first order shows system a's response as A
    seen = {shown(b) for b in server.bodies}
    assert seen == {
        ("q1", "a good answer", "a bad answer"),
        ("q1", "a bad answer", "a good answer"),
        ("q2", "a bad answer", "a good answer"),
        ("q2", "a good answer", "a bad answer"),
    }
    assert [r.choice for r in judged[0].replies] == ["A", "B"]  # A-then-B flip: the same winner both times
    assert judged[0].orders()[0]["a_shown_as"] == "A" and judged[0].orders()[1]["a_shown_as"] == "B"
    assert all(b["model"] == MODEL and b["temperature"] == 0.0 for b in server.bodies)
    # tokens from response.usage: 11 prompt + 3 completion per request, 4 requests
    assert (judge.usage.requests, judge.usage.prompt_tokens, judge.usage.completion_tokens) == (4, 44, 12)


@pytest.mark.parametrize("always", ["A", "B"])
def test_a_judge_that_picks_one_position_gives_ties(server_factory, template, always):
    server = server_factory(lambda body, attempt: Answer(f"[[{always}]]"))
    judged = LLMJudge(spec(server, template)).judge(GOOD_BAD)
    assert [j.verdict for j in judged] == ["tie", "tie"]


def test_cached_verdicts_cost_no_requests(server_factory, template, tmp_path):
    server = server_factory(prefers("good"))
    judged = LLMJudge(spec(server, template)).judge(GOOD_BAD)
    records = [{"judge": "llm", "verdict": j.verdict, "orders": j.orders()} for j in judged]  # as evaluate writes them
    cache_file = write_jsonl(tmp_path / "judgements.jsonl", records)
    assert len(server.bodies) == 4

    again = LLMJudge(spec(server, template), cache=read_cache(cache_file))
    assert [j.verdict for j in again.judge(GOOD_BAD)] == ["win", "loss"]
    assert len(server.bodies) == 4 and again.usage.requests == 0 and again.usage.cached_replies == 4

    # another judge model, template text or temperature is another key: asked again
    changed = tmp_path / "changed.yaml"
    changed.write_text(yaml.safe_dump({**TEST_TEMPLATE, "system": "Judge very fairly."}))
    for overrides in ({"model": OTHER_MODEL}, {"template": str(changed)}, {"temperature": 0.5}):
        LLMJudge(spec(server, template, **overrides), cache=read_cache(cache_file)).judge(GOOD_BAD[:1])
    assert len(server.bodies) == 4 + 3 * 2


def test_rate_limit_then_success_is_retried(server_factory, template):
    good = prefers("good")
    server = server_factory(lambda body, attempt: Answer(status=429) if attempt == 0 else good(body, attempt))
    judge = LLMJudge(spec(server, template))
    assert [j.verdict for j in judge.judge(GOOD_BAD)] == ["win", "loss"]
    assert len(server.bodies) == 8 and judge.usage.retries == 4 and judge.usage.failed_replies == 0


def test_a_time_out_then_success_is_retried(server_factory, template):
    good = prefers("good")
    server = server_factory(lambda body, attempt: Answer("[[A]]", delay=1.0) if attempt == 0 else good(body, attempt))
    judge = LLMJudge(spec(server, template, timeout_s=0.3))
    start = time.monotonic()
    assert [j.verdict for j in judge.judge(GOOD_BAD[:1])] == ["win"]
    assert judge.usage.retries == 2 and time.monotonic() - start < 5


def test_server_errors_are_retried_and_then_counted_as_failed(server_factory, template):
    good = prefers("good")
    flaky = server_factory(lambda body, attempt: Answer(status=(500, 503)[attempt]) if attempt < 2 else good(body, 0))
    judge = LLMJudge(spec(flaky, template))
    assert [j.verdict for j in judge.judge(GOOD_BAD[:1])] == ["win"] and judge.usage.retries == 4

    down = server_factory(lambda body, attempt: Answer(status=502))
    judge = LLMJudge(spec(down, template, max_retries=2))
    judged = judge.judge(GOOD_BAD[:1])
    assert judged[0].verdict == "failed"  # never a tie
    assert len(down.bodies) == 6 and judge.usage.failed_replies == 2
    assert "HTTP 502" in judged[0].orders()[0]["error"] and judge.cache == {}  # a failure is not cached


def test_a_bad_request_is_not_retried(server_factory, template):
    server = server_factory(lambda body, attempt: Answer(status=400))
    judged = LLMJudge(spec(server, template)).judge(GOOD_BAD[:1])
    assert judged[0].verdict == "failed" and len(server.bodies) == 2


def test_garbage_and_malformed_replies_are_counted_as_unparseable(server_factory, template):
    def script(body: dict, attempt: int) -> Answer:
        q, _, _ = shown(body)
        if q == "q1":
            return Answer("Both have merits; it depends on the reader.")
        return Answer(raw=b'{"choices": [{"message": ')  # cut-off JSON

    server = server_factory(script)
    judge = LLMJudge(spec(server, template))
    judged = judge.judge(GOOD_BAD)
    assert [j.verdict for j in judged] == ["unparseable", "unparseable"]
    assert judge.usage.unparseable_replies == 4 and judge.usage.failed_replies == 0
    # the prose is cached (asking again at temperature 0 gives the same); the broken bodies are not
    assert {judged[0].replies[0].key, judged[0].replies[1].key} == set(judge.cache)
    # asked again from the cache: the same verdicts, and the cached prose still counts as unparseable
    again = LLMJudge(spec(server, template), cache=judge.cache)
    assert [j.verdict for j in again.judge(GOOD_BAD[:1])] == ["unparseable"]
    assert again.usage.cached_replies == 2 and again.usage.unparseable_replies == 2 and again.usage.requests == 0


def test_concurrency_is_bounded(server_factory, template):
    good = prefers("good")
    server = server_factory(lambda body, attempt: Answer(good(body, attempt).content, delay=0.1))
    many = [Comparison(f"q{i}", "good", "bad") for i in range(6)]
    judged = LLMJudge(spec(server, template, max_concurrency=2)).judge(many)
    assert [j.verdict for j in judged] == ["win"] * 6
    assert server.max_in_flight == 2 and len(server.bodies) == 12


def test_missing_key_variable_is_one_sentence_before_any_request(server_factory, template, monkeypatch):
    server = server_factory(prefers("good"))
    monkeypatch.delenv(KEY_ENV)
    with pytest.raises(SalsaError, match=f"{KEY_ENV} is not set"):
        LLMJudge(spec(server, template)).connect()
    assert server.bodies == []


def test_unreachable_endpoint_is_one_sentence(server_factory, template):
    server = server_factory(prefers("good"))
    with socket.socket() as s:  # a port that was free a moment ago and has nobody listening now
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    closed = LLMJudgeSpec(model=MODEL, base_url=f"http://127.0.0.1:{port}/v1", api_key_env=KEY_ENV, timeout_s=2)
    start = time.monotonic()
    with pytest.raises(SalsaError, match=r"Cannot reach the llm judge endpoint http://127\.0\.0\.1:\d+/v1"):
        LLMJudge(closed).connect()
    assert time.monotonic() - start < 5

    # a model the endpoint does not list is refused too
    with pytest.raises(SalsaError, match="does not serve the model 'gpt-nope'"):
        LLMJudge(spec(server, template, model="gpt-nope")).connect()


# ---------------------------------------------------------------- through `evaluate`
@pytest.fixture(scope="module")
def tiny_systems(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("llm-eval")
    save_tiny_checkpoint(root / "other", seed=1)
    suite = build_task_suite(
        TaskSuiteConfig(num_sft=0, num_prefs_train=0, num_prefs_test=0, num_rl_prompts=0, num_eval=4)
    )
    write_jsonl(root / "eval_id.jsonl", suite["eval_id.jsonl"])
    return {"base": str(tiny_model_dir), "other": str(root / "other"), "eval": str(root / "eval_id.jsonl")}


def eval_config(systems: dict, out: Path, judge: LLMJudgeSpec | None, **overrides) -> EvalConfig:
    kwargs = {
        "systems": {"base": systems["base"], "other": systems["other"]},
        "eval_files": {"id": systems["eval"]},
        "judges": ["gold", "llm"],
        "llm_judge": judge,
        "max_new_tokens": 5,
        "do_sample": True,  # greedy tiny models answer every prompt alike; sampled responses differ
        "seed": 3,
        "batch_size": 4,
        "bootstrap_samples": 50,
        "output_dir": str(out),
        **overrides,
    }
    return EvalConfig(**kwargs)


def test_evaluate_with_the_llm_judge(tiny_systems, server_factory, template, tmp_path):
    server = server_factory(by_hash)
    out = tmp_path / "eval"
    results = run_evaluate(eval_config(tiny_systems, out, spec(server, template)), quiet=True)

    rows = {r["judge"]: r for r in results["pairs"]}
    assert set(rows) == {"gold", "llm"}
    a = [r["response"] for r in map(json.loads, (out / "responses_base_id.jsonl").read_text().splitlines())]
    b = [r["response"] for r in map(json.loads, (out / "responses_other_id.jsonl").read_text().splitlines())]
    assert len(set(a + b)) == 8  # eight different responses: eight different requests
    ha, hb = ([hashlib.sha256(x.encode()).hexdigest() for x in xs] for xs in (a, b))
    expected = ["win" if x > y else "loss" if x < y else "tie" for x, y in zip(ha, hb, strict=True)]
    judgements = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    llm = [j for j in judgements if j["judge"] == "llm"]
    assert [j["verdict"] for j in llm] == expected and all(len(j["orders"]) == 2 for j in llm)
    counts = (rows["llm"]["wins"], rows["llm"]["losses"], rows["llm"]["ties"])
    assert counts == (expected.count("win"), expected.count("loss"), expected.count("tie"))
    assert rows["llm"]["unparseable"] == rows["llm"]["failed"] == 0 and rows["llm"]["n"] == 4

    manifest = read_manifest(out)
    assert manifest["llm_judge"]["requests"] == len(server.bodies) == 8
    assert manifest["llm_judge"]["prompt_tokens"] == 8 * 11 and manifest["llm_judge"]["completion_tokens"] == 8 * 3
    assert "test-key" not in (out / "config.yaml").read_text()  # the key stays in the environment
    assert yaml.safe_load((out / "config.yaml").read_text())["llm_judge"]["api_key_env"] == KEY_ENV
    md = (out / "win_rates.md").read_text()
    assert "### Judge: llm" in md and "88 prompt + 24 completion tokens" in md

    # re-judging into the same output (responses reused too): no request at all, the same table
    again = run_evaluate(eval_config(tiny_systems, out, spec(server, template), overwrite=True), quiet=True)
    assert len(server.bodies) == 8
    assert again["pairs"] == results["pairs"] and again["llm_judge"]["cached_replies"] == 8


def test_a_judge_that_never_answers_usably_leaves_a_table_and_its_replies(tiny_systems, server_factory, template,
                                                                          tmp_path, capsys):  # fmt: skip
    """A real small judge model answered every prompt in prose ("The response of the first reply is better."): the
    run warns in one sentence, writes the table with n = 0, no rates and the unparseable count, and keeps every reply
    in judgements.jsonl, so a re-run (a fixed template, a better parser) does not pay for them again."""
    server = server_factory(lambda body, attempt: Answer("The response of the first reply is better."))
    out = tmp_path / "eval"
    results = run_evaluate(eval_config(tiny_systems, out, spec(server, template)), quiet=True)

    llm = next(r for r in results["pairs"] if r["judge"] == "llm")
    assert (llm["n"], llm["unparseable"], llm["failed"]) == (0, 4, 0)
    assert llm["win_rate"] is None and llm["adjusted_win_rate_ci"] is None
    gold = next(r for r in results["pairs"] if r["judge"] == "gold")
    assert gold["n"] == 4 and gold["adjusted_win_rate"] is not None  # the other judges' results stand
    assert results["llm_judge"]["no_usable_verdict"] == ["base vs other on id"]
    assert "warning: The llm judge gave no usable verdict for base vs other on id" in capsys.readouterr().err
    assert "No usable verdict for base vs other on id." in (out / "win_rates.md").read_text()
    row = next(r for r in csv.DictReader(open(out / "win_rates.csv")) if r["judge"] == "llm")
    assert (row["n"], row["adjusted_win_rate"], row["unparseable"]) == ("0", "", "4")
    judgements = [json.loads(line) for line in (out / "judgements.jsonl").read_text().splitlines()]
    assert [j["verdict"] for j in judgements if j["judge"] == "llm"] == ["unparseable"] * 4

    asked = len(server.bodies)
    again = run_evaluate(eval_config(tiny_systems, out, spec(server, template), overwrite=True), quiet=True)
    assert len(server.bodies) == asked == 8 and again["llm_judge"]["cached_replies"] == 8


def test_evaluate_refuses_llm_judge_mistakes_before_generating(tiny_systems, server_factory, template, tmp_path):
    server = server_factory(by_hash)
    with pytest.raises(SalsaError, match="needs `llm_judge`"):
        run_evaluate(eval_config(tiny_systems, tmp_path / "e1", None), quiet=True)
    with pytest.raises(SalsaError, match="`llm` is not in `judges`"):
        run_evaluate(eval_config(tiny_systems, tmp_path / "e2", spec(server, template), judges=["gold"]), quiet=True)
    server.close()  # nobody listens any more: the pre-flight says so, and nothing is generated or written
    with pytest.raises(SalsaError, match="Cannot reach"):
        run_evaluate(eval_config(tiny_systems, tmp_path / "e3", spec(server, template, timeout_s=2)), quiet=True)
    assert list(tmp_path.iterdir()) == [Path(template)]


def test_cli_reads_llm_judge_from_yaml(tmp_path, monkeypatch, capsys):
    from test_evaluate_command import register_evaluate

    register_evaluate(monkeypatch)
    cfg = {
        "systems": {"a": "x", "b": "y"},
        "judges": ["gold", "llm"],
        "llm_judge": {"model": "gpt-4o", "base_url": "http://localhost:8000/v1", "max_concurrency": 3},
    }
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit):
        cli_main(["evaluate", "--config", str(path), "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)["llm_judge"]
    assert (
        printed["model"] == "gpt-4o" and printed["max_concurrency"] == 3 and printed["api_key_env"] == "OPENAI_API_KEY"
    )


# ---------------------------------------------------------------- a later turn of a multi-turn set
def test_comparison_of_a_later_turn_shows_each_systems_conversation():
    from salsa_lightning.evaluation.llm_judge import LATER_TURN_NOTE, comparison

    q1, q2 = {"role": "user", "content": "Q1"}, {"role": "user", "content": "Q2"}
    first = comparison([q1], "mine", [q1], "theirs")
    assert first == Comparison("Q1", "mine", "theirs")  # one shared prompt: as before
    a = [q1, {"role": "assistant", "content": "a's turn 1"}, q2]
    b = [q1, {"role": "assistant", "content": "b's turn 1"}, q2]
    later = comparison(a, "a's turn 2", b, "b's turn 2")
    assert later.question == f"{LATER_TURN_NOTE}\n\nQ2"
    assert later.response_a == "User: Q1\n\nAssistant: a's turn 1\n\nUser: Q2\n\nAssistant: a's turn 2"
    assert later.response_b == "User: Q1\n\nAssistant: b's turn 1\n\nUser: Q2\n\nAssistant: b's turn 2"


def test_evaluate_judges_both_mt_bench_turns_with_each_conversation(tiny_systems, server_factory, template, tmp_path):
    server = server_factory(by_hash)
    mt = write_jsonl(tmp_path / "mt.jsonl", [{"prompt": ["First question?", "Second question?"], "category": "x"}])
    cfg = eval_config(tiny_systems, tmp_path / "eval", spec(server, template), judges=["llm"],
                      eval_files={"mt_bench": str(mt)})  # fmt: skip
    results = run_evaluate(cfg, quiet=True)
    assert results["pairs"][0]["n"] == 2  # one question, two turns
    base, other = (
        [json.loads(x) for x in (tmp_path / "eval" / f"responses_{s}_mt_bench.jsonl").read_text().splitlines()]
        for s in ("base", "other")
    )
    asked = {shown(body) for body in server.bodies}
    assert ("First question?", base[0]["response"], other[0]["response"]) in asked  # turn 1, both orders
    assert ("First question?", other[0]["response"], base[0]["response"]) in asked
    turn2 = [(q, a, b) for q, a, b in asked if q.endswith("Second question?")]
    assert len(turn2) == 2  # both orders
    # each answer is its system's whole conversation: its own turn-1 answer, then its turn-2 answer
    conversation = {
        s: f"User: First question?\n\nAssistant: {r[0]['response']}\n\nUser: Second question?\n\n"
        f"Assistant: {r[1]['response']}"
        for s, r in (("base", base), ("other", other))
    }
    assert {(a, b) for _, a, b in turn2} == {
        (conversation["base"], conversation["other"]),
        (conversation["other"], conversation["base"]),
    }
