"""LoRA soup: the exact average of several seeds' adapters on one shared base (DESIGN.md §2).

Seed i adds `ΔW_i = s_i B_i A_i` to the base weight `W0` (`s_i = alpha_i / r_i`, or `alpha_i / sqrt(r_i)`
with rsLoRA; `r_i` and `alpha_i` may vary per module through `rank_pattern`/`alpha_pattern`). The soup is
`W0 + Σ_i w_i ΔW_i`, and it is itself one LoRA adapter of rank `Σ_i r_i`:

    A = [w_1 s_1 A_1; …; w_n s_n A_n]   (rows stacked)      B = [B_1 … B_n]   (columns side by side)

so that `B @ A = Σ_i w_i s_i B_i A_i`, with scaling 1 in the output config. This is PEFT's `cat`
combination, done here on state dicts: PEFT's `add_weighted_adapter` needs the whole base model in
memory, pads every module to the largest rank when `rank_pattern` is used, and (in 0.21) copies
`use_rslora` into the new config while setting `lora_alpha = r`, which scales the result by
`sqrt(Σ r_i)` instead of 1. Working on the saved tensors needs no base model, keeps each module's own
rank and gets the scaling right by construction; the result is checked against the dense sum.

Averaging A's and B's separately gives `(Σ w_i B_i)(Σ w_j A_j)`, which contains cross terms
`B_i A_j`: not the soup. It is kept only as the explicitly named `approx_average`.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.soup.full import weighted_sum, worst_error
from salsa_lightning.soup.inputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from salsa_lightning.soup.streaming import open_safetensors
from salsa_lightning.soup.weights import resolve_weights

LoraCombination = Literal["cat", "approx_average"]

# Suffixes of the A and B factors in a saved PEFT adapter (adapter name already stripped by PEFT).
_A_SUFFIXES = (".lora_A.weight", ".lora_embedding_A")
_B_SUFFIXES = (".lora_B.weight", ".lora_embedding_B")
_PEFT_PREFIX = "base_model.model."
# Fields of adapter_config.json that must agree for two adapters to live on the same base the same way.
_MUST_MATCH = ("peft_type", "fan_in_fan_out", "target_parameters")


@dataclass
class LoraAdapter:
    """A LoRA adapter in memory: the tensors and config that PEFT's `save_pretrained` writes."""

    state_dict: dict[str, torch.Tensor]
    """Keys as in `adapter_model.safetensors`, e.g. `base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`."""
    config: dict[str, Any]
    """The content of `adapter_config.json` (`LoraConfig.to_dict()` works too)."""
    name: str = "adapter"
    """Used in error messages (the input's path when loaded from disk)."""
    base_model: str | None = None
    """The base it was trained on, when known (manifest or `base_model_name_or_path`)."""


@dataclass
class LoraSoup:
    """The souped adapter plus what the build-time check found."""

    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    max_rel_error: float
    """Max over the verified modules of `‖ΔW_soup - Σ_i w_i ΔW_i‖_F / ‖Σ_i w_i ΔW_i‖_F` (float64 dense)."""
    verified_modules: list[str] = field(default_factory=list)

    def peft_config(self):
        """A `peft.LoraConfig` for `PeftModel.add_adapter(name, ...)` + `set_peft_model_state_dict`."""
        from peft import LoraConfig

        known = set(LoraConfig.__dataclass_fields__)
        return LoraConfig(**{k: v for k, v in self.config.items() if k in known and k != "peft_type"})

    def save(self, directory: str | Path) -> None:
        """Write `adapter_config.json` + `adapter_model.safetensors` (loadable by `PeftModel.from_pretrained`)."""
        import json

        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        text = json.dumps(self.config, indent=2, sort_keys=True, default=_jsonable)
        (directory / ADAPTER_CONFIG).write_text(text + "\n")
        save_file(
            {k: v.contiguous() for k, v in self.state_dict.items()}, directory / ADAPTER_WEIGHTS, {"format": "pt"}
        )


def _jsonable(value: Any) -> Any:
    """Sets and enums as found in a live `LoraConfig.to_dict()` (the PPO path), as PEFT writes them."""
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    return getattr(value, "value", str(value))


def load_lora_adapter(path: str | Path) -> LoraAdapter:
    """Read a PEFT adapter directory (`adapter_config.json` + `adapter_model.safetensors`)."""
    from salsa_lightning.soup.inputs import describe_input

    inp = describe_input(path)
    if inp.format != "lora":
        raise SalsaError(f"{path} is not a LoRA adapter directory (no {ADAPTER_CONFIG}); give an adapter directory.")
    with open_safetensors(inp.weight_files[0]) as f:
        sd = {k: f.get_tensor(k) for k in f.keys()}
    return LoraAdapter(sd, dict(inp.adapter_config or {}), name=str(path), base_model=inp.base_model)


