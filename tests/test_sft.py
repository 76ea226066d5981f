"""The SFT stage trains (full and LoRA) and writes an output that plain transformers/peft reload exactly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import addition_conversations, sft_args, write_jsonl
from transformers import AutoModelForCausalLM

from salsa_lightning.cli import cli_main
from salsa_lightning.modules.sft import causal_lm_loss
from salsa_lightning.stage import MANIFEST_NAME


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("sft-data") / "sft.jsonl", addition_conversations(96))


def val_loss(model, loader) -> float:
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in loader:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss, _, n = causal_lm_loss(logits, batch["labels"])
            total, count = total + float(loss) * int(n), count + int(n)
    return total / count


def first_batch(cli):
    return next(iter(cli.datamodule.val_dataloader()))


def test_causal_lm_loss_hand_case():
    # two positions predict; one is ignored. logits favour token 1 at step 0 (label 1) -> correct.
    logits = torch.tensor([[[0.0, 2.0], [1.0, 0.0], [0.0, 0.0]]])  # (1, 3, 2)
    labels = torch.tensor([[-100, 1, -100]])
    loss, correct, n = causal_lm_loss(logits, labels)
    expected = -torch.log_softmax(torch.tensor([0.0, 2.0]), -1)[1]
    assert n == 1 and correct == 1
    torch.testing.assert_close(loss, expected)


def test_full_sft_lowers_val_loss_and_reloads(tiny_model_dir, sft_data, tmp_path):
    out = tmp_path / "sft-seed{seed}"
    args = sft_args(str(tiny_model_dir), str(sft_data), str(out), "--trainer.max_epochs=4", "--model.optim.lr=3e-3")
    cli = cli_main(args)
    out = tmp_path / "sft-seed1"  # {seed} filled from --seed_everything=1
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = cli.model.model
    loader = cli.datamodule.val_dataloader()
    before, after = val_loss(initial, loader), val_loss(trained, loader)
    assert after < before - 0.3, (before, after)
    # every weight trained (full mode)
    changed = [n for (n, p), q in zip(trained.named_parameters(), initial.parameters()) if not torch.equal(p, q)]
    assert len(changed) == len(list(initial.parameters()))

    reloaded = AutoModelForCausalLM.from_pretrained(out)
    batch = first_batch(cli)
    trained.eval()
    with torch.no_grad():
        a = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b)
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["stage"] == "sft" and manifest["format"] == "full" and manifest["seed"] == 1
    assert manifest["metrics"]["val/loss"] == pytest.approx(after, rel=0.05)
    assert "model:" in (out / "config.yaml").read_text()
    assert not list(tmp_path.glob(".*tmp*")), "temporary directory left behind"


def test_lora_sft_trains_adapter_only_and_reloads_with_peft(tiny_model_dir, sft_data, tmp_path):
    from peft import PeftModel

    out = tmp_path / "lora"
    args = sft_args(
        str(tiny_model_dir),
        str(sft_data),
        str(out),
        "--trainer.max_epochs=4",
        "--model.optim.lr=1e-2",
        "--model.model.lora.r=8",
        "--model.model.lora.alpha=16",
        "--model.model.lora.dropout=0.0",
    )
    cli = cli_main(args)
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    trained = cli.model.model
    assert cli.trainer.optimizers[0].defaults["fused"] is True  # configure_adamw: the fused kernel on CPU
    loader = cli.datamodule.val_dataloader()
    before, after = val_loss(initial, loader), val_loss(trained, loader)
    assert after < before - 0.3, (before, after)
    # the base stayed frozen and unchanged; only LoRA weights train
    trainable = {n for n, p in trained.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    base = dict(trained.get_base_model().named_parameters())
    for name, p in initial.named_parameters():
        key = (
            name.replace(".weight", ".base_layer.weight")
            if name.replace(".weight", ".base_layer.weight") in base
            else name
        )
        assert torch.equal(base[key], p), name

    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), out)
    batch = first_batch(cli)
    trained.eval()
    with torch.no_grad():
        a = trained(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = reloaded(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b)
    assert json.loads((out / MANIFEST_NAME).read_text())["format"] == "lora"


@pytest.mark.parametrize("precision", ["bf16-mixed", "32-true"])
def test_sft_clips_gradients_in_either_precision(tiny_model_dir, sft_data, tmp_path, precision):
    args = sft_args(str(tiny_model_dir), str(sft_data), str(tmp_path / "out"), "--trainer.max_epochs=1",
                    f"--trainer.precision={precision}", "--trainer.gradient_clip_val=0.5")  # fmt: skip
    cli = cli_main(args)
    assert cli.trainer.global_step > 0
    assert cli.trainer.optimizers[0].defaults["fused"] is (True if precision == "32-true" else None)
