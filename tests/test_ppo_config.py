"""PPO's settings check themselves once, when parsed, naming the field as the user writes it; the run-length
arithmetic that sizes the learning-rate schedule."""

from __future__ import annotations

import pytest

from salsa_lightning.errors import SalsaError
from salsa_lightning.modules.common import OptimSpec
from salsa_lightning.ppo.config import GenerationSpec, KLHackSpec, PPOSpec, check_merge_lora, every
from salsa_lightning.ppo.schedule import optimizer_steps_per_rollout, rollouts_in_run


@pytest.mark.parametrize(
    "spec,field",
    [
        (lambda: PPOSpec(ppo_epochs=0), "model.ppo.ppo_epochs"),
        (lambda: PPOSpec(mini_batch_size=0), "model.ppo.mini_batch_size"),
        (lambda: PPOSpec(kl_coef=-0.1), "model.ppo.kl_coef"),
        (lambda: PPOSpec(kl_coef=float("nan")), "model.ppo.kl_coef"),
        (lambda: PPOSpec(cliprange=0.0), "model.ppo.cliprange"),
        (lambda: PPOSpec(lam=1.5), "model.ppo.lam"),
        (lambda: PPOSpec(kl_target=0.0), "model.ppo.kl_target"),
        (lambda: PPOSpec(missing_eos_penalty=-1.0), "model.ppo.missing_eos_penalty"),
        (lambda: PPOSpec(max_grad_norm=0.0), "model.ppo.max_grad_norm"),
        (lambda: PPOSpec(logged_kl_every=0), "model.ppo.logged_kl_every"),
        (lambda: PPOSpec(logprob_check_every=-1), "model.ppo.logprob_check_every"),
        (lambda: GenerationSpec(max_new_tokens=0), "model.generation.max_new_tokens"),
        (lambda: GenerationSpec(temperature=0.0), "model.generation.temperature"),
        (lambda: GenerationSpec(top_p=0.0), "model.generation.top_p"),
        (lambda: GenerationSpec(max_new_tokens=4, min_new_tokens=5), "model.generation.min_new_tokens"),
        (lambda: KLHackSpec(min_fraction=1.5), "model.kl_hack.min_fraction"),
        (lambda: KLHackSpec(min_fraction=0.0), "model.kl_hack.min_fraction"),
        (lambda: KLHackSpec(patience=0), "model.kl_hack.patience"),
    ],
)
def test_bad_values_name_the_field_and_a_fix(spec, field):
    with pytest.raises(SalsaError, match="set it to e.g.") as err:
        spec()
    assert f"`{field}`" in str(err.value)
    assert "min_length_fraction" not in str(err.value) and "reference_updates" not in str(err.value)


def test_defaults_are_valid_and_sampling_kwargs_follow_do_sample():
    PPOSpec(), KLHackSpec()
    assert GenerationSpec(top_k=5).sampling_kwargs() == {
        "do_sample": True,
        "temperature": 1.0,
        "top_k": 5,
        "top_p": 1.0,
    }
    assert GenerationSpec(do_sample=False, temperature=0.7).sampling_kwargs() == {"do_sample": False}


@pytest.mark.parametrize(
    "layout,quantized,sharded,why",
    [("full", False, False, "layout: full"), ("lora", True, False, "4-bit"), ("lora", False, True, "FSDP")],
)
def test_merge_lora_is_refused_where_it_cannot_work(layout, quantized, sharded, why):
    with pytest.raises(SalsaError, match="set it to e.g.") as err:
        check_merge_lora(layout, quantized, sharded)
    assert "`model.generation.merge_lora` must be false" in str(err.value) and why in str(err.value)
    check_merge_lora("lora", quantized=False, sharded=False)  # the one place it works


def test_every_counts_the_first_rollout_then_every_nth():
    assert [i for i in range(7) if every(3, i)] == [0, 3, 6]  # rollouts 1, 4, 7
    assert [i for i in range(3) if every(1, i)] == [0, 1, 2]
    assert not any(every(0, i) for i in range(5))  # 0 = never


