"""FSDP1 (Lightning's FSDPStrategy) through `DecoderLayerFSDPStrategy`: the wrap policy comes from the model's
decoder-layer class, the YAML keeps the strategy, and a 2-process run on CPU with gloo follows the 1-process run
with the same global batch step for step and exports the same HF-format weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from helpers import write_jsonl
from lightning.pytorch.callbacks import Callback
from scale_helpers import loss_history
from test_fsdp import common_args, equal_length_conversations

from salsa_lightning.cli import cli_main
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import LoraSpec, ModelSpec
from salsa_lightning.modules.sft import SFTModule
from salsa_lightning.strategies import DecoderLayerFSDPStrategy, RootClippingFSDPPrecision, decoder_layer_classes

ROOT = Path(__file__).resolve().parents[1]
# float32 on CPU: sharded and unsharded runs differ only in summation order (all-reduce vs one process)
RTOL = 1e-4


def tiny_sft_module(model_dir, **spec) -> SFTModule:
    module = SFTModule(model=ModelSpec(name_or_path=str(model_dir), **spec))
    module.configure_model()
    return module


@pytest.mark.parametrize("lora", [None, LoraSpec(r=4, alpha=8)], ids=["full", "lora"])
def test_wrap_policy_is_the_decoder_layer_class(tiny_model_dir, lora):
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    strategy = DecoderLayerFSDPStrategy(activation_checkpointing=True)
    assert strategy.configure_wrapping(tiny_sft_module(tiny_model_dir, lora=lora)) == {LlamaDecoderLayer}
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and policy._module_classes == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {LlamaDecoderLayer}


def test_no_activation_checkpointing_unless_asked(tiny_model_dir):
    strategy = DecoderLayerFSDPStrategy()
    strategy.configure_wrapping(tiny_sft_module(tiny_model_dir))
    assert strategy._activation_checkpointing_kwargs == {}


def test_refuses_checkpointing_twice(tiny_model_dir):
    module = tiny_sft_module(tiny_model_dir, gradient_checkpointing=True)
    with pytest.raises(SalsaError, match="gradient_checkpointing: false"):
        DecoderLayerFSDPStrategy(activation_checkpointing=True).configure_wrapping(module)


def test_refuses_modules_it_cannot_shard_or_save():
    import lightning as L

    class Plain(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(2, 2)

    with pytest.raises(SalsaError, match="no transformers model"):
        decoder_layer_classes(Plain())
    with pytest.raises(SalsaError, match="SFT and reward stages"):  # PPO shards with FSDP2
        DecoderLayerFSDPStrategy().configure_wrapping(Plain())


def test_config_keeps_the_strategy_and_its_settings(capsys):
    with pytest.raises(SystemExit):
        cli_main(["fit", "--config", str(ROOT / "configs/paper/llama2-7b/sft.yaml"),
                  "--config", str(ROOT / "configs/fsdp/fsdp1-1x8.yaml"), "--print_config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    strategy = printed["trainer"]["strategy"]
    assert strategy["class_path"] == "salsa_lightning.strategies.DecoderLayerFSDPStrategy"
    expected = {"sharding_strategy": "FULL_SHARD", "activation_checkpointing": True, "state_dict_type": "sharded"}
    assert expected.items() <= strategy["init_args"].items()
    assert printed["trainer"]["devices"] == 8 and printed["trainer"]["precision"] == "bf16-true"
    assert printed["model"]["init_args"]["model"]["gradient_checkpointing"] is False


class FSDPUnits(Callback):
    """Writes, from rank 0, how many FSDP units and checkpointed layers the wrapped model has and which precision
    plugin clips the gradients (what a run in another process can report)."""

    def __init__(self, path: str):
        self.path = path

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
        from torch.distributed.fsdp import FullyShardedDataParallel

        if trainer.is_global_zero:
            modules = list(trainer.model.modules())
            counts = {
                "fsdp_units": sum(isinstance(m, FullyShardedDataParallel) for m in modules),
                "checkpointed": sum(isinstance(m, CheckpointWrapper) for m in modules),
                "precision": type(trainer.precision_plugin).__name__,
            }
            Path(self.path).write_text(json.dumps(counts))


# On CPU the strategy wraps the model itself (torch's FSDP1 needs `device_id=cpu`); on GPUs Lightning does, and
# the gather offloads to CPU on rank 0 only: the two paths differ, so the GPU one has its own case.
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")


@pytest.mark.distributed
@pytest.mark.parametrize("accelerator", ["cpu", pytest.param("gpu", marks=[pytest.mark.gpu, TWO_GPUS])])
def test_fsdp1_sft_on_two_processes_matches_one_process(tiny_model_dir, tmp_path, accelerator):
    from safetensors.torch import load_file

    data = str(write_jsonl(tmp_path / "sft.jsonl", equal_length_conversations()))
    # clipping below the gradient norm, so that the root-level clip (not Lightning's: it refuses under FSDP) counts
    device_args = ["--trainer.gradient_clip_val=0.5", f"--trainer.accelerator={accelerator}"]
    single = cli_main(
        common_args(str(tiny_model_dir), data, str(tmp_path / "single"), str(tmp_path / "single-loss"))
        + ["--data.batch_size=8", *device_args]
    )
    reference = loss_history(single)
    assert len(reference) == 4

    args = common_args(str(tiny_model_dir), data, str(tmp_path / "sharded"), str(tmp_path / "sharded-loss"))
    strategy = {
        "class_path": "salsa_lightning.strategies.DecoderLayerFSDPStrategy",
        "init_args": {"activation_checkpointing": True, "state_dict_type": "sharded"},
    }
    args += ["--data.batch_size=4", "--trainer.devices=2", *device_args, f"--trainer.strategy={json.dumps(strategy)}",
             "--trainer.enable_checkpointing=true", "--trainer.callbacks+=ModelCheckpoint",
             f"--trainer.callbacks.dirpath={tmp_path / 'ckpt'}",
             "--trainer.callbacks+=test_fsdp1.FSDPUnits", f"--trainer.callbacks.path={tmp_path / 'units.json'}"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "salsa_lightning"]
    proc = subprocess.run([*cmd, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]

    # one unit per decoder layer (the tiny Llama has 2) plus the root; each layer checkpointed; clipping at the root
    units = json.loads((tmp_path / "units.json").read_text())
    assert units == {"fsdp_units": 3, "checkpointed": 2, "precision": RootClippingFSDPPrecision.__name__}

    per_rank = [json.loads((tmp_path / f"sharded-loss.rank{r}.json").read_text()) for r in (0, 1)]
    sharded = [(a + b) / 2 for a, b in zip(*per_rank, strict=True)]  # each rank's loss is its half of the global batch
    assert sharded == pytest.approx(reference, rel=RTOL)
    assert reference[-1] < reference[0]  # it trained, so agreement is not the trivial one

    # the exported stage output is the plain HF model of the unsharded run (tied embeddings written once)
    a = load_file(str(tmp_path / "single" / "model.safetensors"))
    b = load_file(str(tmp_path / "sharded" / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], atol=1e-5, rtol=RTOL, msg=k)

    # state_dict_type "sharded": the Lightning checkpoint is a folder of per-rank shards plus metadata
    (ckpt,) = (tmp_path / "ckpt").iterdir()
    assert ckpt.is_dir() and (ckpt / "meta.pt").is_file() and (ckpt / ".metadata").is_file()


@pytest.mark.distributed
def test_fsdp1_reward_on_two_processes_matches_one_process(tiny_model_dir, tmp_path):
    """The reward stage (full weights + new head) under FSDP1: losses, exported model and the training-set reward
    statistics (a forward outside the training loop, run through the FSDP root) equal the 1-process run's."""
    from helpers import addition_preferences, reward_args
    from test_fsdp import assert_same_safetensors, mean_over_ranks, torchrun

    data = str(write_jsonl(tmp_path / "prefs.jsonl", addition_preferences(10)))

    def args(out: str) -> list[str]:
        return reward_args(str(tiny_model_dir), data, str(tmp_path / out), "--trainer.max_epochs=3",
                           "--data.val_fraction=0.2", "--trainer.limit_val_batches=0", "--model.optim.lr=5e-3",
                           "--trainer.enable_progress_bar=false", "--trainer.callbacks+=scale_helpers.LossHistory",
                           f"--trainer.callbacks.path={tmp_path / out}-loss")  # fmt: skip

    reference = loss_history(cli_main(args("single") + ["--data.batch_size=8"]))
    strategy = {"class_path": "salsa_lightning.strategies.DecoderLayerFSDPStrategy"}
    torchrun(args("sharded") + ["--data.batch_size=4", "--trainer.devices=2", f"--trainer.strategy={json.dumps(strategy)}"],
             tmp_path)  # fmt: skip
    assert mean_over_ranks(tmp_path / "sharded-loss") == pytest.approx(reference, rel=1e-4)
    assert reference[-1] < reference[0]
    assert_same_safetensors(tmp_path / "single" / "model.safetensors", tmp_path / "sharded" / "model.safetensors")
    single = json.loads((tmp_path / "single" / "salsa_manifest.json").read_text())["reward_stats"]
    sharded = json.loads((tmp_path / "sharded" / "salsa_manifest.json").read_text())["reward_stats"]
    assert sharded == pytest.approx(single, rel=1e-4)