@dataclass
class _Module:
    """One LoRA-adapted module of one adapter."""

    a: torch.Tensor  # (r, in) for Linear/Embedding-A, (r, in, *k) for conv
    b: torch.Tensor  # (out, r) or (out, r, *1)
    scaling: float
    rank: int
    a_key: str
    b_key: str


def pattern_key(pattern_keys: Sequence[str], module: str) -> str:
    """The key of `rank_pattern`/`alpha_pattern` that applies to `module`: the first that matches the end of its
    name at a dot (PEFT 0.21's `peft.utils.other.get_pattern_key`, tested equal). Not imported from PEFT, whose
    import loads bitsandbytes (and, on some CPUs, its kernel-loading warning) into a soup that never needs it."""
    return next((key for key in pattern_keys if re.match(rf"(.*\.)?({key})$", module)), module)


def _pattern_value(pattern: dict[str, Any] | None, module: str, default: Any) -> Any:
    pattern = pattern or {}
    return pattern.get(pattern_key(list(pattern), module), default)


def lora_scaling(config: dict[str, Any], module: str) -> tuple[int, float]:
    """`(r, s)` of `module` (its name inside the base model) under `config`, as PEFT computes them at load time."""
    r = int(_pattern_value(config.get("rank_pattern"), module, config["r"]))
    alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
    return r, (alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r)


