"""PPO's math as pure tensor functions: no modules, no config objects, no trainer.

The `PPOModule` orchestrates; every formula of DESIGN.md §2 lives here once, tested against
hand-computed numbers and naive loops. Shapes: B sequences, T response tokens, V vocabulary,
J anchors. `mask` is always the (B, T) real-token mask from `response_mask`.

One PPO update, in call order (`logits`, `values` from a forward over `[prompt | response]`)::

    logp     = logprobs_from_logits(response_logits(logits, R), tokens, τ)   # (B, R); same for each anchor
    values   = response_logits(value_head_out, R)                 # (B, R), the same shift
    mask     = response_mask(tokens, eos_id)                      # (B, R), up to and incl. the first EOS
    has_eos  = contains_eos(tokens, eos_id, mask)                 # (B,)
    scores   = apply_missing_eos_penalty(scores, has_eos, penalty)
    kl       = kl_penalty(logp, logp_anchor, "k1")                # or multi_anchor_kl(logp, (J, B, R) refs)
    shaped   = shape_rewards(scores, kl, mask, kl_ctl.value)      # score at the last real token
    gae      = compute_gae(shaped.rewards, values, mask, gamma, lam)  # whitened advantages, raw returns
    log(rollout_metrics(scores, shaped, kl, mask, has_eos, entropy, {"init": kl_init, "soup": kl_soup}))
    log({"val/explained_variance": explained_variance(values, gae.returns, mask), "kl_coef": kl_ctl.value})
    for each ppo epoch and minibatch (mb_ rows of everything above):
        pg   = policy_loss(new_logp, mb_logp, mb_advantages, mb_mask, cliprange)
        vf   = value_loss(new_values, mb_values, mb_returns, mb_mask, cliprange_value)
        loss = pg.loss + vf_coef * vf.loss
        log(update_metrics(pg, vf))                               # averaged over minibatches
    kl_ctl.update(masked_sum(kl, mask, dim=1).mean(), n_steps=B)

Critic-free variants (`advantages.py`; no value head, no `value_loss`): each prompt's G responses are
contiguous rows; up to `shaped` everything is as above, then::

    seq      = masked_sum(shaped.rewards, mask, dim=1)                # (B,) score - β·Σ_t kl_t
    adv      = broadcast_to_tokens(group_advantages(seq, G), mask)    # GRPO (or rloo_advantages(seq, G))
    # REINFORCE++ instead: adv = reinforce_pp_advantages(shaped.rewards, mask, gamma, all_reduce)   # (B, R)
    for each ppo epoch and minibatch:
        pg   = policy_loss(new_logp, mb_logp, mb_adv, mb_mask, cliprange)
        loss = pg.loss + β * kl_loss(new_logp, mb_logp_anchor, mb_mask)  # GRPO: KL in the loss, β = 0 in the reward
"""

from salsa_lightning.rl.advantages import (
    broadcast_to_tokens,
    group_advantages,
    informative_groups,
    kl_loss,
    reinforce_pp_advantages,
    rloo_advantages,
)
from salsa_lightning.rl.gae import GAEOutput, compute_gae
from salsa_lightning.rl.kl import KL_ESTIMATORS, get_kl_estimator, kl_k1, kl_k2, kl_k3, kl_penalty, multi_anchor_kl
from salsa_lightning.rl.kl_control import AdaptiveKLController, FixedKLController, KLController, make_kl_controller
from salsa_lightning.rl.logprobs import entropy_from_logits, logprobs_from_logits, response_logits, step_logprobs
from salsa_lightning.rl.losses import (
    PolicyLossOutput,
    ValueLossOutput,
    approx_kl,
    explained_variance,
    policy_loss,
    value_loss,
)
from salsa_lightning.rl.masked import (
    masked_count,
    masked_fill_pad,
    masked_mean,
    masked_moments,
    masked_sum,
    masked_var,
    masked_whiten,
    mean_var_from_moments,
)
from salsa_lightning.rl.metrics import rollout_metrics, update_metrics
from salsa_lightning.rl.monitor import KLHackMonitor, kl_hack_detected
from salsa_lightning.rl.rewards import (
    ShapedRewards,
    apply_missing_eos_penalty,
    check_kl_coef,
    normalize_scores,
    shape_rewards,
)
from salsa_lightning.rl.sequences import (
    contains_eos,
    gather_last,
    last_token_index,
    position_ids_from_mask,
    response_mask,
)

__all__ = [
    "KL_ESTIMATORS",
    "AdaptiveKLController",
    "FixedKLController",
    "GAEOutput",
    "KLController",
    "KLHackMonitor",
    "PolicyLossOutput",
    "ShapedRewards",
    "ValueLossOutput",
    "apply_missing_eos_penalty",
    "approx_kl",
    "broadcast_to_tokens",
    "check_kl_coef",
    "compute_gae",
    "contains_eos",
    "entropy_from_logits",
    "explained_variance",
    "gather_last",
    "get_kl_estimator",
    "group_advantages",
    "informative_groups",
    "kl_hack_detected",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_loss",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_count",
    "masked_fill_pad",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "mean_var_from_moments",
    "multi_anchor_kl",
    "normalize_scores",
    "policy_loss",
    "position_ids_from_mask",
    "reinforce_pp_advantages",
    "response_logits",
    "response_mask",
    "rloo_advantages",
    "rollout_metrics",
    "shape_rewards",
    "step_logprobs",
    "update_metrics",
    "value_loss",
]
