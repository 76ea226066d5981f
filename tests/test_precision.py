"""Linear weights cast once for a generate under bf16 autocast: the same tokens and logits as autocast's per-call
casts, the weights put back, and nothing done where autocast would not cast."""

from __future__ import annotations

import pytest
import torch

from salsa_lightning.models.precision import linear_weights_cast_once
from salsa_lightning.models.tiny import make_tiny_model


@pytest.fixture()
def lora_model(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = make_tiny_model(tiny_tokenizer, seed=3, tie=True)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    return model.eval()


def bf16_autocast():
    return torch.autocast("cpu", dtype=torch.bfloat16, cache_enabled=False)  # as Lightning's bf16-mixed


def test_generate_gives_autocasts_tokens_and_logits(lora_model, tiny_tokenizer):
    ids = torch.randint(3, len(tiny_tokenizer), (3, 7), generator=torch.Generator().manual_seed(0))
    kwargs = dict(max_new_tokens=12, do_sample=True, top_k=0, temperature=1.0, pad_token_id=0,
                  output_logits=True, return_dict_in_generate=True)  # fmt: skip
    runs = []
    for cast_once in (False, True):
        torch.manual_seed(5)
        with torch.no_grad(), bf16_autocast():
            with linear_weights_cast_once(lora_model) if cast_once else torch.no_grad():
                runs.append(lora_model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **kwargs))
    plain, cast = runs
    assert torch.equal(plain.sequences, cast.sequences)
    for a, b in zip(plain.logits, cast.logits, strict=True):
        assert torch.equal(a, b)  # bit for bit: the same rounding, the same matmuls


def test_weights_are_swapped_inside_and_put_back(lora_model):
    before = {n: (p, p.detach().clone()) for n, p in lora_model.named_parameters(remove_duplicate=False)}
    linears = [m for m in lora_model.modules() if isinstance(m, torch.nn.Linear)]
    embed = lora_model.get_input_embeddings()
    head = lora_model.get_output_embeddings()
    assert head.weight is embed.weight  # tied
    with torch.no_grad(), bf16_autocast(), linear_weights_cast_once(lora_model):
        assert all(m.weight.dtype == torch.bfloat16 for m in linears)
        assert head.weight.dtype == torch.bfloat16 and embed.weight.dtype == torch.float32  # autocast leaves embeddings
    after = dict(lora_model.named_parameters(remove_duplicate=False))
    assert head.weight is embed.weight
    for name, (param, value) in before.items():
        assert after[name] is param and torch.equal(param, value)


@pytest.mark.parametrize("where", ["no autocast", "grad enabled", "bf16 weights"])
def test_nothing_is_swapped_where_autocast_would_not_cast(lora_model, where):
    import contextlib

    grad = torch.enable_grad() if where == "grad enabled" else torch.no_grad()
    cast = contextlib.nullcontext() if where == "no autocast" else bf16_autocast()
    if where == "bf16 weights":
        lora_model.to(torch.bfloat16)  # a bf16 model: the matmuls read its weights as they are
    weights = [m.weight for m in lora_model.modules() if isinstance(m, torch.nn.Linear)]
    with grad, cast, linear_weights_cast_once(lora_model):
        now = [m.weight for m in lora_model.modules() if isinstance(m, torch.nn.Linear)]
        assert len(now) == len(weights) and all(a is b for a, b in zip(now, weights))


# ---------------------------------------------------------------- frozen Linear weights held in bf16 for good
def _lora(model):
    from peft import LoraConfig, get_peft_model

    model.requires_grad_(False)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False))


def test_frozen_linears_held_in_bf16_give_autocasts_logits_and_gradients(tiny_tokenizer):
    """Under bf16 autocast a base whose frozen Linear weights are stored in bf16 computes what the float32 base
    computes, bit for bit, forward and backward (the LoRA gradients), because autocast casts to the same values."""
    import copy

    from salsa_lightning.models.precision import hold_frozen_linears_in

    base = make_tiny_model(tiny_tokenizer, seed=3, tie=True).requires_grad_(False)
    held = copy.deepcopy(base)
    assert hold_frozen_linears_in(held, torch.bfloat16) > 0
    plain, held = _lora(base), _lora(held)
    held.load_state_dict(plain.state_dict())  # the same adapter weights in both
    ids = torch.randint(3, len(tiny_tokenizer), (3, 9), generator=torch.Generator().manual_seed(0))
    out = []
    for model in (plain, held):
        with bf16_autocast():
            logits = model(input_ids=ids).logits
        logits.float().logsumexp(-1).sum().backward()
        out.append((logits, {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (a, grads_a), (b, grads_b) = out
    assert torch.equal(a, b)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        assert torch.equal(grads_a[n], grads_b[n]), n
    # what is bf16: the base's own Linear weights; what stays float32: embeddings, the tied head, norms, adapters
    for n, p in held.named_parameters():
        want = torch.bfloat16 if (".base_layer." in n and "lm_head" not in n) else torch.float32
        assert p.dtype == want, n
    assert held.get_output_embeddings().weight is held.get_input_embeddings().weight


def test_held_model_owns_its_float32_tensors_not_the_file_map(tiny_tokenizer, tmp_path):
    """A model read from safetensors keeps its tensors in a map of the file; after holding, no tensor of it is one
    of those any more (so the map, and the float32 pages the cast touched, can go)."""
    from transformers import AutoModelForCausalLM

    from salsa_lightning.models.precision import hold_frozen_linears_in

    make_tiny_model(tiny_tokenizer, seed=3, tie=True).save_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).requires_grad_(False)
    before = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    hold_frozen_linears_in(model, torch.bfloat16)
    after = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    assert not before & after
    assert {p.dtype for p in model.parameters()} == {torch.float32, torch.bfloat16}


def test_trainable_linears_are_not_cast(tiny_tokenizer):
    from salsa_lightning.models.precision import hold_frozen_linears_in

    model = make_tiny_model(tiny_tokenizer, seed=3, tie=False)
    model.requires_grad_(False)
    head = model.get_output_embeddings().requires_grad_(True)  # an untied head, trainable here
    hold_frozen_linears_in(model, torch.bfloat16)
    assert head.weight.dtype == torch.float32
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
