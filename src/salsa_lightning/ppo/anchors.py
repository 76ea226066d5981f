"""Which models the KL penalty anchors to, and which are only measured: one `AnchorPlan` built from the config.

PPO (paper eq. 2) anchors to the SFT model the policy starts from (`init`), SALSA (eq. 4) to the soup, the MKL
ablation (eq. 5) to the mean of several models' KLs. Every run also logs the KL to `init` and, when a soup is
given, to the soup (the reviewers asked for both).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.loading import (
    base_model_of,
    canonical_model_ref,
    check_model_role,
    load_tokenizer,
    resolve_model_path,
)
from salsa_lightning.models.spec import ModelSpec
from salsa_lightning.stage import read_manifest


@dataclass(frozen=True)
class InMemorySoup:
    """A soup anchor built at start-up from seed outputs and weights by the soup API (no soup stage run)."""

    inputs: tuple[str, ...]
    weights: tuple[float, ...] | None = None


Anchor = str | InMemorySoup


@dataclass(frozen=True)
class AnchorPlan:
    """`names`: the anchors the penalty uses (mean of their KLs when several); `paths`: every model loaded as an
    anchor (name -> directory or in-memory soup), the logged-only ones included."""

    policy_init: str
    names: tuple[str, ...]
    paths: dict[str, Anchor] = field(default_factory=dict)
    soup: Anchor | None = None

    @property
    def logged(self) -> tuple[str, ...]:
        """The anchors whose KL is always logged as `objective/kl_<name>`."""
        return tuple(n for n in ("init", "soup") if n in self.paths)

    @property
    def stage(self) -> str:
        """The stage name written into the output manifest."""
        if self.names == ("soup",):
            return "salsa"
        return "mkl" if len(self.names) > 1 else "ppo"

    def describe(self) -> dict[str, Any]:
        """The manifest's account of the run's models: the stage name, the policy's start and the anchors."""
        return {
            "stage": self.stage,
            "base_model": base_model_of(self.policy_init),
            "policy_init": canonical_model_ref(self.policy_init),
            "anchor": list(self.names),
            "anchor_paths": {k: _describe(v) for k, v in self.paths.items()},
            "soup": _describe(self.soup) if self.soup is not None else None,
        }


def plan_anchors(
    policy_init: str,
    anchor: str | list[str],
    soup: str | None = None,
    soup_inputs: list[str] | None = None,
    soup_weights: list[float] | None = None,
    soup_alpha: float | None = None,
) -> AnchorPlan:
    if soup is not None and soup_inputs:
        raise SalsaError("Set either `soup` (a soup stage output) or `soup_inputs` (built in memory), not both.")
    the_soup: Anchor | None = soup
    if soup_inputs:
        from salsa_lightning.soup.api import resolve_weights

        the_soup = InMemorySoup(tuple(soup_inputs), tuple(resolve_weights(len(soup_inputs), soup_weights, soup_alpha)))
    paths: dict[str, Anchor] = {"init": policy_init}
    if the_soup is not None:
        paths["soup"] = the_soup
        _warn_if_soup_lacks_init(the_soup, policy_init)
    if anchor == "init":
        names = ["init"]
    elif anchor == "soup":
        if the_soup is None:
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
    return AnchorPlan(policy_init, tuple(names), paths, the_soup)


def _warn_if_soup_lacks_init(soup: Anchor, policy_init: str) -> None:
    if isinstance(soup, InMemorySoup):
        inputs = [str(Path(p).resolve()) for p in soup.inputs]
    else:
        manifest = read_manifest(resolve_model_path(soup)) or {}
        inputs = [str(Path(i["path"] if isinstance(i, dict) else i).resolve()) for i in manifest.get("inputs", [])]
    if inputs and str(Path(policy_init).resolve()) not in inputs:
        warnings.warn(
            f"The soup {soup} was not made from the policy's starting model {policy_init}; SALSA's soup "
            "should include it (paper eq. 3)."
        )


def check_roles(plan: AnchorPlan, reward_model: str | None) -> None:
    """Each model is the kind of stage output its place needs (a reward model is no policy, and vice versa)."""
    check_model_role(plan.policy_init, "policy", "model.policy_init")
    for name, path in plan.paths.items():
        for p in path.inputs if isinstance(path, InMemorySoup) else [path]:
            check_model_role(p, "policy", f"the {name} anchor")
    if reward_model is not None:
        check_model_role(reward_model, "reward", "model.reward_model")


def check_tokenizers(plan: AnchorPlan, reward_model: str | None, spec: ModelSpec, tokenizer) -> None:
    """Every model whose log-probs or scores meet the policy's must share its vocabulary."""
    vocab = tokenizer.get_vocab()
    models: dict[str, Any] = {**plan.paths, "reward": reward_model}
    if isinstance(plan.soup, InMemorySoup):
        models.update({f"soup input {i}": p for i, p in enumerate(plan.soup.inputs)})
    for name, path in models.items():
        if path is None or path == plan.policy_init or isinstance(path, InMemorySoup):
            continue
        if load_tokenizer(replace(spec, name_or_path=path)).get_vocab() != vocab:
            raise SalsaError(
                f"The {name} model ({path}) uses a different tokenizer from the policy; log-probs and scores would "
                "not be comparable, so train every stage from the same base model."
            )


def _describe(anchor: Anchor) -> Any:
    if isinstance(anchor, InMemorySoup):
        return {"inputs": [canonical_model_ref(p) for p in anchor.inputs], "weights": list(anchor.weights or [])}
    return canonical_model_ref(anchor)


__all__ = ["AnchorPlan", "InMemorySoup", "check_roles", "check_tokenizers", "plan_anchors"]
