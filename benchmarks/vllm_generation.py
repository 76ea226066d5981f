"""Generation time, transformers' `generate` vs a colocated vLLM engine, as PPO's rollouts use them (issue 18).

    .venv-vllm/bin/python benchmarks/vllm_generation.py                 # embedded SmolLM2-135M, batch 8 and 64
    .venv-vllm/bin/python benchmarks/vllm_generation.py --dtype float32 --batches 8 64 --repeats 5

Both run in ONE process on the same prompts (the task suite's RL prompts, chat-templated), sampling at temperature
1.0 with exactly `--new-tokens` new tokens (EOS suppressed until then: transformers' `min_new_tokens`, vLLM's
`min_tokens`), so both do the same work. Calls alternate (hf, vllm, hf, vllm, ...) after one warm-up call each, so a
machine whose speed drifts drifts for both; the table shows the median seconds per batch and the ratio. vLLM binds
its OpenMP threads on start-up, which then applies to the transformers calls in the same process too (as it would
in a PPO run with `backend: vllm`). Run it with nothing else busy.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch


def prompts(tokenizer, n: int) -> list[list[int]]:
    from salsa_lightning.data.tasks import TaskSuiteConfig, build_task_suite

    rows = build_task_suite(TaskSuiteConfig(num_sft=0, num_prefs_train=0, num_prefs_test=0, num_rl_prompts=max(n, 8),
                                            num_eval=0))["rl_prompts.jsonl"]  # fmt: skip
    chats = [[{"role": "user", "content": r["prompt"]}] for r in rows]
    texts = [tokenizer.apply_chat_template(c, tokenize=False, add_generation_prompt=True) for c in chats]
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts[:n]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded:smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls of each backend per batch size")
    args = parser.parse_args()

    from salsa_lightning.data.collate import pad_sequences
    from salsa_lightning.models.loading import ModelSpec, load_causal_lm, load_tokenizer, resolve_model_path
    from salsa_lightning.vllm_engine import VllmEngine

    dtype = getattr(torch, args.dtype)
    path = resolve_model_path(args.model)
    tok = load_tokenizer(ModelSpec(path), padding_side="left")
    model = load_causal_lm(ModelSpec(path, dtype=args.dtype), trainable=False).eval()
    engine = VllmEngine(path, dtype, seed=0, context=2048)
    n_tok = args.new_tokens

    def hf(batch: list[list[int]]) -> None:
        ids = pad_sequences(batch, tok.pad_token_id, side="left")
        mask = pad_sequences([[1] * len(p) for p in batch], 0, side="left")
        with torch.no_grad():
            out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n_tok, min_new_tokens=n_tok,
                                 do_sample=True, temperature=1.0, top_k=None, top_p=None,
                                 pad_token_id=tok.pad_token_id)  # fmt: skip
        assert out.shape[1] - ids.shape[1] == n_tok

    def vllm(batch: list[list[int]]) -> None:
        out = engine.generate(batch, n_tok, [tok.eos_token_id], do_sample=True, min_new_tokens=n_tok, seed=0)
        assert all(len(s.token_ids) == n_tok for s in out)

    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{args.dtype}, {n_tok} new tokens, median of {args.repeats} alternating calls, load {os.getloadavg()[0]:.1f}")  # fmt: skip
    print("| batch | hf s/batch | vllm s/batch | vllm speed-up | hf tokens/s | vllm tokens/s |")
    print("|---|---|---|---|---|---|")
    for b in args.batches:
        batch = prompts(tok, b)
        times: dict[str, list[float]] = {"hf": [], "vllm": []}
        hf(batch), vllm(batch)  # warm-up
        for _ in range(args.repeats):
            for name, fn in (("hf", hf), ("vllm", vllm)):
                t0 = time.perf_counter()
                fn(batch)
                times[name].append(time.perf_counter() - t0)
        h, v = statistics.median(times["hf"]), statistics.median(times["vllm"])
        print(f"| {b} | {h:.2f} | {v:.2f} | {h / v:.2f}x | {b * n_tok / h:.0f} | {b * n_tok / v:.0f} |", flush=True)
    engine.close()


if __name__ == "__main__":
    main()