def lora_delta(a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """The dense update `s · B A` of one module, in float64, in PEFT's factor layout.

    For Linear that is the `(out, in)` weight update; for Embedding it is the transpose of the
    `(num_embeddings, dim)` update; for conv the `(out, in·kh·kw)` flattening.
    """
    r = a.shape[0]
    return scaling * (b.double().reshape(b.shape[0], r) @ a.double().reshape(r, -1))  # (out, r) @ (r, in) -> (out, in)


def _split(adapter: LoraAdapter) -> tuple[dict[str, _Module], dict[str, torch.Tensor]]:
    """LoRA modules (by module name inside the base model) and the other tensors (modules_to_save etc.)."""
    cfg = adapter.config
    peft_type = cfg.get("peft_type", "LORA")
    if str(getattr(peft_type, "value", peft_type)).upper() != "LORA":  # a PeftType enum in a live config
        raise SalsaError(f"{adapter.name} is a {cfg.get('peft_type')} adapter; the soup handles LoRA adapters only.")
    if cfg.get("use_dora"):
        raise SalsaError(
            f"{adapter.name} is a DoRA adapter, whose column norms make the average of deltas not a DoRA adapter; "
            "soup plain LoRA adapters, or merge each into full weights and soup those."
        )
    if cfg.get("lora_bias"):
        raise SalsaError(f"{adapter.name} trains LoRA biases (`lora_bias: true`), which the soup does not handle yet.")
    a_parts, b_parts, other = {}, {}, {}  # module path -> (key, tensor)
    for key, t in adapter.state_dict.items():
        if key.endswith(_A_SUFFIXES):
            a_parts[key.rsplit(".lora_", 1)[0]] = (key, t)
        elif key.endswith(_B_SUFFIXES):
            b_parts[key.rsplit(".lora_", 1)[0]] = (key, t)
        elif "lora_magnitude_vector" in key:
            raise SalsaError(f"{adapter.name} holds DoRA magnitudes ({key}); soup plain LoRA adapters.")
        else:
            other[key] = t
    if set(a_parts) != set(b_parts):
        raise SalsaError(f"{adapter.name} has LoRA A factors without B factors or vice versa; re-save the adapter.")
    modules = {}
    for path in sorted(a_parts):
        name = path[len(_PEFT_PREFIX) :] if path.startswith(_PEFT_PREFIX) else path
        (a_key, a), (b_key, b) = a_parts[path], b_parts[path]
        r, s = lora_scaling(cfg, name)
        if a.shape[0] != r or b.shape[1] != r:
            raise SalsaError(
                f"{adapter.name}: module {name} has rank {a.shape[0]} in its tensors but {r} in its config; "
                "re-save the adapter with PEFT."
            )
        modules[path] = _Module(a, b, s, r, a_key, b_key)
    return modules, other


def _check_compatible(adapters: Sequence[LoraAdapter], parts: Sequence[tuple[dict, dict]]) -> None:
    ref, (ref_mods, ref_other) = adapters[0], parts[0]
    for ad, (mods, other) in zip(adapters[1:], parts[1:], strict=True):
        for f in _MUST_MATCH:
            if ref.config.get(f) != ad.config.get(f):
                raise SalsaError(
                    f"The adapters {ref.name} and {ad.name} differ in `{f}` ({ref.config.get(f)!r} vs "
                    f"{ad.config.get(f)!r}); soup adapters trained the same way on the same base."
                )
        if ref.base_model and ad.base_model and not _same_base(ref.base_model, ad.base_model):
            raise SalsaError(
                f"The adapters {ref.name} and {ad.name} were trained on different base models "
                f"({ref.base_model} vs {ad.base_model}); soup adapters of one base model."
            )
        if set(mods) != set(ref_mods):
            diff = sorted(set(mods) ^ set(ref_mods))
            raise SalsaError(
                f"The adapters {ref.name} and {ad.name} adapt different modules (e.g. {diff[0]}): different "
                "target modules; soup adapters trained with the same `target_modules`."
            )
        for path, m in mods.items():
            r = ref_mods[path]
            if m.a.shape[1:] != r.a.shape[1:] or m.b.shape[:1] != r.b.shape[:1] or m.b.shape[2:] != r.b.shape[2:]:
                raise SalsaError(
                    f"The module {path} has other shapes in {ad.name} than in {ref.name} "
                    f"(A {tuple(m.a.shape)} vs {tuple(r.a.shape)}); the adapters are on different base models."
                )
        if set(other) != set(ref_other):
            raise SalsaError(
                f"The adapters {ref.name} and {ad.name} save different extra modules "
                f"({sorted(set(other) ^ set(ref_other))[:3]}); soup adapters trained with the same `modules_to_save`."
            )
        for key, t in other.items():
            if t.shape != ref_other[key].shape:
                raise SalsaError(f"The tensor {key} differs in shape between {ref.name} and {ad.name}.")
            # Copies of base weights saved with the adapter (embedding layers) must be the one shared base.
            if ".base_layer." in key and not torch.equal(t, ref_other[key]):
                raise SalsaError(
                    f"The adapters {ref.name} and {ad.name} carry different base weights for {key}: they were "
                    "trained on different base models; soup adapters of one base model."
                )


def _same_base(a: str, b: str) -> bool:
    pa, pb = Path(a), Path(b)
    if pa.exists() and pb.exists():
        return pa.resolve() == pb.resolve()
    return a.rstrip("/") == b.rstrip("/")


def _cat_config(ref: dict[str, Any], ranks: dict[str, int]) -> dict[str, Any]:
    """Output config for the cat soup: rank `Σ r_i` per module and scaling exactly 1 everywhere."""
    default_r = Counter(ranks.values()).most_common(1)[0][0]
    # Exact module names as pattern keys. PEFT matches them as regexes anchored at a dot boundary and the
    # end; a build-time check below resolves every module through PEFT's own rule to be sure.
    pattern = {name: r for name, r in ranks.items() if r != default_r}
    cfg = dict(ref)
    cfg.update(
        r=default_r,
        lora_alpha=default_r,
        rank_pattern=dict(pattern),
        alpha_pattern=dict(pattern),
        use_rslora=False,
        init_lora_weights=True,
        inference_mode=True,
    )
    return cfg


def soup_lora_adapters(
    adapters: Sequence[LoraAdapter],
    weights: Sequence[float] | None = None,
    *,
    combination: LoraCombination = "cat",
    allow_extrapolation: bool = False,
    verify_samples: int = 8,
    verify_tolerance: float = 1e-4,
) -> LoraSoup:
    """Soup LoRA adapters of one base model into one adapter (float32), no base model needed.

    `combination="cat"` (default) is exact: `ΔW_soup = Σ_i w_i ΔW_i`, rank `Σ_i r_i` per module.
    `combination="approx_average"` averages A's and B's separately (equal ranks and scalings needed): NOT the
    soup, only for comparison; its error is measured and returned but never fails the build.
    `verify_samples` modules (spread over the model; all if fewer) are checked densely in float64; the cat soup
    raises a `SalsaError` when the relative error exceeds `verify_tolerance`. Tensors other than LoRA factors
    (`modules_to_save`) are averaged as full weights, which is exact for them.
    """
    w = resolve_weights(len(adapters), weights, allow_extrapolation=allow_extrapolation)
    parts = [_split(ad) for ad in adapters]
    _check_compatible(adapters, parts)
    mods0, other0 = parts[0]
    names = {path: (path[len(_PEFT_PREFIX) :] if path.startswith(_PEFT_PREFIX) else path) for path in mods0}

    out_sd: dict[str, torch.Tensor] = {}
    a_key = {path: m.a_key for path, m in mods0.items()}
    b_key = {path: m.b_key for path, m in mods0.items()}
    if combination == "cat":
        ranks = {}
        for path in mods0:
            mods = [p[0][path] for p in parts]
            # w_i s_i folded into A_i: rows stacked, (Σ r_i, in, …); B_i columns side by side, (out, Σ r_i, …)
            out_sd[a_key[path]] = torch.cat([wi * m.scaling * m.a.float() for wi, m in zip(w, mods, strict=True)], 0)
            out_sd[b_key[path]] = torch.cat([m.b.float() for m in mods], 1)
            ranks[names[path]] = sum(m.rank for m in mods)
        config = _cat_config(adapters[0].config, ranks)
    elif combination == "approx_average":
        for path in mods0:
            mods = [p[0][path] for p in parts]
            if len({m.rank for m in mods}) > 1 or len({m.scaling for m in mods}) > 1:
                raise SalsaError(
                    f"`approx_average` needs equal ranks and scalings but module {names[path]} differs between "
                    "inputs; use `lora_combination: cat` (the exact soup)."
                )
            out_sd[a_key[path]] = weighted_sum((m.a for m in mods), w, torch.float32)
            out_sd[b_key[path]] = weighted_sum((m.b for m in mods), w, torch.float32)
        config = dict(adapters[0].config)
    else:
        raise SalsaError(f"Unknown `lora_combination: {combination}`; use `cat` (exact) or `approx_average`.")
    for key, t in other0.items():
        if ".base_layer." in key:
            out_sd[key] = t
        else:
            out_sd[key] = weighted_sum((p[1][key] for p in parts), w)

    # Dense check on a spread of modules, with the output's scaling resolved the way PEFT will resolve it.
    paths = sorted(mods0)
    k = min(verify_samples, len(paths))
    sample = [paths[round(j * (len(paths) - 1) / max(k - 1, 1))] for j in range(k)] if k else []
    max_err = 0.0
    for path in dict.fromkeys(sample):
        r_out, s_out = lora_scaling(config, names[path])
        a, b = out_sd[a_key[path]], out_sd[b_key[path]]
        if a.shape[0] != r_out:
            raise SalsaError(
                f"Internal error: the soup's config gives {names[path]} rank {r_out}, its tensors {a.shape[0]}."
            )
        got = lora_delta(a, b, s_out)
        ref = sum(
            wi * lora_delta(p[0][path].a, p[0][path].b, p[0][path].scaling) for wi, p in zip(w, parts, strict=True)
        )
        denom = ref.norm().item()
        err = (got - ref).norm().item()
        max_err = worst_error(max_err, err / denom if denom > 0 else err)  # NaN stays NaN: the check then fails
    if combination == "cat" and not max_err <= verify_tolerance:
        raise SalsaError(
            f"The LoRA soup deviates from the dense average by {max_err:.3g} (relative), above `verify_tolerance` "
            f"{verify_tolerance:g}; check the inputs for NaNs or extreme values, or raise the tolerance."
        )
    return LoraSoup(out_sd, config, max_err, [names[p] for p in dict.fromkeys(sample)])


def merge_lora_soup(soup: LoraSoup, base_model: str, **from_pretrained_kwargs: Any):
    """Load `base_model` with transformers and fold the souped adapter into its weights (PEFT's own merge).

    Returns the merged `PreTrainedModel`; this loads one full model, which a merged output needs anyway.
    """
    import tempfile

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    try:
        base = AutoModelForCausalLM.from_pretrained(base_model, dtype="auto", **from_pretrained_kwargs)
    except (OSError, ValueError) as err:
        raise SalsaError(
            f"`merge: true` could not load the base model {base_model} ({err}); make it reachable or set `merge: false`."
        ) from err
    emb = base.get_input_embeddings()
    emb_name = next((n for n, m in base.named_modules() if m is emb), None)
    tied = getattr(base.config, "tie_word_embeddings", False) or getattr(
        base.config.get_text_config(), "tie_word_embeddings", False
    )
    adapted = {k.rsplit(".lora_", 1)[0].removeprefix(_PEFT_PREFIX) for k in soup.state_dict if ".lora_" in k}
    if tied and emb_name in adapted:
        raise SalsaError(
            f"The adapters change the input embedding {emb_name}, which the base model ties to its output layer, so "
            "merging would change both; keep `merge: false` (the adapter soup is exact)."
        )
    with tempfile.TemporaryDirectory() as tmp:
        soup.save(tmp)
        model = PeftModel.from_pretrained(base, tmp)
    return model.merge_and_unload()
