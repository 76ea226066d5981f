"""QLoRA: a 4-bit NF4 base (bitsandbytes) under LoRA adapters for SFT, reward and PPO.

Tiny models on CPU (bitsandbytes' CPU backend computes 4-bit layers in float32); what must hold: adapters
train, the 4-bit base stays bit-for-bit what was loaded, outputs reload onto a 4-bit base with the same
logits, the LoRA soup on a 4-bit base is the dense soup on the dequantised base, and full fine-tuning of a
4-bit model is refused with one clear sentence.
"""

from __future__ import annotations

import json

import pytest
import torch
from helpers import (
    addition_conversations,
    addition_preferences,
    ppo_args,
    reward_args,
    sft_args,
    write_jsonl,
    write_prompts,
)
from scale_helpers import loss_history

from salsa_lightning.cli import cli_main, main
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import ModelSpec, _from_pretrained, load_causal_lm

bnb = pytest.importorskip("bitsandbytes")
NF4 = "--model.model.quantization=nf4"


def training_set_loss(model, datamodule) -> float:
    from salsa_lightning.modules.sft import causal_lm_loss

    total = count = 0
    for batch in datamodule.train_dataloader():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        loss, _, n = causal_lm_loss(logits, batch["labels"])
        total, count = total + float(loss) * int(n), count + int(n)
    return total / count


def fresh_4bit_base(path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return _from_pretrained(AutoModelForCausalLM, str(path), ModelSpec(quantization="nf4"))


def test_bnb_cpu_4bit_linear_matches_dequantised_dense_forward_and_backward():
    """The backend check the rest relies on: a 4-bit layer computes x Wᵀ with W its dequantised weight, and
    passes gradients to its input — also after an eval/no_grad pass (which bitsandbytes would otherwise
    answer by repacking the weight for a kernel without backward)."""
    from salsa_lightning.models.quantization import _keep_cpu_layout, dequantized_weight

    torch.manual_seed(0)
    dense = torch.nn.Linear(128, 64, bias=False)
    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(dense.weight.data.clone(), requires_grad=False, quant_type="nf4")
    layer = layer.to("cpu").eval()
    _keep_cpu_layout(layer)
    packed = layer.weight.data.clone()
    w = dequantized_weight(layer)
    assert torch.linalg.norm(w - dense.weight) < 0.15 * torch.linalg.norm(
        dense.weight
    )  # 16-level rounding, not garbage
    with torch.no_grad():
        layer(torch.randn(3, 128))
    x = torch.randn(3, 128, requires_grad=True)
    y = layer(x)
    y.square().sum().backward()
    x_ref = x.detach().clone().requires_grad_()
    y_ref = x_ref @ w.t()
    y_ref.square().sum().backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    assert x.grad is not None
    torch.testing.assert_close(x.grad, x_ref.grad, atol=1e-4, rtol=1e-4)
    assert torch.equal(layer.weight.data, packed)


@pytest.fixture(scope="module")
def qlora(tiny_model_dir, tmp_path_factory):
    """QLoRA SFT seeds 1 and 2, a QLoRA reward model and their LoRA soup, on one tiny 4-bit base."""
    root = tmp_path_factory.mktemp("qlora")
    sft = write_jsonl(root / "sft.jsonl", addition_conversations(48))
    prefs = write_jsonl(root / "prefs.jsonl", addition_preferences(48))
    write_prompts(root / "prompts.jsonl", 8, seed=9)
    clis = {}
    for seed in (1, 2):
        clis[f"sft{seed}"] = cli_main(
            sft_args(
                str(tiny_model_dir),
                str(sft),
                str(root / f"sft{seed}"),
                NF4,
                "--trainer.max_steps=6",
                "--model.model.lora.r=8",
                "--model.model.lora.alpha=32",
                "--model.model.lora.dropout=0",
                "--model.optim.lr=5e-2",
                "--model.optim.warmup_ratio=0",
                "--trainer.enable_progress_bar=false",
                f"--seed_everything={seed}",
                "--trainer.callbacks+=scale_helpers.LossHistory",
                "--trainer.limit_val_batches=0",
            )  # fmt: skip
        )
    clis["rm"] = cli_main(
        reward_args(
            str(root / "sft1"),
            str(prefs),
            str(root / "rm"),
            NF4,
            "--trainer.max_steps=4",
            "--model.model.lora.r=4",
            "--model.optim.lr=1e-2",
            "--trainer.enable_progress_bar=false",
            "--trainer.limit_val_batches=0",
        )  # fmt: skip
    )
    main(["soup", f"--inputs=[{root / 'sft1'},{root / 'sft2'}]", f"--output_dir={root / 'soup'}"])
    return root, clis


def test_qlora_sft_trains_adapters_and_leaves_the_4bit_base_untouched(qlora, tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    from salsa_lightning.models.quantization import base_state, quantized_linears

    root, clis = qlora
    model = clis["sft1"].model.model
    assert quantized_linears(model), "the base was not loaded in 4-bit"
    assert len(loss_history(clis["sft1"])) == 6
    # the training-set loss fell from the base's (PEFT's B = 0 init: the adapter starts as the base itself)
    model.eval()
    with torch.no_grad():
        after = training_set_loss(model, clis["sft1"].datamodule)
        with model.disable_adapter():
            before = training_set_loss(model, clis["sft1"].datamodule)
    assert after < before - 0.1, (before, after)
    # training moved the adapters (B starts at 0) ...
    lora_b = [m.lora_B["default"].weight for m in model.modules() if isinstance(m, LoraLayer)]
    assert lora_b and all(b.abs().sum() > 0 for b in lora_b)
    # ... and only them: the packed 4-bit weights and their statistics are exactly a fresh load's
    after, fresh = base_state(model), base_state(fresh_4bit_base(tiny_model_dir))
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[k], v) for k, v in fresh.items())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)

    # the output is a plain adapter that reloads onto a 4-bit base with the same logits
    manifest = json.loads((root / "sft1" / "salsa_manifest.json").read_text())
    assert manifest["format"] == "lora"
    reloaded = load_causal_lm(ModelSpec(str(root / "sft1"), quantization="nf4"), trainable=False)
    ids = torch.randint(3, 300, (2, 10))
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_qlora_reward_trains_its_adapter_and_head(qlora, tiny_model_dir):
    from salsa_lightning.models.quantization import base_state

    root, clis = qlora
    model = clis["rm"].model.model
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable) and any("score" in n for n in trainable)
    assert all("lora_" in n or "score" in n for n in trainable)
    # the reward model's trunk is the same 4-bit base (a sequence-classification top instead of the LM head)
    fresh, after = base_state(fresh_4bit_base(tiny_model_dir)), base_state(model)
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[k], v) for k, v in fresh.items())
    assert (root / "rm" / "adapter_model.safetensors").is_file()


