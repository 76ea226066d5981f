"""PPOModule: PPO with a KL anchor — the SFT init (PPO, paper eq. 2), the soup (SALSA, eq. 4), or several
anchors averaged (MKL, eq. 5). The math is `salsa_lightning.rl`; this module orchestrates one rollout and
`ppo_epochs` × minibatches of clipped updates per training step (manual optimisation)."""

from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from salsa_lightning import rl
from salsa_lightning.data.collate import pad_sequences
from salsa_lightning.data.preferences import conversation
from salsa_lightning.distributed import FSDPSpec, full_state_dict, uses_fsdp2, world_size
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import (
    ModelSpec,
    base_model_of,
    canonical_model_ref,
    load_tokenizer,
    resolve_model_path,
)
from salsa_lightning.modules.common import OptimSpec, current_seed, format_output_dir, save_stage_output, scalar_metrics
from salsa_lightning.ppo.stack import InMemorySoup, build_stack
from salsa_lightning.reward.model import reward_stats
from salsa_lightning.stage import check_output_dir, read_manifest


@dataclass
class GenerationSpec:
    """Sampling settings for rollouts (transformers `generate`)."""

    max_new_tokens: int = 64
    """Longest response; a response that reaches it without EOS can be penalised (`missing_eos_penalty`)."""
    temperature: float = 1.0
    """Sampling temperature; log-probs are computed at the same temperature."""
    top_k: int = 0
    """Top-k filter (0 = off)."""
    top_p: float = 1.0
    """Nucleus filter (1.0 = off)."""
    do_sample: bool = True
    """False = greedy rollouts (deterministic; for debugging and for comparing runs, not for training)."""
    min_new_tokens: int = 0
    """EOS is suppressed until a response has this many tokens (0 = off)."""


@dataclass
class PPOSpec:
    """PPO hyper-parameters (TRL's names where they exist)."""

    ppo_epochs: int = 2
    """Passes over each rollout batch (paper A.3: 2)."""
    mini_batch_size: int = 4
    """Rows per clipped update."""
    cliprange: float = 0.2
    """Policy ratio clip ε."""
    cliprange_value: float = 0.2
    """Value clip ε_v."""
    vf_coef: float = 0.1
    """Weight of the value loss."""
    gamma: float = 1.0
    """Discount."""
    lam: float = 0.95
    """GAE λ."""
    whiten_advantages: bool = True
    """Whiten advantages over real tokens."""
    kl_coef: float = 0.05
    """Initial β (paper A.3: 0.2 for PPO, 0.01 for SALSA)."""
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    """Per-token KL estimate in the reward."""
    kl_target: float | None = None
    """Adaptive β toward this KL per response (Ziegler et al.); None = fixed β."""
    kl_horizon: int = 10000
    """Adaptive controller horizon."""
    missing_eos_penalty: float | None = None
    """Subtracted from the score of a response with no EOS (None = off)."""
    normalize_reward: bool = False
    """Normalise scores with the reward stage's training-set mean/std."""
    max_grad_norm: float = 1.0
    """Gradient clipping."""
    max_nonfinite_in_a_row: int = 3
    """Stop after this many consecutive updates skipped for NaN/inf."""


@dataclass
class KLHackSpec:
    """Paper §A.4: with a large β the policy can shrink responses toward zero length (zero KL)."""

    min_fraction: float = 0.25
    """Alarm when the mean response length falls below this fraction of its starting value."""
    action: Literal["warn", "stop", "off"] = "warn"
    """Warn, or stop training."""
    patience: int = 2
    """Consecutive updates below the threshold before the alarm."""


