"""How evaluate loads and scores its models: a frozen adapter folded into its base, response log-probs from a
padded batch equal to one unpadded forward per row, and no reference pass for a system that is the reference."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console

from salsa_lightning.evaluation import scoring
from salsa_lightning.evaluation.config import EvalConfig
from salsa_lightning.evaluation.generation import response_logprobs
from salsa_lightning.evaluation.responses import Responses
from salsa_lightning.evaluation.runtime import load_frozen_lm
from salsa_lightning.models.loading import is_peft_model
from salsa_lightning.reward.scoring import RewardScorer


@pytest.fixture(scope="module")
def adapter_dir(tiny_model_dir, tmp_path_factory):
    """A LoRA adapter on the tiny base with random (non-zero) B matrices, so that it changes the model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    model = get_peft_model(base, cfg)
    out = tmp_path_factory.mktemp("adapter") / "sft"
    model.save_pretrained(out)
    return out


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_frozen_adapter_is_folded_into_its_base_with_the_same_outputs(adapter_dir, tiny_model_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    folded = load_frozen_lm(str(adapter_dir), "float32")
    assert not is_peft_model(folded)
    assert not any("lora" in name for name, _ in folded.named_modules())
    assert not any(p.requires_grad for p in folded.parameters())

    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(1))
    base_logits = _logits(base, ids)
    unfolded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    torch.testing.assert_close(_logits(folded, ids), _logits(unfolded, ids), rtol=0, atol=1e-5)
    assert (_logits(folded, ids) - base_logits).abs().max() > 1e-3  # the adapter is in it


def test_response_logprobs_of_a_padded_batch_equal_one_unpadded_forward_per_row(adapter_dir):
    model = load_frozen_lm(str(adapter_dir), "float32")
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (3, 7, 5, 4)]
    responses = [torch.randint(3, 300, (n,), generator=g).tolist() for n in (6, 1, 0, 4)]  # one empty
    got = response_logprobs(model, prompts, responses, batch_size=3, pad_token_id=0)
    for p, r, lp in zip(prompts, responses, got, strict=True):
        assert lp.shape == (len(r),)
        if not r:
            continue
        logits = _logits(model, torch.tensor([p + r]))[0]  # (P+R, V), no padding
        want = torch.log_softmax(logits[len(p) - 1 : -1], dim=-1).gather(-1, torch.tensor(r)[:, None])[:, 0]
        torch.testing.assert_close(lp, want, rtol=0, atol=1e-5)


def _responses(logp: list[torch.Tensor]) -> Responses:
    n = len(logp)
    return Responses([[]] * n, [[5, 6]] * n, [""] * n, [[7] * len(x) for x in logp], [True] * n, 0, logp=logp)


def test_a_system_that_is_the_kl_reference_is_not_scored_again(tmp_path, monkeypatch, tiny_tokenizer):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    loaded, scored, batch_sizes = [], [], []

    def fake_load(path, dtype):
        loaded.append(path)
        return object()

    def fake_logprobs(model, prompt_ids, response_ids, batch_size, pad_token_id):
        scored.append(len(response_ids))
        batch_sizes.append(batch_size)
        return [torch.full((len(r),), -1.0) for r in response_ids]

    monkeypatch.setattr(scoring, "load_frozen_lm", fake_load)
    monkeypatch.setattr(scoring, "response_logprobs", fake_logprobs)
    own = [torch.tensor([-0.5, -0.25]), torch.tensor([-2.0])]
    responses = {"a": {"id": _responses(own)}, "b": {"id": _responses([torch.tensor([-0.5])])}}
    tokenizers = {("System", "a"): tiny_tokenizer, ("System", "b"): tiny_tokenizer}
    cfg = EvalConfig(systems={"a": str(a), "b": str(b)}, eval_files={}, kl_reference={"init": f"{a}/"},
                     batch_size=64, score_batch_size=3)  # fmt: skip

    scoring.measure_kl(cfg, responses, tokenizers, Console(quiet=True))
    assert loaded == [f"{a}/"] and scored == [1]  # the reference is loaded once, for `b` only
    assert batch_sizes == [3]  # the scoring forwards' batch, not generation's
    assert responses["a"]["id"].kl["init"] == [0.0, 0.0]
    assert responses["b"]["id"].kl["init"] == [pytest.approx(0.5)]  # -0.5 - (-1.0)

    # every system is the reference: nothing is loaded at all
    loaded.clear()
    only_a = EvalConfig(systems={"a": str(a)}, eval_files={}, kl_reference={"init": str(a)})
    scoring.measure_kl(only_a, {"a": {"id": _responses(own)}}, tokenizers, Console(quiet=True))
    assert loaded == []


def test_reward_scores_of_length_sorted_batches_come_back_in_input_order(tiny_model_dir):
    """The scorer batches the longest rows together; each score still belongs to its own row and equals that row
    scored alone."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=1).eval()
    model.config.pad_token_id = tokenizer.pad_token_id
    prompts = ["1+1?", "what is 12 + 30, please answer quickly", "2+2?", "a much longer question " * 6, "3+4?"]
    responses = ["2", "42", "4 " * 9, "yes", "7"]
    batched = RewardScorer(model, tokenizer, batch_size=2).score(prompts, responses)
    alone = torch.cat(
        [RewardScorer(model, tokenizer, batch_size=1).score([p], [r]) for p, r in zip(prompts, responses)]
    )
    assert batched.shape == (5,) and batched.dtype == torch.float32
    torch.testing.assert_close(batched, alone, rtol=1e-5, atol=1e-5)
    assert len(set(batched.tolist())) == 5  # distinct scores: a permuted result could not pass the comparison
