"""PPOModule: PPO with a KL anchor — the SFT init (PPO, paper eq. 2), the soup (SALSA, eq. 4), or several
anchors averaged (MKL, eq. 5). One training step = one rollout (`ppo.rollout`) and `ppo_epochs` × minibatches of
clipped updates (manual optimisation). The math is `salsa_lightning.rl`; the models are a `ppo.stack.Stack`."""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import replace
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info

from salsa_lightning import rl
from salsa_lightning.allocator import release_freed_memory
from salsa_lightning.distributed import FSDPSpec, any_rank, mean_over_ranks, uses_fsdp2, world_size
from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import load_tokenizer
from salsa_lightning.models.quantization import is_quantized
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.modules.common import (
    OptimSpec,
    configure_adamw,
    current_seed,
    format_output_dir,
    restore_loader_position,
    save_stage_output,
    scalar_metrics,
)
from salsa_lightning.ppo.anchors import check_roles, check_tokenizers, plan_anchors
from salsa_lightning.ppo.build import build_stack, resolve_layout
from salsa_lightning.ppo.callbacks import KLHackCallback, log_samples
from salsa_lightning.ppo.config import GenerationSpec, KLHackSpec, PPOSpec, check_base_linears_bf16, check_merge_lora
from salsa_lightning.ppo.losses import minibatch_losses
from salsa_lightning.ppo.rollout import RewardSource, Rollout, collect_rollout
from salsa_lightning.ppo.schedule import schedule_length
from salsa_lightning.ppo.vllm_rollout import ONE_PROCESS, check_vllm_backend, make_engine
from salsa_lightning.stage import check_output_dir


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
            sample_table_every: Every N updates (0 = never), a table of prompts, responses, scores and KLs: printed, and
                logged to W&B (a table) and TensorBoard (text) when those loggers are used.
            output_dir: Where the trained policy is written (HF format, adapter or full); `{seed}` is filled in.
            overwrite: Replace `output_dir` if it exists.
            fsdp: FSDP2 settings, used under `ModelParallelStrategy`: every model of the stack is sharded per
                decoder layer (the LoRA layout shards its one base with all adapters); rollouts generate with the
                policy gathered once per rollout (`gather_for_generation`) and all ranks in step (`synced_gpus`).
        """
        super().__init__()
        self.automatic_optimization = False
        self.ppo, self.gen, self.kl_hack = ppo or PPOSpec(), generation or GenerationSpec(), kl_hack or KLHackSpec()
        self.optim = optim or OptimSpec(lr=2e-6, warmup_ratio=0.0, schedule="linear")
        self.spec, self.fsdp = model or ModelSpec(), fsdp or FSDPSpec()
        self.plan = plan_anchors(policy_init, anchor, soup, soup_inputs, soup_weights, soup_alpha)
        check_roles(self.plan, reward_model)
        self.policy_init, self.reward_model = policy_init, reward_model
        self.layout, self.value_head = layout, value_head
        if self.gen.merge_lora:  # refused before any model loads (FSDP is refused by `build_stack`, also before)
            check_merge_lora(resolve_layout(layout, policy_init, self.plan.paths, reward_model),
                             is_quantized(self.spec), sharded=False)  # fmt: skip
        if self.gen.backend == "vllm":
            check_vllm_backend(self.gen, self.ppo.rollout_logprobs, is_quantized(self.spec))
        self.rewards = RewardSource.from_config(reward_model, reward_fn, self.ppo.normalize_reward)
        self.sample_table_every, self.overwrite = sample_table_every, overwrite
        self.output_dir = format_output_dir(output_dir)
        if self.output_dir is not None:
            check_output_dir(self.output_dir, overwrite)
        self.save_hyperparameters()
        self.tokenizer = load_tokenizer(replace(self.spec, name_or_path=policy_init), padding_side="left")
        check_tokenizers(self.plan, reward_model, self.spec, self.tokenizer)
        self.stack = self.engine = None
        # PPO keeps every model in eval mode (no dropout) on purpose; Lightning would warn about it at fit start
        warnings.filterwarnings("ignore", message=r".*module\(s\) in eval mode.*")
        self.kl_ctl = rl.make_kl_controller(self.ppo.kl_coef, self.ppo.kl_target, self.ppo.kl_horizon)
        self.rollouts_done = self.updates_done = self.nonfinite_in_a_row = 0
        self.resolved_config: str | None = None
        self.history: list[dict[str, float]] = []  # what was logged, one row per update (history.json)

    def configure_model(self) -> None:
        if self.ppo.filter_groups and self.trainer.world_size > 1:
            raise SalsaError(
                "`model.ppo.filter_groups` runs on one process only (ranks would run different numbers of minibatches "
                "and their collectives would not meet); set it to false for multi-process runs."
            )
        if self.gen.backend == "vllm" and self.trainer.world_size > 1:
            raise SalsaError(ONE_PROCESS)
        if self.stack is None:
            sharding = (self.device_mesh, self.fsdp) if uses_fsdp2(self) else None
            if self.ppo.base_linears_bf16:
                check_base_linears_bf16(resolve_layout(self.layout, self.policy_init, self.plan.paths, self.reward_model),
                                        str(self.trainer.precision), is_quantized(self.spec), sharding is not None,
                                        self.gen.backend)  # fmt: skip
            self.stack = build_stack(self.layout, self.spec, self.policy_init, self.plan.paths, self.reward_model,
                                     self.value_head, sharding, self.ppo.critic, self.gen.merge_lora,
                                     self.ppo.base_linears_bf16, self.gen.merge_restore)  # fmt: skip
        if self.gen.backend == "vllm" and self.engine is None:
            self.engine = make_engine(self.stack, self.policy_init, self.gen, current_seed() or 0)

    def configure_optimizers(self):
        # the schedule spans the run's rollouts (stepped once per rollout), not Lightning's estimate of steps
        trainable = [p for p in self.stack.parameters() if p.requires_grad]
        return configure_adamw(self, self.optim, trainable, schedule_length(self.trainer, self.ppo))

    def configure_callbacks(self):
        return [KLHackCallback(self.kl_hack)] if self.kl_hack.action != "off" else []

    def on_train_start(self) -> None:
        restore_loader_position(self.trainer)  # a mid-epoch resume continues with the next prompts

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> dict[str, float] | None:
        self.stack.eval()  # Lightning switches modules to train mode at fit start; PPO wants no dropout
        # Sampling and minibatch order are a function of (seed, rollout): a resumed run continues exactly, whatever
        # else drew random numbers in between; each rank its own stream (rank 0's is the single-process one)
        try:
            index = self.rollouts_done  # what the every-N options count: checkpointed, so a resume measures alike
            torch.manual_seed((current_seed() or 0) * 1_000_003 + index + self.global_rank * 2**32)
            self.rollouts_done += 1
            roll = collect_rollout(self.stack, batch, self.tokenizer, self.gen, self.ppo, self.plan, self.rewards,
                                   self.kl_ctl.value, index, self.engine)  # fmt: skip
            release_freed_memory()  # what generation freed is not kept resident beside the update's graphs
            if any_rank(not roll.finite(), self.device):
                return self._nonfinite("Skipped a PPO update: NaN/inf in the rollout")
            t0 = time.perf_counter()
            update_logs, planned, trained_rows = self._optimize(roll)
            if planned and not update_logs:
                return self._nonfinite("Skipped a PPO update: NaN/inf in the first minibatch's loss")
            self.updates_done += 1  # with `filter_groups` a rollout of no informative group plans no step
            metrics = {**roll.metrics, "time/optimize": time.perf_counter() - t0, **roll.timings}
            if update_logs:
                metrics.update(
                    mean_over_ranks({k: torch.stack([u[k] for u in update_logs]).mean() for k in update_logs[0]})
                )
            if self.ppo.filter_groups:
                metrics["train/informative_fraction"] = torch.tensor(trained_rows / roll.ids.shape[0])
            metrics["kl_coef"] = torch.tensor(self.kl_ctl.value)  # the β this rollout's rewards used
            # the global batch's mean KL per response (metrics are reduced over ranks), so β is the same on every rank
            self.kl_ctl.update(float(metrics["objective/kl"]), n_steps=roll.ids.shape[0] * world_size())
            if len(update_logs) < planned:
                metrics["train/nonfinite_minibatches"] = torch.tensor(float(planned - len(update_logs)))
                self._nonfinite(
                    f"Cut a PPO update short: {len(update_logs)} of {planned} minibatches ran, then NaN/inf"
                )
            else:
                self.nonfinite_in_a_row = 0
            return self._log_update(metrics, roll)
        finally:
            self.lr_schedulers().step()  # once per rollout, whatever the update did: it spans the run's rollouts
            release_freed_memory()  # nor the update's freed graphs beside the next rollout

    def _optimize(self, roll: Rollout) -> tuple[list[dict[str, torch.Tensor]], int, int]:
        """`ppo_epochs` passes of clipped minibatch updates (CleanRL's update phase). A minibatch whose loss is not
        finite takes no step and ends the update (the steps before it stand). Returns each step's statistics, how
        many steps were planned, and how many rollout rows they train on (fewer than the rollout's with
        `filter_groups`)."""
        opt, rows = self.optimizers(), torch.arange(roll.ids.shape[0], device=roll.ids.device)
        if self.ppo.filter_groups:  # only the groups whose scores differ: the others have zero advantage
            rows = rows[rl.informative_groups(roll.scores, self.ppo.n_samples_per_prompt)]
        B = rows.numel()
        mb = min(self.ppo.mini_batch_size, max(B, 1))
        planned, logs = self.ppo.ppo_epochs * -(-B // mb), []
        for _ in range(self.ppo.ppo_epochs):
            order = rows[torch.randperm(B, device=roll.ids.device)]
            for start in range(0, B, mb):
                opt.zero_grad()
                # the policy's part, then the critic's: each backward frees its graph before the next forward
                parts = minibatch_losses(self.stack, roll.rows(order[start : start + mb]), self.ppo, self.gen,
                                         roll.kl_coef)  # fmt: skip
                for loss, part_stats in parts:
                    if any_rank(not torch.isfinite(loss), self.device):
                        opt.zero_grad()  # a part already back-propagated leaves no gradient behind
                        return logs, planned, B
                    release_freed_memory()  # what the loss's own temporaries freed, before the backward allocates
                    self.manual_backward(loss)
                    release_freed_memory()  # the freed graph's pages, before the next part's forward reuses the heap
                    stats = part_stats  # the last part's hold every statistic
                self.clip_gradients(opt, gradient_clip_val=self.ppo.max_grad_norm, gradient_clip_algorithm="norm")
                opt.step()
                logs.append(stats)
        return logs, planned, B

    def _nonfinite(self, what: str) -> None:
        self.nonfinite_in_a_row += 1
        self.log("train/skipped_nonfinite", float(self.nonfinite_in_a_row), on_step=True)
        warnings.warn(f"{what} ({self.nonfinite_in_a_row} in a row).")
        if self.nonfinite_in_a_row >= self.ppo.max_nonfinite_in_a_row:
            raise SalsaError(
                f"{self.nonfinite_in_a_row} PPO updates in a row had NaN/inf in the rollout or loss; lower the learning "
                "rate or β, or check the reward model (max_nonfinite_in_a_row sets this limit)."
            )

    def _log_update(self, metrics: dict[str, torch.Tensor], roll: Rollout) -> dict[str, float]:
        logged = {k: float(v) for k, v in metrics.items()}
        shown, B = {"objective/scores", "objective/kl"}, roll.ids.shape[0]
        self.log_dict({k: v for k, v in logged.items() if k not in shown}, on_step=True, batch_size=B)
        self.log_dict({k: logged[k] for k in shown}, on_step=True, prog_bar=True, batch_size=B)
        self.history.append({"step": self.global_step, **logged})
        every = self.sample_table_every
        if every and (self.updates_done - 1) % every == 0 and self.trainer.is_global_zero:  # the 1st, 1+N-th, ...
            log_samples(self.trainer, *roll.samples(), step=self.global_step)
        return logged  # the training_step output: what callbacks (the KL-hack monitor) read

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keys = ("nonfinite_in_a_row", "updates_done", "rollouts_done", "history")
        checkpoint["salsa_ppo"] = {"kl_ctl": self.kl_ctl.state_dict(), **{k: getattr(self, k) for k in keys}}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if state := checkpoint.get("salsa_ppo"):
            self.kl_ctl.load_state_dict(state["kl_ctl"])
            self.nonfinite_in_a_row, self.updates_done = state["nonfinite_in_a_row"], state["updates_done"]
            self.rollouts_done = state.get("rollouts_done", self.updates_done)  # older checkpoints: no skips counted
            self.history = list(state.get("history", []))

    def stage_manifest(self, seed: int | None, global_step: int, metrics: dict[str, float]) -> dict[str, Any]:
        """What the stage output's manifest says about this stage (also written by `export` from a checkpoint)."""
        return {
            "format": self.stack.layout,
            **self.plan.describe(),
            **self.rewards.describe(),
            "seed": seed,
            "global_step": global_step,
            "metrics": metrics,
            "kl_coef_final": self.kl_ctl.value,
        }

    def write_output(self, output_dir, manifest: dict[str, Any], state_dict=None, overwrite: bool = False):
        """The PPO stage output: the policy as plain transformers/PEFT load it, the manifest, `history.json`."""
        extra = {"history.json": json.dumps(self.history, indent=1)}
        return save_stage_output(output_dir, lambda d: self.stack.save_policy(d, state_dict), self.tokenizer, manifest,
                                 self.resolved_config, overwrite, extra, state_dict)  # fmt: skip

    def on_fit_end(self) -> None:
        if self.engine is not None:
            self.engine.close()
            self.engine = None
        if self.output_dir is None:
            return
        state_dict = self.stack.gather_policy()  # sharded: every rank takes part in the gather
        if not self.trainer.is_global_zero:
            return
        metrics = scalar_metrics(self.trainer.callback_metrics)
        manifest = self.stage_manifest(current_seed(), self.trainer.global_step, metrics)
        path = self.write_output(self.output_dir, manifest, state_dict, self.overwrite)
        rank_zero_info(f"PPO policy written to {path}")


__all__ = ["GenerationSpec", "KLHackSpec", "PPOModule", "PPOSpec"]