def test_optimizer_steps_per_rollout():
    assert optimizer_steps_per_rollout(8, ppo_epochs=2, mini_batch_size=4) == 4
    assert optimizer_steps_per_rollout(5, ppo_epochs=2, mini_batch_size=4) == 4  # minibatches of 4 and 1
    assert optimizer_steps_per_rollout(3, ppo_epochs=1, mini_batch_size=4) == 1  # mb = min(4, 3)


def naive_rollouts(batch_rows, max_epochs, max_steps, ppo_epochs, mb):
    """Play the run: Lightning checks both limits after every training step (one rollout)."""
    rollouts = steps = 0
    epoch = 0
    while max_epochs in (None, -1) or epoch < max_epochs:
        for rows in batch_rows:
            rollouts += 1
            steps += optimizer_steps_per_rollout(rows, ppo_epochs, mb)
            if max_steps not in (None, -1) and steps >= max_steps:
                return rollouts
        epoch += 1
    return rollouts


@pytest.mark.parametrize("batch_rows", [[8], [8, 8, 8], [8, 8, 3]])
@pytest.mark.parametrize("max_epochs", [1, 2, 5, -1])
@pytest.mark.parametrize("max_steps", [1, 4, 5, 8, 17, 40, -1])
def test_rollouts_in_run_matches_playing_the_run(batch_rows, max_epochs, max_steps):
    if max_epochs == -1 and max_steps == -1:
        return  # Lightning sets max_epochs=1000 itself then
    expected = naive_rollouts(batch_rows, max_epochs, max_steps, ppo_epochs=2, mb=4)
    assert rollouts_in_run(batch_rows, max_epochs, max_steps, ppo_epochs=2, mini_batch_size=4) == expected


@pytest.mark.parametrize(
    "build,field",
    [
        (
            lambda: OptimSpec(lr=0.0),
            "model.optim.lr",
        ),
        (
            lambda: OptimSpec(lr=-1e-4),
            "model.optim.lr",
        ),
        (
            lambda: OptimSpec(warmup_ratio=1.0),
            "model.optim.warmup_ratio",
        ),
        (
            lambda: OptimSpec(betas=(0.9, 1.0)),
            "model.optim.betas",
        ),
    ],
)
def test_optimizer_settings_are_checked_when_parsed(build, field):
    with pytest.raises(SalsaError, match="set it to e.g.") as err:
        build()
    assert f"`{field}`" in str(err.value)


@pytest.mark.parametrize(
    "module,kwargs,field",
    [
        ("salsa_lightning.data.sft:SFTDataModule", {"batch_size": 0}, "data.batch_size"),
        ("salsa_lightning.data.sft:SFTDataModule", {"val_fraction": 1.0}, "data.val_fraction"),
        ("salsa_lightning.data.preferences:PreferenceDataModule", {"max_length": 0}, "data.max_length"),
        ("salsa_lightning.data.preferences:PreferenceDataModule", {"val_fraction": 0.0}, "data.val_fraction"),
        ("salsa_lightning.data.prompts:PromptDataModule", {"batch_size": -2}, "data.batch_size"),
        ("salsa_lightning.data.prompts:PromptDataModule", {"max_prompt_length": 0}, "data.max_prompt_length"),
        ("salsa_lightning.data.prompts:PromptDataModule", {"limit": 0}, "data.limit"),
    ],
)
def test_data_module_numbers_are_checked_when_parsed(module, kwargs, field):
    import importlib

    mod, _, name = module.partition(":")
    cls = getattr(importlib.import_module(mod), name)
    with pytest.raises(SalsaError, match="set it to e.g.") as err:
        cls("rows.jsonl", **kwargs)  # checked before the data file is even looked at
    assert f"`{field}`" in str(err.value)
