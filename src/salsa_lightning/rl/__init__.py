"""PPO's math as pure tensor functions: no modules, no config objects, no trainer.

The `PPOModule` orchestrates; every formula of DESIGN.md §2 lives here once, tested against
hand-computed numbers and naive loops. Shapes: B sequences, T response tokens, V vocabulary,
J anchors. `mask` is always the (B, T) real-token mask from `response_mask`.

One rollout, in call order::

    logits_r = response_logits(logits, R)                    # (B, R, V), shift for [prompt | response]
    logp     = logprobs_from_logits(logits_r, tokens, τ)     # (B, R), same for each anchor
    mask     = response_mask(tokens, eos_id)                 # (B, R), up to and incl. first EOS
    scores   = apply_missing_eos_penalty(scores, contains_eos(tokens, eos_id, mask), penalty)
    kl       = kl_penalty(logp, logp_anchor, "k1")           # or multi_anchor_kl(logp, (J, B, R) refs)
    shaped   = shape_rewards(scores, kl, mask, kl_ctl.value) # score at the last real token
    gae      = compute_gae(shaped.rewards, values, mask, gamma, lam)   # whitened advantages, returns
    # per minibatch:
    pg       = policy_loss(new_logp, logp, gae.advantages, mask, cliprange)
    vf       = value_loss(new_values, values, gae.returns, mask, cliprange_value)
    loss     = pg.loss + vf_coef * vf.loss
    # after the batch:
    kl_ctl.update(masked_sum(kl, mask, dim=1).mean(), n_steps=B)
"""

from salsa_lightning.rl.gae import GAEOutput, compute_gae
from salsa_lightning.rl.kl import KL_ESTIMATORS, get_kl_estimator, kl_k1, kl_k2, kl_k3, kl_penalty, multi_anchor_kl
from salsa_lightning.rl.kl_control import AdaptiveKLController, FixedKLController, KLController, make_kl_controller
from salsa_lightning.rl.logprobs import entropy_from_logits, logprobs_from_logits, response_logits
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
    masked_sum,
    masked_var,
    masked_whiten,
)
from salsa_lightning.rl.monitor import KLHackMonitor, kl_hack_detected
from salsa_lightning.rl.rewards import (
    ShapedRewards,
    apply_missing_eos_penalty,
    check_kl_coef,
    normalize_scores,
    shape_rewards,
)
from salsa_lightning.rl.sequences import contains_eos, last_token_index, position_ids_from_mask, response_mask

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
    "check_kl_coef",
    "compute_gae",
    "contains_eos",
    "entropy_from_logits",
    "explained_variance",
    "get_kl_estimator",
    "kl_hack_detected",
    "kl_k1",
    "kl_k2",
    "kl_k3",
    "kl_penalty",
    "last_token_index",
    "logprobs_from_logits",
    "make_kl_controller",
    "masked_count",
    "masked_fill_pad",
    "masked_mean",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "multi_anchor_kl",
    "normalize_scores",
    "policy_loss",
    "position_ids_from_mask",
    "response_logits",
    "response_mask",
    "shape_rewards",
    "value_loss",
]
