"""The reward stage learns a separable preference, cannot leak column order, and reloads with identical scores."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import addition_conversations, addition_preferences, reward_args, sft_args, write_jsonl

from salsa_lightning.cli import cli_main, main
from salsa_lightning.data.preferences import PreferenceDataModule
from salsa_lightning.reward.scoring import RewardScorer
from salsa_lightning.stage import MANIFEST_NAME


@pytest.fixture(scope="module")
def pref_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prefs") / "prefs.jsonl", addition_preferences(96))


@pytest.fixture(scope="module")
def lora_sft_dir(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-sft")
    data = write_jsonl(root / "sft.jsonl", addition_conversations(32))
    out = root / "sft"
    main(sft_args(str(tiny_model_dir), str(data), str(out), "--trainer.max_steps=3", "--model.model.lora.r=4"))
    return out


def val_accuracy_and_margin(module, datamodule) -> tuple[float, float]:
    module.model.eval()
    accs, margins = [], []
    with torch.no_grad():
        for batch in datamodule.val_dataloader():
            _, stats = module.model_step(batch)
            accs.append(float(stats["accuracy"]))
            margins.append(float(stats["margin"]))
    return sum(accs) / len(accs), sum(margins) / len(margins)


def swapped_datamodule(rows, tokenizer, tmp_path) -> PreferenceDataModule:
    swapped = [{**r, "chosen": r["rejected"], "rejected": r["chosen"]} for r in rows]
    dm = PreferenceDataModule(str(write_jsonl(tmp_path / "swapped.jsonl", swapped)), tokenizer, val_fraction=0.25)
    dm.setup()
    return dm


def test_full_reward_model_learns_and_reloads(tiny_model_dir, pref_data, tmp_path):
    out = tmp_path / "rm"
    cli = cli_main(
        reward_args(str(tiny_model_dir), str(pref_data), str(out), "--trainer.max_epochs=3", "--model.optim.lr=3e-3")
    )
    acc, margin = val_accuracy_and_margin(cli.model, cli.datamodule)
    assert acc >= 0.9 and margin > 0, (acc, margin)

    # order cannot leak: the same pairs with columns swapped get the opposite verdict and margin
    rows = [json.loads(line) for line in pref_data.read_text().splitlines()]
    s_acc, s_margin = val_accuracy_and_margin(cli.model, swapped_datamodule(rows, cli.model.tokenizer, tmp_path))
    assert s_acc == pytest.approx(1 - acc) and s_margin == pytest.approx(-margin, rel=1e-4)

    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "reward" and manifest["format"] == "full"
    assert manifest["val_accuracy"] >= 0.9
    assert manifest["reward_stats"]["count"] == 2 * len(cli.datamodule.train_set)

    # the scoring API on the reloaded output == the module's own scores
    prompts = [r["prompt"] for r in rows[:6]]
    responses = [r["chosen"] for r in rows[:6]]
    scorer = RewardScorer.from_output(str(out))
    enc = [
        cli.model.tokenizer.apply_chat_template(
            [{"role": "user", "content": p}, {"role": "assistant", "content": c}], tokenize=False
        )
        for p, c in zip(prompts, responses)
    ]
    batch = cli.model.tokenizer(enc, add_special_tokens=False, padding=True, return_tensors="pt")
    with torch.no_grad():
        module_scores = cli.model(batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(scorer.score(prompts, responses), module_scores)
    # and plain transformers reads the same numbers (these rows do not end in the pad token)
    from transformers import AutoModelForSequenceClassification

    plain = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        plain_scores = plain(**batch).logits.squeeze(-1)
    torch.testing.assert_close(plain_scores, module_scores)
    normalized = scorer.score(prompts, responses, normalize=True)
    stats = manifest["reward_stats"]
    torch.testing.assert_close(normalized, (module_scores - stats["mean"]) / stats["std"])


def test_lora_reward_model_starts_from_sft_adapter_and_reloads(tiny_model_dir, lora_sft_dir, pref_data, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "rm-lora"
    cli = cli_main(
        reward_args(
            str(lora_sft_dir),
            str(pref_data),
            str(out),
            "--trainer.max_steps=1",
            "--model.optim.lr=1e-9",
            "--model.model.lora.r=4",
        )
    )
    # initialised from the SFT adapter (lr ~ 0 so one step leaves it there), base untouched, head trainable
    sft = load_file(str(lora_sft_dir / "adapter_model.safetensors"))
    rm = dict(cli.model.model.named_parameters())
    some_key = next(k for k in sft if "lora_A" in k)
    match = [
        n for n in rm if n.endswith(some_key.split("base_model.model.", 1)[1].replace(".weight", ".default.weight"))
    ]
    assert match and torch.allclose(rm[match[0]], sft[some_key], atol=1e-6)
    trainable = {n for n, p in cli.model.model.named_parameters() if p.requires_grad}
    assert all("lora_" in n or "score" in n for n in trainable) and any("score" in n for n in trainable)

    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1)
    reloaded = PeftModel.from_pretrained(base, out).eval()
    batch = next(iter(cli.datamodule.val_dataloader()))
    cli.model.model.eval()
    with torch.no_grad():
        ours = cli.model(batch["input_ids"], batch["attention_mask"])
        from salsa_lightning.reward.model import sequence_scores

        theirs = sequence_scores(reloaded, batch["input_ids"], batch["attention_mask"])
    torch.testing.assert_close(ours, theirs)
    assert json.loads((out / MANIFEST_NAME).read_text())["format"] == "lora"


def test_identical_pairs_are_dropped_and_counted(tiny_tokenizer, tmp_path):
    rows = addition_preferences(8) + [{"prompt": "Hi", "chosen": "Same.", "rejected": "Same. "}] * 3
    dm = PreferenceDataModule(str(write_jsonl(tmp_path / "p.jsonl", rows)), tiny_tokenizer, val_fraction=0.25)
    with pytest.warns(UserWarning, match="identical"):
        dm.setup()
    assert dm.counts["train_identical_dropped"] + dm.counts["val_identical_dropped"] == 3
    assert len(dm.train_set) + len(dm.val_set) == 8


def test_truncation_keeps_the_response_end(tiny_tokenizer, tmp_path):
    rows = [{"prompt": "word " * 200, "chosen": "The answer is 5.", "rejected": "banana"}] * 4
    dm = PreferenceDataModule(
        str(write_jsonl(tmp_path / "p.jsonl", rows)), tiny_tokenizer, max_length=16, val_fraction=0.5
    )
    dm.setup()
    ids = dm.train_set[0]["chosen_ids"]
    assert len(ids) == 16 and "The answer is 5." in tiny_tokenizer.decode(ids)
    assert dm.counts["train_truncated"] == len(dm.train_set)


def run_fails(args, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    return " ".join(capsys.readouterr().err.split())


def test_row_missing_rejected(tiny_model_dir, tmp_path, capsys):
    data = write_jsonl(tmp_path / "p.jsonl", addition_preferences(4) + [{"prompt": "x", "chosen": "y"}])
    msg = run_fails(
        reward_args(str(tiny_model_dir), str(data), str(tmp_path / "out"), "--data.val_fraction=0.4"), capsys
    )
    assert "has no `rejected`" in msg and not (tmp_path / "out").exists()


def test_sft_dir_that_is_not_a_stage_output(pref_data, tmp_path, capsys):
    bogus = tmp_path / "not-a-model"
    bogus.mkdir()
    (bogus / "notes.txt").write_text("hello")
    (bogus / "tokenizer_config.json").write_text("{}")
    msg = run_fails(reward_args(str(bogus), str(pref_data), str(tmp_path / "out")), capsys)
    assert "not-a-model" in msg and not (tmp_path / "out").exists()


def test_tokenizer_without_pad_gets_one(tmp_path, pref_data):
    from salsa_lightning.models.loading import load_tokenizer
    from salsa_lightning.models.tiny import make_tiny_model, make_tiny_tokenizer

    tok = make_tiny_tokenizer(pad_token=None)
    make_tiny_model(tok).save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    with pytest.warns(UserWarning, match="no pad token"):
        loaded = load_tokenizer(str(tmp_path / "m"))
    assert loaded.pad_token == loaded.eos_token


@pytest.mark.parametrize("lora", [False, True])
def test_gradient_checkpointing_setting_is_applied(tiny_model_dir, lora_sft_dir, lora):
    # the paper's reward configs ask for it (7B activations); it used to be ignored by the reward loader
    from salsa_lightning.models.loading import LoraSpec, ModelSpec
    from salsa_lightning.reward.model import load_reward_model, unwrap

    spec = ModelSpec(str(lora_sft_dir if lora else tiny_model_dir), gradient_checkpointing=True,
                     lora=LoraSpec(r=4) if lora else None)  # fmt: skip
    model = load_reward_model(spec, trainable=True, pad_token_id=0)
    assert unwrap(model).is_activation_checkpointing
    off = load_reward_model(ModelSpec(str(tiny_model_dir)), trainable=True, pad_token_id=0)
    assert not unwrap(off).is_activation_checkpointing
    # and it still trains: a backward through the checkpointed layers reaches the trainable weights
    ids = torch.randint(3, 100, (2, 9))
    from salsa_lightning.reward.model import sequence_scores

    model.train()
    sequence_scores(model, ids, torch.ones_like(ids)).sum().backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters() if "layers" in n)


def test_new_score_head_is_not_reported_but_other_missing_weights_are():
    import logging

    from salsa_lightning.models.loading import _NewHeadReport

    def records(info: dict, message: str) -> int:
        shown = []
        log = logging.getLogger("transformers.modeling_utils")
        handler = logging.Handler()
        handler.emit = shown.append
        log.addHandler(handler)
        try:
            with _NewHeadReport("score") as report:
                log.warning(message)
                report.info = info
        finally:
            log.removeHandler(handler)
        return len(shown)

    assert records({"missing_keys": {"score.weight"}}, "LOAD REPORT score.weight MISSING") == 0
    assert records({"missing_keys": {"score.weight", "model.norm.weight"}}, "score.weight model.norm.weight") == 1
    assert records({"missing_keys": set(), "unexpected_keys": {"x"}}, "LOAD REPORT x UNEXPECTED") == 1


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_training_set_reward_stats_score_every_sequence_under_the_trainers_precision(
    tiny_model_dir, pref_data, tmp_path, precision
):
    """The manifest's reward statistics are the final model's scores over every training sequence, each scored as
    PPO scores it (under the trainer's autocast), whatever order and batches the length-sorted pass used."""
    out = tmp_path / "rm"
    cli = cli_main(reward_args(str(tiny_model_dir), str(pref_data), str(out), "--trainer.max_steps=2",
                               "--data.batch_size=4", f"--trainer.precision={precision}"))  # fmt: skip
    module, train_set = cli.model, cli.datamodule.train_set
    autocast_seen = []
    hook = module.model.register_forward_hook(lambda *_: autocast_seen.append(torch.is_autocast_enabled("cpu")))
    stats = module.training_set_reward_stats()
    hook.remove()
    assert autocast_seen and all(a == (precision == "bf16-mixed") for a in autocast_seen)

    seqs = [s for key in ("chosen_ids", "rejected_ids") for s in train_set[key]]
    lengths = {len(s) for s in seqs}
    assert len(lengths) > 1  # the sorted pass had different lengths to order
    module.model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16-mixed"):
        one_by_one = torch.stack([module(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long))[0] for s in seqs])
    one_by_one = one_by_one.double()
    manifest = json.loads((out / MANIFEST_NAME).read_text())["reward_stats"]
    tol = 1e-5 if precision == "32-true" else 2e-2  # bf16: the padded batch's rounding differs from a lone row's
    assert manifest["count"] == stats["count"] == len(seqs)
    assert manifest["mean"] == pytest.approx(stats["mean"])  # the pass on_fit_end ran is the one re-run here
    assert stats["mean"] == pytest.approx(float(one_by_one.mean()), abs=tol * float(one_by_one.std()))
    assert stats["std"] == pytest.approx(float(one_by_one.std()), rel=tol)
