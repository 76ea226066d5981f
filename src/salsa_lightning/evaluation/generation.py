"""Batched generation of evaluation responses, and the log-probabilities of those responses under any model.

Prompts are rendered with the chat template and left-padded, so every row's next token sits in the last
column and `generate` can run a batch with its KV cache. Rows are batched by length (longest first) to
waste little compute on padding, and returned in the input order.

`response_logprobs` scores stored responses with a forward over `[prompt | response]`; the KL of a system
to a reference is the masked sum of `kl_k1` over the two models' log-probs of the SAME tokens, so both
calls must see the same batches: the batching depends only on the responses, never on the model.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from salsa_lightning.data.chat import Messages
from salsa_lightning.data.collate import length_batches, pad_sequences
from salsa_lightning.rl import logprobs_from_logits, position_ids_from_mask, response_logits, response_mask


@dataclass
class Generated:
    """One response: its text, its token ids (up to and including the first end-of-turn token, if any)."""

    text: str
    token_ids: list[int]
    finished: bool  # ended with an end-of-turn token rather than at max_new_tokens


def encode_prompts(tokenizer, prompts: Sequence[Messages], max_prompt_length: int) -> tuple[list[list[int]], int]:
    """Chat-templated prompt ids (ending in the assistant header) and how many were cut to their last tokens."""
    out, truncated = [], 0
    for messages in prompts:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > max_prompt_length:
            truncated += 1
            ids = ids[-max_prompt_length:]
        out.append(ids)
    return out, truncated


def eos_ids(tokenizer, model=None) -> list[int]:
    """Every id that ends a turn: the tokenizer's EOS and whatever the model's generation config adds."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    extra = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if extra is not None:
        ids.update([extra] if isinstance(extra, int) else extra)
    return sorted(ids)


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_responses(
    model,
    tokenizer,
    prompt_ids: Sequence[list[int]],
    max_new_tokens: int,
    batch_size: int,
    do_sample: bool = False,
    temperature: float = 1.0,
    on_batch: Callable[[int], None] | None = None,
) -> list[Generated]:
    """Responses to `prompt_ids` (greedy unless `do_sample`), in input order; `on_batch(k)` after each k prompts."""
    from transformers import GenerationConfig

    device = _device(model)
    stop = eos_ids(tokenizer, model)
    # a full GenerationConfig, not the model's: a checkpoint's own top_p/temperature defaults must not leak in
    gen_config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=None,
        top_k=None,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=stop,
        use_cache=True,
    )
    results: list[Generated | None] = [None] * len(prompt_ids)
    for batch in length_batches([len(p) for p in prompt_ids], batch_size):
        seqs = [prompt_ids[i] for i in batch]
        ids = pad_sequences(seqs, tokenizer.pad_token_id, side="left").to(device)  # (b, P)
        mask = pad_sequences([[1] * len(s) for s in seqs], 0, side="left").to(device)  # (b, P)
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=gen_config)
        response = out[:, ids.shape[1] :].cpu()  # (b, R)
        real = response_mask(response, stop)  # (b, R): up to and including the first EOS
        for row, i in enumerate(batch):
            tokens = response[row][real[row]].tolist()
            finished = bool(tokens) and tokens[-1] in stop
            text = tokenizer.decode(tokens, skip_special_tokens=True)
            results[i] = Generated(text=text, token_ids=tokens, finished=finished)
        if on_batch is not None:
            on_batch(len(batch))
    return results  # type: ignore[return-value]


@torch.no_grad()
def response_logprobs(
    model, prompt_ids: Sequence[list[int]], response_ids: Sequence[list[int]], batch_size: int, pad_token_id: int
) -> list[torch.Tensor]:
    """log π(y_t | x, y_<t) of each stored response token under `model`: one float32 (len(y),) tensor per row.

    A forward over left-padded prompts followed by right-padded responses, with position ids counted over
    real tokens only, so each row sees exactly the context it was generated from.
    """
    device = _device(model)
    out: list[torch.Tensor | None] = [None] * len(prompt_ids)
    lengths = [len(p) + len(r) for p, r in zip(prompt_ids, response_ids, strict=True)]
    for batch in length_batches(lengths, batch_size):
        prompts = [prompt_ids[i] for i in batch]
        responses = [response_ids[i] or [pad_token_id] for i in batch]  # an empty response: one dummy, dropped below
        p_ids = pad_sequences(prompts, pad_token_id, side="left")  # (b, P)
        p_mask = pad_sequences([[1] * len(s) for s in prompts], 0, side="left")  # (b, P)
        r_ids = pad_sequences(responses, pad_token_id, side="right")  # (b, R)
        r_mask = pad_sequences([[1] * len(s) for s in responses], 0, side="right")  # (b, R)
        ids = torch.cat([p_ids, r_ids], dim=1).to(device)  # (b, P+R)
        mask = torch.cat([p_mask, r_mask], dim=1).to(device)  # (b, P+R)
        # only the R + 1 last positions through the vocabulary projection: the prompt's logits are never used
        keep = r_ids.shape[1] + 1
        logits = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=position_ids_from_mask(mask),
            use_cache=False,
            logits_to_keep=keep,
        ).logits  # (b, R+1, V)
        logp = logprobs_from_logits(response_logits(logits, r_ids.shape[1]), r_ids.to(device)).float().cpu()  # (b, R)
        for row, i in enumerate(batch):
            out[i] = logp[row, : len(response_ids[i])]
    return out  # type: ignore[return-value]
