"""Tiny seeds, a tiny reward model, and a model's own scores computed directly: shared by the landscape's and the
soup report's tests, which check that their seed and soup rows are exactly these."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from salsa_lightning.data import judge as gold
from salsa_lightning.evaluation.generation import encode_prompts, generate_responses
from salsa_lightning.models.loading import ModelSpec, load_causal_lm, load_tokenizer
from salsa_lightning.reward.scoring import RewardScorer

# Sampling, seeded: tiny random models answer every prompt with the same greedy token, sampling tells them apart.
# A batch size that splits the 3 prompts unevenly.
GEN = {"max_new_tokens": 5, "batch_size": 2, "do_sample": True, "temperature": 1.0}


def save_reward_model(path: Path, tokenizer) -> Path:
    """A tiny reward model with a fixed `score` head (a reward stage output for the scorer; nothing trained)."""
    from transformers import LlamaForSequenceClassification

    from salsa_lightning.models.tiny import make_tiny_model

    config = make_tiny_model(tokenizer, seed=7).config
    config.num_labels = 1
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        LlamaForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_lora_seed(path: Path, base_dir: Path, seed: int, tokenizer, r: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # init_lora_weights=False: non-zero A and B, so the seeds differ
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
        model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir), cfg)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "salsa_manifest.json").write_text(
        json.dumps({"stage": "sft", "format": "lora", "base_model": str(base_dir), "seed": seed})
    )
    return path


@torch.no_grad()
def direct_scores(
    model_dir: str, eval_file: str, reward_model: str, limit: int = 3
) -> tuple[list[list[int]], list[float], list[float]]:
    """A model's own responses, gold scores and rewards on the first `limit` eval prompts, generated from it alone
    with `GEN` (seed 0, as the stages seed every point)."""
    from salsa_lightning.evaluation.runtime import default_device
    from salsa_lightning.evaluation.settings import JudgedGeneration
    from salsa_lightning.landscape.run import load_eval_prompts

    prompts = load_eval_prompts(eval_file, limit, True)
    tokenizer = load_tokenizer(ModelSpec(model_dir), padding_side="left")
    ids, _ = encode_prompts(tokenizer, prompts.messages, 512)
    # on the stage's device; loaded before seeding, since PEFT draws an init for the adapter it then loads
    model = load_causal_lm(model_dir, trainable=False).to(default_device())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # the config's `seed`
        generated = generate_responses(model, tokenizer, ids, **GEN)
    texts = [g.text for g in generated]
    # the stages' scoring batches (`score_batch_size`, default): other batches round differently
    scorer = RewardScorer.from_output(
        reward_model, device=default_device(), batch_size=JudgedGeneration().score_batch_size
    )
    rewards = scorer.score(prompts.messages, texts).tolist()
    return [g.token_ids for g in generated], [gold.score(p, t) for p, t in zip(prompts.texts, texts)], rewards