def test_lora_soup_on_a_4bit_base_equals_the_dense_soup_on_the_dequantised_base(qlora, tiny_model_dir):
    """DESIGN §2: soup = W0 + Σ w_i s B_i A_i. With W0 the dequantised 4-bit weight, computed here by hand."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from salsa_lightning.models.quantization import dequantized_weight, quantized_linears

    root, _ = qlora
    soup = load_causal_lm(ModelSpec(str(root / "soup"), quantization="nf4"), trainable=False)
    assert quantized_linears(soup)

    base4 = fresh_4bit_base(tiny_model_dir)
    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    seeds = []
    for seed in (1, 2):
        cfg = json.loads((root / f"sft{seed}" / "adapter_config.json").read_text())
        seeds.append((load_file(str(root / f"sft{seed}" / "adapter_model.safetensors")), cfg["lora_alpha"] / cfg["r"]))
    with torch.no_grad():
        for name, layer in quantized_linears(base4).items():
            w = dequantized_weight(layer)
            for weights, scaling in seeds:
                a, b = (
                    weights[f"base_model.model.{name}.lora_A.weight"],
                    weights[f"base_model.model.{name}.lora_B.weight"],
                )
                w = w + 0.5 * scaling * (b @ a)  # uniform weights over two seeds
            dense.get_submodule(name).weight.copy_(w)
        ids = torch.randint(3, 300, (3, 12))
        torch.testing.assert_close(soup(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-4, rtol=1e-4)
        # and the soup is not trivially the base: the adapters moved the logits
        assert (base4(input_ids=ids).logits - dense(input_ids=ids).logits).abs().max() > 1e-3


def test_qlora_ppo_trains_policy_and_critic_on_one_shared_4bit_base(qlora, tiny_model_dir):
    from peft.tuners.lora import LoraLayer

    from salsa_lightning.models.quantization import base_state, quantized_linears

    root, _ = qlora
    cli = cli_main(
        ppo_args(
            str(root / "sft1"),
            str(root / "prompts.jsonl"),
            "--model.model.quantization=nf4",
            "--model.layout=lora",
            "--model.anchor=soup",
            f"--model.soup={root / 'soup'}",
            "--trainer.max_epochs=2",
            "--model.optim.lr=1e-2",
            reward=str(root / "rm"),
        )  # fmt: skip
    )
    stack = cli.model.stack
    assert stack.layout == "lora"
    history = cli.model.history
    assert len(history) == 2 and all(torch.isfinite(torch.tensor(list(h.values()))).all() for h in history)
    # the policy left its start (k1 is a signed per-sample estimate: its batch mean can be below 0 after a step)
    assert history[0]["objective/kl_init"] == 0 != history[-1]["objective/kl_init"]

    # ONE base: as many 4-bit layers as one model has, each under every adapter (policy, soup, reward, value)
    n_linear = len(quantized_linears(fresh_4bit_base(tiny_model_dir)))
    layers = [m for m in stack.model.modules() if isinstance(m, LoraLayer)]
    assert len(quantized_linears(stack.model)) == n_linear == len(layers)
    for layer in layers:
        assert isinstance(layer.get_base_layer(), bnb.nn.Linear4bit)
        assert {"policy", "init", "soup", "reward", "value"} <= set(layer.lora_A.keys())

    # the policy adapter trained, the soup and init adapters did not, the base is the fresh 4-bit load
    init = load_causal_lm(ModelSpec(str(root / "sft1"), quantization="nf4"), trainable=False)
    start = {n.replace(".default.", ".policy."): p for n, p in init.named_parameters() if "lora_" in n}
    now = dict(stack.model.named_parameters())
    assert any(not torch.equal(now[n], p) for n, p in start.items())
    assert all(torch.equal(now[n.replace(".policy.", ".init.")], p) for n, p in start.items())
    fresh, after = base_state(fresh_4bit_base(tiny_model_dir)), base_state(stack.model)
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[k], v) for k, v in fresh.items())


def test_full_weights_of_a_4bit_model_are_refused(qlora, tiny_model_dir, capsys):
    root, _ = qlora
    with pytest.raises(SalsaError, match="4-bit"):
        load_causal_lm(ModelSpec(str(tiny_model_dir), quantization="nf4"), trainable=True)
    from salsa_lightning.reward.model import load_reward_model

    with pytest.raises(SalsaError, match="4-bit"):  # would merge the SFT adapter into the 4-bit base
        load_reward_model(ModelSpec(str(root / "sft1"), quantization="nf4"), trainable=True)
    args = ppo_args(str(root / "sft1"), str(root / "prompts.jsonl"), "--model.model.quantization=nf4", "--model.layout=full",
                    "--trainer.max_steps=1", reward=str(root / "rm"))  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    assert "4-bit" in capsys.readouterr().err


@pytest.mark.gpu
def test_qlora_sft_on_gpu_runs_in_bf16(tiny_model_dir, tmp_path):
    from salsa_lightning.models.quantization import base_state, compute_dtype, quantized_linears

    data = write_jsonl(tmp_path / "sft.jsonl", addition_conversations(32))
    args = sft_args(str(tiny_model_dir), str(data), None, NF4, "--trainer.max_steps=6", "--model.model.lora.r=4",
                    "--model.optim.lr=2e-2", "--trainer.accelerator=gpu", "--trainer.devices=1",
                    "--trainer.callbacks+=scale_helpers.LossHistory", "--trainer.enable_progress_bar=false")  # fmt: skip
    cli = cli_main(args)
    model = cli.model.model
    assert compute_dtype() == torch.bfloat16
    layers = quantized_linears(model)
    assert layers and all(m.weight.device.type == "cuda" and m.compute_dtype == torch.bfloat16 for m in layers.values())
    losses = loss_history(cli)
    assert losses[-1] < losses[0]
    fresh, after = base_state(fresh_4bit_base(tiny_model_dir)), base_state(model)
    assert after.keys() == fresh.keys()
    assert all(torch.equal(after[k].cpu(), v.cpu()) for k, v in fresh.items())


def test_quantization_is_a_config_field(tiny_model_dir, capsys):
    import yaml

    with pytest.raises(SystemExit):
        cli_main(sft_args(str(tiny_model_dir), "unused.jsonl", None, NF4, "--print_config"))
    assert yaml.safe_load(capsys.readouterr().out)["model"]["init_args"]["model"]["quantization"] == "nf4"
    with pytest.raises(SystemExit) as exit_info:  # a value the field does not take is a parse error, not a crash later
        main(sft_args(str(tiny_model_dir), "unused.jsonl", None, "--model.model.quantization=int3"))
    assert exit_info.value.code == 2


def test_sharding_a_4bit_base_is_refused_with_a_sentence(tiny_model_dir):
    # FSDP2 cannot shard bitsandbytes' packed 4-bit parameters; refuse before touching the device mesh
    from salsa_lightning.distributed import shard_decoder_layers

    with pytest.raises(SalsaError, match="4-bit .*one GPU"):
        shard_decoder_layers(fresh_4bit_base(tiny_model_dir), device_mesh=None)