class PPOModule(L.LightningModule):
    """PPO / SALSA / MKL. Anchor `init` = PPO baseline, `soup` = SALSA, a list of model dirs = MKL."""

    def __init__(
        self,
        policy_init: str,
        reward_model: str | None = None,
        reward_fn: str | None = None,
        anchor: str | list[str] = "init",
        soup: str | None = None,
        soup_inputs: list[str] | None = None,
        soup_weights: list[float] | None = None,
        soup_alpha: float | None = None,
        layout: Literal["auto", "full", "lora"] = "auto",
        model: ModelSpec | None = None,
        value_head: Literal["copy", "reinit"] = "copy",
        ppo: PPOSpec | None = None,
        generation: GenerationSpec | None = None,
        optim: OptimSpec | None = None,
        kl_hack: KLHackSpec | None = None,
        sample_table_every: int = 10,
        output_dir: str | None = None,
        overwrite: bool = False,
        fsdp: FSDPSpec | None = None,
    ):
        """
        Args:
            policy_init: The SFT stage output the policy starts from (seed 1: the paper's π_ref).
            reward_model: The reward stage output; the critic starts from it too.
            reward_fn: Instead of a reward model, a programmatic reward "module:function" called as
                f(prompts: list of message lists, responses: list[str]) -> list[float] (e.g. a gold judge);
                the critic then starts from the policy with a zero head.
            anchor: `init` (PPO), `soup` (SALSA), or a list of model directories (MKL: mean of the per-anchor KLs).
            soup: The soup stage output: the SALSA anchor, and for every run the model `objective/kl_soup` is
                measured against (reviewers asked for KL to both init and soup).
            soup_inputs: Instead of `soup`, build the soup in memory from these SFT outputs (the policy's seed
                first), by the soup API: exact cat-merge for LoRA adapters, a weighted average for full weights.
            soup_weights: Weights of `soup_inputs` (uniform by default; must sum to 1).
            soup_alpha: Two inputs only: weights (1 - α, α), the paper's eq. 3 (α = 0.5 by default).
            layout: `lora` = one frozen base with adapters (needs adapter outputs on one base); `full` = separate
                models; `auto` = lora when the policy and reward model are adapters.
            model: dtype / attention settings applied when loading every model (its name_or_path is ignored).
            value_head: Critic head copied from the reward model, or zero-initialised.
            ppo: PPO hyper-parameters.
            generation: Rollout sampling.
            optim: AdamW for policy + critic (paper A.3: lr 2e-6; 1e-7 for Gemma).
            kl_hack: KL-hack monitor (paper §A.4).
            sample_table_every: Print a Rich table of prompts, responses and scores every N updates (0 = never).
            output_dir: Where the trained policy is written (HF format, adapter or full); `{seed}` is filled in.
            overwrite: Replace `output_dir` if it exists.
            fsdp: FSDP2 settings, used under `ModelParallelStrategy`: every model of the stack is sharded per
                decoder layer (the LoRA layout shards its one base with all adapters); rollouts generate with the
                policy gathered once per rollout (`gather_for_generation`) and all ranks in step (`synced_gpus`).
        """
        super().__init__()
        self.automatic_optimization = False
        self.ppo = ppo or PPOSpec()
        rl.check_kl_coef(self.ppo.kl_coef)
        self.gen = generation or GenerationSpec()
        self.optim = optim or OptimSpec(lr=2e-6, warmup_ratio=0.0, schedule="linear")
        self.kl_hack = kl_hack or KLHackSpec()
        self.spec = model or ModelSpec()
        self.fsdp = fsdp or FSDPSpec()
        if (reward_model is None) == (reward_fn is None):
            raise SalsaError(
                "Set exactly one of `reward_model` (a reward stage output) and `reward_fn` (module:function)."
            )
        if soup is not None and soup_inputs:
            raise SalsaError("Set either `soup` (a soup stage output) or `soup_inputs` (built in memory), not both.")
        if soup_inputs:
            from salsa_lightning.soup.api import resolve_weights

            weights = resolve_weights(len(soup_inputs), soup_weights, alpha=soup_alpha)
            soup = InMemorySoup(tuple(soup_inputs), tuple(weights))
        self.policy_init, self.reward_model, self.soup, self.layout = policy_init, reward_model, soup, layout
        self.reward_fn = _import_callable(reward_fn) if reward_fn else None
        self.reward_norm = None  # read once here (not every rollout), so a missing file fails before training
        if self.ppo.normalize_reward and reward_model is not None:
            self.reward_norm = reward_stats(resolve_model_path(reward_model))
            if not self.reward_norm:
                raise SalsaError(f"normalize_reward needs reward stats in {reward_model}; re-run the reward stage.")
        self.value_head, self.sample_table_every, self.overwrite = value_head, sample_table_every, overwrite
        self.output_dir = format_output_dir(output_dir)
        if self.output_dir is not None:
            check_output_dir(self.output_dir, overwrite)
        self.anchor_names, self.anchor_paths = self._resolve_anchors(anchor)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(
            ModelSpec(**{**self.spec.__dict__, "name_or_path": policy_init}), padding_side="left"
        )
        self._check_tokenizers()
        self.stack = None
        # PPO keeps every model in eval mode (no dropout) on purpose; Lightning would warn about it at fit start
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        self.kl_ctl = rl.make_kl_controller(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
        self.monitor = rl.KLHackMonitor(self.kl_hack.min_fraction, patience=self.kl_hack.patience)
        self.nonfinite_in_a_row = 0
        self.updates_done = 0
        self.resolved_config: str | None = None
        self.history: list[dict[str, float]] = []

    # ---------------------------------------------------------------- set-up
    def _resolve_anchors(self, anchor: str | list[str]) -> tuple[list[str], dict[str, str]]:
        """Names of the anchors the KL penalty uses, and every model to load as an anchor (the logged ones too)."""
        paths = {"init": self.policy_init}
        if self.soup is not None:
            paths["soup"] = self.soup
            self._warn_if_soup_lacks_init()
        if anchor == "init":
            names = ["init"]
        elif anchor == "soup":
            if self.soup is None:
                raise SalsaError(
                    "`anchor: soup` (SALSA) needs `soup:` set to a soup stage output; run the soup stage first."
                )
            names = ["soup"]
        elif isinstance(anchor, list) and anchor:
            names = []
            for i, path in enumerate(anchor):
                name = next((k for k, v in paths.items() if v == path), f"anchor{i}")
                paths[name] = path
                names.append(name)
        else:
            raise SalsaError(
                f"Unknown anchor {anchor!r}; use `init` (PPO), `soup` (SALSA) or a list of model directories (MKL)."
            )
        return names, paths

    def _warn_if_soup_lacks_init(self) -> None:
        if isinstance(self.soup, InMemorySoup):
            inputs = [str(Path(p).resolve()) for p in self.soup.inputs]
        else:
            manifest = read_manifest(resolve_model_path(self.soup)) or {}
            inputs = [str(Path(i["path"] if isinstance(i, dict) else i).resolve()) for i in manifest.get("inputs", [])]
        if inputs and str(Path(self.policy_init).resolve()) not in inputs:
            warnings.warn(
                f"The soup {self.soup} was not made from the policy's starting model {self.policy_init}; SALSA's soup "
                "should include it (paper eq. 3)."
            )

    def _check_tokenizers(self) -> None:
        vocab = self.tokenizer.get_vocab()
        models = {**self.anchor_paths, "reward": self.reward_model}
        if isinstance(self.soup, InMemorySoup):
            models.update({f"soup input {i}": p for i, p in enumerate(self.soup.inputs)})
        for name, path in models.items():
            if path is None or path == self.policy_init or isinstance(path, InMemorySoup):
                continue
            other = load_tokenizer(ModelSpec(**{**self.spec.__dict__, "name_or_path": path}))
            if other.get_vocab() != vocab:
                raise SalsaError(
                    f"The {name} model ({path}) uses a different tokenizer from the policy; log-probs and scores would "
                    "not be comparable, so train every stage from the same base model."
                )

    def configure_model(self) -> None:
        if self.stack is None:
            # PEFT draws random initial LoRA weights before loading saved ones; fork the RNG so that which
            # anchors are loaded never changes the rollouts (PPO and SALSA runs then share sampling noise)
            with torch.random.fork_rng(devices=[]):
                sharding = (self.device_mesh, self.fsdp) if uses_fsdp2(self) else None
                self.stack = build_stack(
                    self.layout, self.spec, self.policy_init, self.anchor_paths, self.reward_model, self.value_head,
                    sharding,
                )  # fmt: skip
            if uses_fsdp2(self):
                self.stack.shard(self.device_mesh, self.fsdp)
            self.stack.eval()  # no dropout: rollout and update log-probs must come from the same function

    def configure_optimizers(self):
        params = [p for p in self.stack.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(
            params, lr=self.optim.lr, weight_decay=self.optim.weight_decay, betas=self.optim.betas, eps=self.optim.eps
        )
        from transformers import get_scheduler

        total = max(1, int(self.trainer.estimated_stepping_batches))
        scheduler = get_scheduler(
            self.optim.schedule,
            optimizer,
            num_warmup_steps=int(self.optim.warmup_ratio * total),
            num_training_steps=total,
        )
        return [optimizer], [{"scheduler": scheduler, "interval": "step"}]

    def configure_callbacks(self):
        from salsa_lightning.ppo.callbacks import KLHackCallback

        return [KLHackCallback()] if self.kl_hack.action != "off" else []

    # ---------------------------------------------------------------- rollout
    def _forward_inputs(self, prompt_ids, prompt_mask, response, resp_mask):
        ids = torch.cat([prompt_ids, response], dim=1)  # (B, P+R)
        mask = torch.cat([prompt_mask, resp_mask.long()], dim=1)  # (B, P+R)
        return ids, mask, rl.position_ids_from_mask(mask)

    def _logprobs(self, logits, response) -> torch.Tensor:
        return rl.logprobs_from_logits(rl.response_logits(logits, response.shape[1]), response, self.gen.temperature)

    @torch.no_grad()
    def rollout(self, batch: dict[str, Any]) -> dict[str, Any]:
        prompt_ids, prompt_mask = batch["input_ids"], batch["attention_mask"]
        timings = {}
        t0 = time.perf_counter()
        sampling = (
            {"do_sample": True, "temperature": self.gen.temperature, "top_k": self.gen.top_k or None,
             "top_p": self.gen.top_p} if self.gen.do_sample else {"do_sample": False}
        )  # fmt: skip
        out = self.stack.generate(
            input_ids=prompt_ids,
            attention_mask=prompt_mask,
            max_new_tokens=self.gen.max_new_tokens,
            min_new_tokens=self.gen.min_new_tokens or None,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            # sharded: every rank must run every forward (each gathers layers from all), so ranks that finish
            # early keep stepping until the slowest one is done
            synced_gpus=world_size() > 1 and self.stack.fsdp is not None,
            **sampling,
        )
        timings["time/generate"] = time.perf_counter() - t0
        response = out[:, prompt_ids.shape[1] :]  # (B, R)
        resp_mask = rl.response_mask(response, self.tokenizer.eos_token_id)  # (B, R) bool
        has_eos = rl.contains_eos(response, self.tokenizer.eos_token_id, resp_mask)

        t0 = time.perf_counter()
        texts = [self.tokenizer.decode(r[m.bool()], skip_special_tokens=True) for r, m in zip(response, resp_mask)]
        scores = self._score(batch["messages"], texts)
        timings["time/score"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        ids, mask, pos = self._forward_inputs(prompt_ids, prompt_mask, response, resp_mask)
        keep = response.shape[1] + 1  # the positions that predict the response (and one spare the slicing drops)
        logits = self.stack.policy_logits(ids, mask, pos, keep)
        logp = self._logprobs(logits, response)  # (B, R)
        entropy = rl.entropy_from_logits(rl.response_logits(logits, response.shape[1]), self.gen.temperature)
        del logits
        anchor_logp = {
            name: self._logprobs(self.stack.anchor_logits(name, ids, mask, pos, keep), response)
            for name in self.anchor_paths
        }
        values = rl.response_logits(self.stack.values(ids, mask, pos), response.shape[1])  # (B, R)
        timings["time/forward"] = time.perf_counter() - t0

        if len(self.anchor_names) == 1:
            kl = rl.kl_penalty(logp, anchor_logp[self.anchor_names[0]], self.ppo.kl_estimator)
        else:
            kl = rl.multi_anchor_kl(
                logp, torch.stack([anchor_logp[n] for n in self.anchor_names]), self.ppo.kl_estimator
            )
        named_kls = {
            n: rl.kl_penalty(logp, anchor_logp[n], self.ppo.kl_estimator) for n in ("init", "soup") if n in anchor_logp
        }
        raw_scores = scores
        scores = rl.apply_missing_eos_penalty(scores, has_eos, self.ppo.missing_eos_penalty)
        shaped = rl.shape_rewards(scores, kl, resp_mask, self.kl_ctl.value)
        gae = rl.compute_gae(
            shaped.rewards, values, resp_mask, self.ppo.gamma, self.ppo.lam, whiten=self.ppo.whiten_advantages,
            all_reduce=self._sum_over_ranks if world_size() > 1 else None,
        )  # fmt: skip
        metrics = rl.rollout_metrics(scores, shaped, kl, resp_mask, has_eos, entropy, named_kls)
        metrics["val/explained_variance"] = rl.explained_variance(values, gae.returns, resp_mask)
        metrics = self._mean_over_ranks(metrics)
        metrics["kl_coef"] = torch.tensor(self.kl_ctl.value)
        return {
            "ids": ids, "mask": mask, "pos": pos, "response": response, "resp_mask": resp_mask,
            "logp": logp, "values": values, "advantages": gae.advantages, "returns": gae.returns,
            "kl": kl, "scores": scores, "raw_scores": raw_scores, "texts": texts,
            "messages": batch["messages"], "metrics": metrics, "timings": timings,
        }  # fmt: skip

    def _sum_over_ranks(self, t: torch.Tensor) -> torch.Tensor:
        return self.trainer.strategy.reduce(t.clone(), reduce_op="sum")

    def _mean_over_ranks(self, metrics: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Data-parallel runs: every rank logs, controls β and watches for the KL-hack with the global batch's
        statistics (each rank holds an equal share, so the mean of the ranks' means is the batch mean)."""
        n = world_size()
        if n == 1:
            return metrics
        keys = list(metrics)
        stacked = torch.stack([torch.as_tensor(metrics[k], dtype=torch.float32, device=self.device) for k in keys])
        reduced = self._sum_over_ranks(stacked) / n
        out = dict(zip(keys, reduced.unbind(), strict=True))
        if "val/num_eos_tokens" in out:
            out["val/num_eos_tokens"] = out["val/num_eos_tokens"] * n  # a count, not a mean
        return out

    def _any_rank(self, flag: bool) -> bool:
        """True on every rank when it is true on any: a rank must never skip an update the others take."""
        if world_size() == 1:
            return flag
        return bool(self._sum_over_ranks(torch.tensor(float(flag), device=self.device)) > 0)

    def _score(self, messages: list, texts: list[str]) -> torch.Tensor:
        """Reward of each response, rendered with the chat template exactly as the reward stage trained on."""
        if self.reward_fn is not None:
            return torch.tensor([float(x) for x in self.reward_fn(messages, texts)], device=self.device)
        seqs = [
            self.tokenizer(
                self.tokenizer.apply_chat_template(conversation(m, t), tokenize=False), add_special_tokens=False
            )["input_ids"]
            for m, t in zip(messages, texts)
        ]
        ids = pad_sequences(seqs, self.tokenizer.pad_token_id).to(self.device)
        mask = pad_sequences([[1] * len(s) for s in seqs], 0).to(self.device)
        scores = self.stack.reward_scores(ids, mask)
        if self.reward_norm is not None:
            scores = rl.normalize_scores(scores, self.reward_norm["mean"], self.reward_norm["std"])
        return scores

    # ---------------------------------------------------------------- update
    def training_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self.stack.eval()  # Lightning switches modules to train mode at fit start; PPO wants no dropout
        # Sampling and minibatch order are a function of (seed, update): a resumed run continues exactly,
        # whatever else drew random numbers in between (data loaders, checkpoint I/O).
        # (each rank its own stream, so ranks do not share sampling noise; rank 0's is the single-process one)
        torch.manual_seed((current_seed() or 0) * 1_000_003 + self.updates_done + self.global_rank * 2**32)
        roll = self.rollout(batch)
        metrics = dict(roll["metrics"])
        if self._any_rank(
            not all(
                torch.isfinite(torch.as_tensor(v)).all() for k, v in metrics.items() if k != "val/explained_variance"
            )
        ):
            self._skip_nonfinite("rollout")
            return
        opt = self.optimizers()
        sch = self.lr_schedulers()
        B = roll["ids"].shape[0]
        mb = min(self.ppo.mini_batch_size, B)
        update_logs: list[dict[str, torch.Tensor]] = []
        t0 = time.perf_counter()
        for _ in range(self.ppo.ppo_epochs):
            order = torch.randperm(B, device=roll["ids"].device)
            for start in range(0, B, mb):
                idx = order[start : start + mb]
                mb_ids, mb_mask, mb_pos = roll["ids"][idx], roll["mask"][idx], roll["pos"][idx]
                mb_response, mb_resp_mask = roll["response"][idx], roll["resp_mask"][idx]
                new_logp = self._logprobs(
                    self.stack.policy_logits(mb_ids, mb_mask, mb_pos, mb_response.shape[1] + 1), mb_response
                )
                pg = rl.policy_loss(
                    new_logp, roll["logp"][idx], roll["advantages"][idx], mb_resp_mask, self.ppo.cliprange
                )
                new_values = rl.response_logits(self.stack.values(mb_ids, mb_mask, mb_pos), mb_response.shape[1])
                vf = rl.value_loss(
                    new_values, roll["values"][idx], roll["returns"][idx], mb_resp_mask, self.ppo.cliprange_value
                )
                loss = pg.loss + self.ppo.vf_coef * vf.loss
                if self._any_rank(not torch.isfinite(loss)):
                    opt.zero_grad()
                    self._skip_nonfinite("loss")
                    return
                opt.zero_grad()
                self.manual_backward(loss)
                self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                update_logs.append(rl.update_metrics(pg, vf))
        sch.step()
        self.updates_done += 1
        self.nonfinite_in_a_row = 0
        metrics["time/optimize"] = time.perf_counter() - t0
        metrics.update(
            self._mean_over_ranks({k: torch.stack([u[k].detach() for u in update_logs]).mean() for k in update_logs[0]})
        )
        metrics.update(roll["timings"])
        # the global batch's mean KL per response (metrics are reduced over ranks), so β is the same on every rank
        self.kl_ctl.update(float(metrics["objective/kl"]), n_steps=B * world_size())
        logged = {k: float(v) for k, v in metrics.items()}
        self.last_metrics = logged
        self.history.append({"step": self.global_step, **logged})
        shown = {"objective/scores", "objective/kl"}
        self.log_dict({k: v for k, v in logged.items() if k not in shown}, on_step=True, batch_size=B)
        self.log_dict({k: logged[k] for k in shown}, on_step=True, prog_bar=True, batch_size=B)
        if self.sample_table_every and batch_idx % self.sample_table_every == 0:
            self._print_samples(roll)

    def _skip_nonfinite(self, where: str) -> None:
        self.nonfinite_in_a_row += 1
        self.log("train/skipped_nonfinite", float(self.nonfinite_in_a_row), on_step=True)
        warnings.warn(f"Skipped a PPO update: NaN/inf in the {where} ({self.nonfinite_in_a_row} in a row).")
        if self.nonfinite_in_a_row >= self.ppo.max_nonfinite_in_a_row:
            raise SalsaError(
                f"{self.nonfinite_in_a_row} PPO updates in a row had NaN/inf in the {where}; lower the learning rate or "
                "β, or check the reward model (max_nonfinite_in_a_row sets this limit)."
            )

    def _print_samples(self, roll: dict[str, Any], n: int = 3) -> None:
        if not self.trainer.is_global_zero:
            return
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"PPO samples, step {self.global_step}", show_lines=True)
        table.add_column("prompt", max_width=50)
        table.add_column("response", max_width=60)
        table.add_column("score", justify="right")
        for m, t, s in zip(roll["messages"][:n], roll["texts"][:n], roll["raw_scores"][:n]):
            table.add_row(m[-1]["content"], t, f"{float(s):.3f}")
        Console().print(table)

    # ---------------------------------------------------------------- checkpoints and output
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["salsa_ppo"] = {
            "kl_ctl": self.kl_ctl.state_dict(),
            "monitor": self.monitor.state_dict(),
            "nonfinite_in_a_row": self.nonfinite_in_a_row,
            "updates_done": self.updates_done,
            "history": self.history,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("salsa_ppo", {})
        if state:
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.monitor.load_state_dict(state["monitor"])
            self.nonfinite_in_a_row = state["nonfinite_in_a_row"]
            self.history = list(state.get("history", []))
            self.updates_done = state["updates_done"]

    def on_fit_end(self) -> None:
        if self.output_dir is None:
            return
        policy = self.stack.policy_to_save()
        state_dict = full_state_dict(policy)  # sharded: every rank takes part in the gather
        if not self.trainer.is_global_zero:
            return
        manifest = {
            "stage": "salsa" if self.anchor_names == ["soup"] else ("mkl" if len(self.anchor_names) > 1 else "ppo"),
            "format": self.stack.layout,
            "base_model": base_model_of(self.policy_init),
            "policy_init": canonical_model_ref(self.policy_init),
            "anchor": self.anchor_names,
            "anchor_paths": {k: _describe(v) for k, v in self.anchor_paths.items()},
            "reward_model": canonical_model_ref(self.reward_model) if self.reward_model else None,
            "reward_fn": self.hparams.reward_fn,
            "soup": _describe(self.soup) if self.soup else None,
            "seed": current_seed(),
            "global_step": self.trainer.global_step,
            "metrics": scalar_metrics(self.trainer.callback_metrics),
            "kl_coef_final": self.kl_ctl.value,
        }
        import json

        extra = {"history.json": json.dumps(self.history, indent=1)}
        path = save_ppo_policy(
            self.output_dir, policy, self.tokenizer, manifest, self.resolved_config, self.overwrite, extra, state_dict
        )
        rank_zero_info(f"PPO policy written to {path}")


def _describe(anchor) -> Any:
    if isinstance(anchor, InMemorySoup):
        return {"inputs": [canonical_model_ref(p) for p in anchor.inputs], "weights": list(anchor.weights or [])}
    return canonical_model_ref(anchor)


def _import_callable(ref: str):
    import importlib

    module, _, name = ref.partition(":")
    try:
        fn = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError) as err:
        raise SalsaError(f"Cannot import reward_fn {ref!r} ({err}); give it as `package.module:function`.") from err
    if not callable(fn):
        raise SalsaError(f"reward_fn {ref!r} is not callable; point it at a function.")
    return fn


def save_ppo_policy(output_dir, policy, tokenizer, manifest, resolved_config, overwrite, extra, state_dict=None):
    """Like `save_stage_output`, but a LoRA policy is saved as the plain adapter named `policy` (PEFT writes a
    non-default adapter into a sub-folder; we save only that adapter and lift it to the top)."""
    from peft import PeftModel

    if not isinstance(policy, PeftModel):
        return save_stage_output(output_dir, policy, tokenizer, manifest, resolved_config, overwrite, extra, state_dict)

    class _PolicyAdapter:
        def save_pretrained(self, path, safe_serialization=True, state_dict=None):
            import shutil
            import tempfile

            gathered = {"state_dict": state_dict} if state_dict is not None else {}
            with tempfile.TemporaryDirectory(dir=path) as tmp:
                policy.save_pretrained(tmp, selected_adapters=["policy"], safe_serialization=True, **gathered)
                src = Path(tmp) / "policy" if (Path(tmp) / "policy").is_dir() else Path(tmp)
                for f in src.iterdir():
                    if f.is_file():
                        shutil.move(str(f), Path(path) / f.name)

    return save_stage_output(
        output_dir, _PolicyAdapter(), tokenizer, manifest, resolved_config, overwrite, extra, state_dict
    )


__all__ = ["PPOModule", "PPOSpec", "GenerationSpec", "KLHackSpec"]
