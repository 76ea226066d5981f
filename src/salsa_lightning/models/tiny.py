"""Tiny in-process models and tokenizers for tests, notebooks and benchmarks (no network needed).

The tokenizer is a byte-level BPE trained on a few sentences with a ChatML chat template — the same
template family as SmolLM2 — and, like SmolLM2, pads with its end-of-turn token, so that tests meet
the real-world case where pad == eos.
"""

from __future__ import annotations

from pathlib import Path

import torch

from salsa_lightning.models.spec import CHATML_TEMPLATE

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "What is 2 + 3? The answer is 5.",
    "Count the letters in the word banana. There are 6 letters.",
    "Reverse the list [1, 2, 3]: [3, 2, 1]. Sort the list [3, 1, 2]: [1, 2, 3].",
    "Convert 3 kilometres to metres: 3000 metres.",
    'Answer in upper case: HELLO WORLD. Reply as JSON: {"answer": 42}',
    "You are a helpful assistant. Please answer the question briefly and correctly.",
    "0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 100 1000",
]


def make_tiny_tokenizer(vocab_size: int = 384, pad_token: str | None = "<|im_end|>"):
    """A byte-level BPE tokenizer with a ChatML template; `pad_token=None` gives one without padding."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        unk_token="<|endoftext|>",
        pad_token=pad_token,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def make_tiny_model(tokenizer, seed: int = 0, hidden_size: int = 32, num_layers: int = 2, tie: bool = True):
    """A randomly initialised 2-layer Llama whose vocabulary matches `tokenizer`."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def save_tiny_checkpoint(path: str | Path, seed: int = 0, **kwargs) -> Path:
    """Write a tiny model + tokenizer in HF format to `path` (a 'local directory' model id)."""
    path = Path(path)
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(tokenizer, seed=seed, **kwargs)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
