"""The soup (paper eq. 3): weights, full-weight streaming soup, exact LoRA soup, bad inputs, config."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from salsa_lightning.errors import SalsaError
from salsa_lightning.soup.api import (
    LoraAdapter,
    SoupConfig,
    load_lora_adapter,
    lora_delta,
    lora_scaling,
    resolve_weights,
    run_soup,
    soup_lora_adapters,
    soup_state_dicts,
    weighted_sum,
)
from salsa_lightning.stage import read_manifest, sha256_file

REPO = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------- fixtures: tiny "SFT seeds"


def _save_full(path: Path, tokenizer, seed: int, dtype=torch.float32, max_shard_size="50GB", **kwargs) -> Path:
    from salsa_lightning.models.tiny import make_tiny_model

    model = make_tiny_model(tokenizer, seed=seed, **kwargs).to(dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tokenizer.save_pretrained(path)
    (path / "salsa_manifest.json").write_text(json.dumps({"stage": "sft", "format": "full", "seed": seed}))
    return path


@pytest.fixture(scope="module")
def full_seeds(tmp_path_factory, tiny_tokenizer) -> list[Path]:
    root = tmp_path_factory.mktemp("full")
    return [_save_full(root / f"sft-seed{s}", tiny_tokenizer, seed=s) for s in (1, 2, 3)]


def _load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir).eval()


def _save_lora(path: Path, base_dir: Path, seed: int, tokenizer, **lora_kwargs) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)  # init_lora_weights=False draws non-zero A and B from the global RNG
    model = get_peft_model(_load_base(base_dir), LoraConfig(init_lora_weights=False, **lora_kwargs))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    (path / "salsa_manifest.json").write_text(
        json.dumps({"stage": "sft", "format": "lora", "base_model": str(base_dir), "seed": seed})
    )
    return path


# Two seeds that differ in everything the scaling depends on: rank, alpha, rsLoRA, per-module patterns.
LORA_SEED_KWARGS = [
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"]),
    dict(
        r=2,
        lora_alpha=16,
        use_rslora=True,
        target_modules=["q_proj", "v_proj", "up_proj", "embed_tokens"],
        rank_pattern={"layers.1.self_attn.q_proj": 3},
        alpha_pattern={"v_proj": 5},
    ),
]


@pytest.fixture(scope="module")
def lora_seeds(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> list[Path]:
    root = tmp_path_factory.mktemp("lora")
    return [
        _save_lora(root / f"sft-seed{i + 1}", tiny_model_dir, i + 1, tiny_tokenizer, **kw)
        for i, kw in enumerate(LORA_SEED_KWARGS)
    ]


@pytest.fixture(scope="module")
def lora_seeds_no_embed(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> list[Path]:
    """Equal ranks, no embedding adapter: for `approx_average` and `merge` (the tiny base ties its embeddings)."""
    root = tmp_path_factory.mktemp("lora-noemb")
    kw = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])
    return [_save_lora(root / f"sft-seed{s}", tiny_model_dir, s, tiny_tokenizer, **kw) for s in (1, 2)]


def _ids(tokenizer) -> torch.Tensor:
    return tokenizer(["What is 2 + 3? The answer is 5."], return_tensors="pt").input_ids


@torch.no_grad()
def _dense_reference_logits(base_dir: Path, adapter_dirs: list[Path], weights: list[float], ids) -> torch.Tensor:
    """Logits of the base with `W0 + Σ_i w_i s_i B_i A_i` written into its weights by hand (the definition)."""
    model = _load_base(base_dir)
    # The tiny model ties lm_head to the embedding; the adapters change only the embedding lookup.
    model.lm_head.weight = torch.nn.Parameter(model.lm_head.weight.detach().clone())
    modules = dict(model.named_modules())
    for adapter_dir, w in zip(adapter_dirs, weights, strict=True):
        cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
        sd = load_file(adapter_dir / "adapter_model.safetensors")
        for key, a in sd.items():
            if ".lora_A." not in key and not key.endswith("lora_embedding_A"):
                continue
            b = sd[key.replace("lora_A", "lora_B").replace("lora_embedding_A", "lora_embedding_B")]
            name = key.removeprefix("base_model.model.").split(".lora_")[0]
            r, s = lora_scaling(cfg, name)
            naive_s = cfg.get("alpha_pattern", {}).get(name.split(".")[-1], cfg["lora_alpha"]) / (
                math.sqrt(r) if cfg.get("use_rslora") else r
            )
            assert s == pytest.approx(naive_s)  # our reading of the patterns agrees with a by-hand reading
            delta = w * s * (b.double() @ a.double())  # (out, r) @ (r, in)
            weight = modules[name].weight
            weight += (delta.T if key.endswith("lora_embedding_A") else delta).to(weight.dtype)
    return model(ids).logits


@torch.no_grad()
def _peft_logits(base_dir: Path, adapter_dir: Path, ids) -> torch.Tensor:
    from peft import PeftModel

    return PeftModel.from_pretrained(_load_base(base_dir), adapter_dir).eval()(ids).logits


def _assert_failed_cleanly(tmp_path: Path, out: Path, match: str, cfg: SoupConfig) -> None:
    with pytest.raises(SalsaError, match=match):
        run_soup(cfg, quiet=True)
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.tmp")]


# ---------------------------------------------------------------- weights


def test_weights_default_uniform_and_alpha():
    assert resolve_weights(3) == pytest.approx([1 / 3] * 3)
    assert resolve_weights(2, alpha=0.25) == [0.75, 0.25]
    assert resolve_weights(1) == [1.0]
    assert resolve_weights(2, alpha=1.5, allow_extrapolation=True) == [-0.5, 1.5]
    assert resolve_weights(3, [0.2, 0.3, 0.5]) == [0.2, 0.3, 0.5]


@pytest.mark.parametrize(
    ("n", "kwargs", "match"),
    [
        (0, {}, "no inputs"),
        (3, {"weights": [0.5, 0.5]}, "2 weights were given for 3 inputs"),
        (2, {"weights": [1.5, -0.5]}, "allow_extrapolation"),
        (2, {"weights": [0.5, 0.6]}, "sum to 1.1"),
        (2, {"weights": [0.5, 0.6], "allow_extrapolation": True}, "sum to 1.1"),
        (3, {"alpha": 0.5}, "exactly two inputs"),
        (2, {"alpha": 0.5, "weights": [0.5, 0.5]}, "only one"),
        (2, {"weights": [float("nan"), 1.0]}, "NaN"),
        (2, {"alpha": -0.1}, "allow_extrapolation"),
    ],
)
def test_weights_rejected(n, kwargs, match):
    with pytest.raises(SalsaError, match=match):
        resolve_weights(n, **kwargs)


# ---------------------------------------------------------------- the tensor math


def test_weighted_sum_hand_computed_and_naive_loop():
    a, b, c = torch.tensor([1.0, 2.0]), torch.tensor([3.0, -4.0]), torch.tensor([0.5, 8.0])
    assert torch.equal(weighted_sum([a, b], [0.25, 0.75]), torch.tensor([2.5, -2.5]))
    ts = [torch.randn(5, 7, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    w = [0.1, 0.2, 0.3, 0.4]
    naive = torch.zeros(5, 7, dtype=torch.float64)
    for t, wi in zip(ts, w, strict=True):
        naive += wi * t.double()
    torch.testing.assert_close(weighted_sum(ts, w), naive.float(), rtol=1e-6, atol=1e-7)
    # a reused workspace (the streaming path) gives the same numbers
    ws = torch.full((100,), float("nan"))
    assert torch.equal(weighted_sum(iter(ts), w, workspace=ws), weighted_sum(ts, w))
    assert torch.equal(weighted_sum([a, b, c], [1.0, 0.0, 0.0]), a)


def test_weighted_sum_bf16_accumulates_in_float32():
    # 256 copies of a bf16 value: a bf16 accumulator would stall, float32 gives the value back exactly
    t = torch.full((3,), 1.0 + 2**-7, dtype=torch.bfloat16)
    out = weighted_sum([t] * 256, [1 / 256] * 256)
    assert out.dtype == torch.bfloat16 and torch.equal(out, t)


def test_weighted_sum_integer_buffers_must_match():
    i = torch.arange(4)
    assert torch.equal(weighted_sum([i, i.clone()], [0.5, 0.5]), i)
    with pytest.raises(SalsaError, match="integer"):
        weighted_sum([i, i + 1], [0.5, 0.5])


def test_soup_state_dicts_matches_naive_and_checks_keys(tiny_tokenizer):
    from salsa_lightning.models.tiny import make_tiny_model

    sds = [make_tiny_model(tiny_tokenizer, seed=s).state_dict() for s in (1, 2)]
    soup = soup_state_dicts(sds, [0.3, 0.7])
    for k, v in soup.items():
        torch.testing.assert_close(v, 0.3 * sds[0][k] + 0.7 * sds[1][k])
    # extrapolation (reward landscape beyond the segment) only when asked
    with pytest.raises(SalsaError, match="allow_extrapolation"):
        soup_state_dicts(sds, [1.5, -0.5])
    far = soup_state_dicts(sds, [1.5, -0.5], allow_extrapolation=True)
    k = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(far[k], 1.5 * sds[0][k] - 0.5 * sds[1][k])
    with pytest.raises(SalsaError, match="different tensors"):
        soup_state_dicts([sds[0], {k: v for k, v in sds[1].items() if "layers.1" not in k}])


def test_lora_delta_is_scaled_b_times_a():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[3.0], [4.0]])  # r = 1, in = 2, out = 2
    assert torch.equal(lora_delta(a, b, 0.5), torch.tensor([[1.5, 3.0], [2.0, 4.0]], dtype=torch.float64))


# ---------------------------------------------------------------- full-weight soup (files)


def test_full_soup_equals_naive_average_and_loads(tmp_path, full_seeds, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "soup"
    w = [0.2, 0.3, 0.5]
    manifest = run_soup(SoupConfig(inputs=[str(p) for p in full_seeds], weights=w, output_dir=str(out)), quiet=True)
    got = load_file(out / "model.safetensors")
    sds = [load_file(p / "model.safetensors") for p in full_seeds]
    naive = {k: sum(wi * sd[k].double() for wi, sd in zip(w, sds, strict=True)).float() for k in sds[0]}
    assert got.keys() == naive.keys()
    for k in naive:
        torch.testing.assert_close(got[k], naive[k], rtol=1e-6, atol=1e-7)
    # the output is a plain HF model directory with the inputs' tokenizer and config
    model = AutoModelForCausalLM.from_pretrained(out)
    for k, v in model.state_dict().items():
        if k in got:
            assert torch.equal(v, got[k])
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    # manifest and resolved config
    assert read_manifest(out) == json.loads(json.dumps(manifest))
    assert manifest["stage"] == "soup" and manifest["format"] == "full" and manifest["weights"] == w
    assert [i["sha256"] for i in manifest["inputs"]] == [sha256_file(p / "model.safetensors") for p in full_seeds]
    assert [i["seed"] for i in manifest["inputs"]] == [1, 2, 3]
    assert 0 <= manifest["max_rel_error"] < 1e-6 and manifest["verified"]
    assert SoupConfig(**yaml.safe_load((out / "config.yaml").read_text())).weights == w


def test_full_soup_of_identical_models_is_the_model(tmp_path, full_seeds):
    copies = []
    for i in range(3):
        copies.append(tmp_path / f"copy{i}")
        shutil.copytree(full_seeds[0], copies[-1])
    run_soup(SoupConfig(inputs=[str(p) for p in copies], output_dir=str(tmp_path / "soup")), quiet=True)
    got, ref = load_file(tmp_path / "soup" / "model.safetensors"), load_file(full_seeds[0] / "model.safetensors")
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], rtol=2e-7, atol=0)  # 3 × (1/3) in float32: within an ulp


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_full_soup_alpha_endpoints_are_exact(tmp_path, full_seeds, alpha):
    run_soup(SoupConfig(inputs=[str(p) for p in full_seeds[:2]], alpha=alpha, output_dir=str(tmp_path / "s")), True)
    got = load_file(tmp_path / "s" / "model.safetensors")
    ref = load_file(full_seeds[int(alpha)] / "model.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


def test_full_soup_sharded_bf16_inputs(tmp_path, tiny_tokenizer):
    seeds = [
        _save_full(tmp_path / f"in{s}", tiny_tokenizer, seed=s, dtype=torch.bfloat16, max_shard_size="20KB")
        for s in (1, 2)
    ]
    assert (seeds[0] / "model.safetensors.index.json").is_file()
    out = tmp_path / "soup"
    run_soup(SoupConfig(inputs=[str(p) for p in seeds], output_dir=str(out)), quiet=True)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    got = {}
    for f in sorted(set(index["weight_map"].values())):
        got.update(load_file(out / f))
    from transformers import AutoModelForCausalLM

    ins = [AutoModelForCausalLM.from_pretrained(p).state_dict() for p in seeds]
    for k, v in got.items():
        assert v.dtype == torch.bfloat16
        assert torch.equal(v, ((ins[0][k].float() + ins[1][k].float()) / 2).to(torch.bfloat16))
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16


def test_one_input_is_allowed_and_said(tmp_path, full_seeds):
    m = run_soup(SoupConfig(inputs=[str(full_seeds[0])], output_dir=str(tmp_path / "s")), quiet=True)
    assert m["weights"] == [1.0] and "one input" in m["notes"][0]
    got, ref = load_file(tmp_path / "s" / "model.safetensors"), load_file(full_seeds[0] / "model.safetensors")
    assert all(torch.equal(got[k], ref[k]) for k in ref)


# ---------------------------------------------------------------- bad full-weight inputs


def _rewrite(src: Path, dst: Path, edit) -> Path:
    shutil.copytree(src, dst)
    sd = load_file(dst / "model.safetensors")
    edit(sd)
    save_file(sd, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("architecture", "different architectures"),
        ("missing_key", "different tensors"),
        ("shape", "has shape"),
        ("truncated", "truncated"),
        ("garbage", "not safetensors"),
        ("missing_dir", "not a directory"),
        ("bin_only", "PyTorch .bin"),
        ("mixed", "mix full-weight models and LoRA adapters"),
        ("weights_count", "2 weights were given for 3 inputs"),
        ("negative", "allow_extrapolation"),
        ("sum", "not 1"),
        ("merge", "applies to LoRA adapters"),
    ],
)
def test_bad_full_inputs_fail_cleanly(tmp_path, full_seeds, lora_seeds, tiny_tokenizer, case, match):
    a, b = str(full_seeds[0]), tmp_path / "b"
    inputs, weights = [a, str(b)], None
    if case == "architecture":
        _save_full(b, tiny_tokenizer, seed=2, hidden_size=16)
    elif case == "missing_key":
        _rewrite(full_seeds[1], b, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    elif case == "shape":
        _rewrite(full_seeds[1], b, lambda sd: sd.update({"model.norm.weight": torch.ones(7)}))
    elif case == "truncated":
        shutil.copytree(full_seeds[1], b)
        data = (b / "model.safetensors").read_bytes()
        (b / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "garbage":
        shutil.copytree(full_seeds[1], b)
        (b / "model.safetensors").write_bytes(b"\x00not a safetensors file")
    elif case == "missing_dir":
        pass
    elif case == "bin_only":
        b.mkdir()
        (b / "pytorch_model.bin").write_bytes(b"")
    elif case == "mixed":
        inputs = [a, str(lora_seeds[0])]
    else:
        inputs = [str(p) for p in full_seeds]
        weights = {"weights_count": [0.5, 0.5], "negative": [1.2, -0.1, -0.1], "sum": [0.5, 0.5, 0.5]}.get(case)
    out = tmp_path / "soup"
    cfg = SoupConfig(inputs=inputs, weights=weights, output_dir=str(out), merge=case == "merge")
    _assert_failed_cleanly(tmp_path, out, match, cfg)


def test_output_dir_rules(tmp_path, full_seeds):
    out = tmp_path / "soup"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SalsaError, match="already exists"):
        run_soup(SoupConfig(inputs=[str(p) for p in full_seeds], output_dir=str(out)), quiet=True)
    assert (out / "keep.txt").is_file()
    with pytest.raises(SalsaError, match="is also an input"):
        run_soup(SoupConfig(inputs=[str(full_seeds[0])], output_dir=str(full_seeds[0]), overwrite=True), quiet=True)
    assert (full_seeds[0] / "model.safetensors").is_file()
    run_soup(SoupConfig(inputs=[str(p) for p in full_seeds], output_dir=str(out), overwrite=True), quiet=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()


# ---------------------------------------------------------------- LoRA soup


def test_lora_cat_soup_forward_equals_dense_average(tmp_path, lora_seeds, tiny_model_dir, tiny_tokenizer):
    w = [0.3, 0.7]
    out = tmp_path / "soup"
    m = run_soup(SoupConfig(inputs=[str(p) for p in lora_seeds], weights=w, output_dir=str(out)), quiet=True)
    assert m["format"] == "lora" and m["exact"] and m["max_rel_error"] < 1e-6
    assert m["base_model"] == str(tiny_model_dir)
    ids = _ids(tiny_tokenizer)
    ref = _dense_reference_logits(tiny_model_dir, lora_seeds, w, ids)
    base = _load_base(tiny_model_dir)(ids).logits
    assert (ref - base).abs().max() > 1e-2  # the adapters do change the model
    torch.testing.assert_close(_peft_logits(tiny_model_dir, out, ids), ref, rtol=1e-5, atol=1e-5)
    # rank Σ r_i per module, including the per-module patterns of the inputs
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert lora_scaling(cfg, "model.layers.0.self_attn.q_proj") == (6, 1.0)
    assert lora_scaling(cfg, "model.layers.1.self_attn.q_proj") == (7, 1.0)
    assert (out / "tokenizer.json").is_file() and (out / "config.yaml").is_file()


def test_lora_soup_in_memory_as_a_named_adapter(lora_seeds, tiny_model_dir, tiny_tokenizer):
    """The PPO anchor: the soup added beside the policy adapter on one base, no files written."""
    from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

    model = PeftModel.from_pretrained(_load_base(tiny_model_dir), lora_seeds[0], adapter_name="policy")
    # seed 1 straight from the live model (as PPO holds it), seed 2 from disk
    live = LoraAdapter(get_peft_model_state_dict(model, adapter_name="policy"), model.peft_config["policy"].to_dict())
    soup = soup_lora_adapters([live, load_lora_adapter(lora_seeds[1])], [0.5, 0.5])
    model.add_adapter("soup", soup.peft_config())
    set_peft_model_state_dict(model, soup.state_dict, adapter_name="soup")
    model.set_adapter("soup")
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        got = model(ids).logits
    torch.testing.assert_close(got, _dense_reference_logits(tiny_model_dir, lora_seeds, [0.5, 0.5], ids))


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_lora_alpha_endpoints(tmp_path, lora_seeds, tiny_model_dir, tiny_tokenizer, alpha):
    out = tmp_path / "soup"
    run_soup(SoupConfig(inputs=[str(p) for p in lora_seeds], alpha=alpha, output_dir=str(out)), quiet=True)
    ids = _ids(tiny_tokenizer)
    endpoint = _peft_logits(tiny_model_dir, lora_seeds[int(alpha)], ids)
    torch.testing.assert_close(_peft_logits(tiny_model_dir, out, ids), endpoint, rtol=1e-5, atol=1e-5)


def test_lora_extrapolation_matches_dense(lora_seeds, tiny_model_dir):
    adapters = [load_lora_adapter(p) for p in lora_seeds]
    with pytest.raises(SalsaError, match="allow_extrapolation"):
        soup_lora_adapters(adapters, [1.5, -0.5])
    assert soup_lora_adapters(adapters, [1.5, -0.5], allow_extrapolation=True).max_rel_error < 1e-6


def test_lora_approx_average_is_named_inexact(tmp_path, lora_seeds_no_embed, lora_seeds):
    out = tmp_path / "approx"
    cfg = SoupConfig(
        inputs=[str(p) for p in lora_seeds_no_embed], output_dir=str(out), lora_combination="approx_average"
    )
    m = run_soup(cfg, quiet=True)
    assert m["exact"] is False and m["max_rel_error"] > 1e-2  # cross terms B_i A_j: not the soup
    cfg = SoupConfig(
        inputs=[str(p) for p in lora_seeds], output_dir=str(tmp_path / "x"), lora_combination="approx_average"
    )
    _assert_failed_cleanly(tmp_path, tmp_path / "x", "equal ranks", cfg)


def test_lora_merge_writes_a_full_model(tmp_path, lora_seeds_no_embed, lora_seeds, tiny_model_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    m = run_soup(SoupConfig(inputs=[str(p) for p in lora_seeds_no_embed], output_dir=str(out), merge=True), quiet=True)
    assert m["format"] == "full" and m["merged"]
    ids = _ids(tiny_tokenizer)
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(out)(ids).logits
    ref = _dense_reference_logits(tiny_model_dir, lora_seeds_no_embed, [0.5, 0.5], ids)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (out / "tokenizer.json").is_file()
    # an adapter on a tied input embedding cannot be merged without changing the output layer too
    cfg = SoupConfig(inputs=[str(p) for p in lora_seeds], output_dir=str(tmp_path / "x"), merge=True)
    _assert_failed_cleanly(tmp_path, tmp_path / "x", "ties", cfg)


def _edit_adapter(src: Path, dst: Path, config_edit=None, sd_edit=None) -> Path:
    shutil.copytree(src, dst)
    if config_edit:
        cfg = json.loads((dst / "adapter_config.json").read_text())
        config_edit(cfg)
        (dst / "adapter_config.json").write_text(json.dumps(cfg))
    if sd_edit:
        sd = load_file(dst / "adapter_model.safetensors")
        sd_edit(sd)
        save_file(sd, dst / "adapter_model.safetensors", metadata={"format": "pt"})
    return dst


@pytest.mark.parametrize(
    ("case", "match"),
    [
        ("other_base", "different base models"),
        ("other_base_weights", "different base weights"),
        ("other_targets", "different target modules"),
        ("other_shapes", "different base models"),
        ("dora", "DoRA"),
        ("rank_mismatch", "rank 4 in its tensors but 5"),
        ("tolerance", "verify_tolerance"),
    ],
)
def test_bad_lora_inputs_fail_cleanly(tmp_path, lora_seeds, tiny_tokenizer, tiny_model_dir, case, match):
    a, b = lora_seeds
    kwargs = {}
    if case == "other_base":
        (tmp_path / "b").mkdir()
        b = _edit_adapter(b, tmp_path / "b" / "x")
        (b / "salsa_manifest.json").write_text(json.dumps({"stage": "sft", "base_model": "some/other-model"}))
    elif case == "other_base_weights":
        key = "base_model.model.model.embed_tokens.base_layer.weight"
        b = _edit_adapter(b, tmp_path / "b", sd_edit=lambda sd: sd[key].add_(1.0))
    elif case == "other_targets":
        b = _edit_adapter(b, tmp_path / "b", sd_edit=lambda sd: [sd.pop(k) for k in list(sd) if "up_proj" in k])
    elif case == "other_shapes":
        b = _save_lora(tmp_path / "b", _save_full(tmp_path / "base2", tiny_tokenizer, 0, hidden_size=16), 2,
                       tiny_tokenizer, **LORA_SEED_KWARGS[1])  # fmt: skip
        (b / "salsa_manifest.json").unlink()  # only the shapes tell
        json_edit = json.loads((b / "adapter_config.json").read_text())
        json_edit["base_model_name_or_path"] = None
        (b / "adapter_config.json").write_text(json.dumps(json_edit))
        b = _edit_adapter(b, tmp_path / "b2", sd_edit=lambda sd: [sd.pop(k) for k in list(sd) if "base_layer" in k])
        a = _edit_adapter(a, tmp_path / "a2", sd_edit=lambda sd: [sd.pop(k) for k in list(sd) if "base_layer" in k])
    elif case == "dora":
        b = _edit_adapter(b, tmp_path / "b", config_edit=lambda c: c.update(use_dora=True))
    elif case == "rank_mismatch":
        a = _edit_adapter(a, tmp_path / "a", config_edit=lambda c: c.update(r=5))
    elif case == "tolerance":
        kwargs = {"verify_tolerance": 0.0, "weights": [1 / 3, 2 / 3]}
    out = tmp_path / "soup"
    _assert_failed_cleanly(tmp_path, out, match, SoupConfig(inputs=[str(a), str(b)], output_dir=str(out), **kwargs))


# ---------------------------------------------------------------- config


def test_quickstart_config_runs(tmp_path, monkeypatch, tiny_model_dir, tiny_tokenizer):
    raw = yaml.safe_load((REPO / "configs" / "quickstart" / "soup.yaml").read_text())
    cfg = SoupConfig(**raw)
    monkeypatch.chdir(tmp_path)
    for i, p in enumerate(cfg.inputs):
        _save_lora(Path(p), tiny_model_dir, i + 1, tiny_tokenizer, **LORA_SEED_KWARGS[i])
    m = run_soup(cfg, quiet=True)
    assert m["format"] == "lora" and Path(cfg.output_dir, "adapter_model.safetensors").is_file()


def test_config_fields_have_help():
    from jsonargparse import ArgumentParser, set_parsing_settings

    set_parsing_settings(docstring_parse_attribute_docstrings=True)  # what the CLI sets for `--help`
    try:
        parser = ArgumentParser()
        parser.add_class_arguments(SoupConfig)
        help_text = " ".join(parser.format_help().split())
    finally:
        set_parsing_settings(docstring_parse_attribute_docstrings=False)
    assert "not the soup, only for comparison" in help_text
    assert "Two inputs only: the weights become (1 - alpha, alpha)" in help_text
    cfg = parser.parse_args(["--inputs=[a,b]", "--alpha=0.3", "--output_dir=o"])
    assert SoupConfig(**cfg.as_dict()) == SoupConfig(inputs=["a", "b"], alpha=0.3, output_dir="o")


def test_pattern_key_is_peft_s_rule():
    """The soup's own copy of PEFT's rank/alpha-pattern lookup (PEFT is not imported by a soup) agrees with PEFT."""
    from peft.utils.other import get_pattern_key

    from salsa_lightning.soup.lora import pattern_key

    keys = ["layers.1.self_attn.q_proj", "v_proj", r"layers\.[02]\.mlp\.up_proj", "q_proj"]
    modules = ["model.layers.1.self_attn.q_proj", "model.layers.0.self_attn.q_proj", "model.layers.3.self_attn.v_proj",
               "model.layers.2.mlp.up_proj", "model.layers.1.mlp.up_proj", "model.xv_proj", "model.embed_tokens"]  # fmt: skip
    for module in modules:
        assert pattern_key(keys, module) == get_pattern_key(keys, module), module


# ---------------------------------------------------------------- non-finite inputs (issue 13)
def _with_nan(sd: dict) -> None:
    name = next(k for k in sorted(sd) if sd[k].is_floating_point())
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] = float("nan")


def test_full_soup_refuses_a_nan_input_naming_tensor_and_file(tmp_path, full_seeds):
    bad = _rewrite(full_seeds[1], tmp_path / "bad", _with_nan)
    out = tmp_path / "soup"
    cfg = SoupConfig(inputs=[str(full_seeds[0]), str(bad)], output_dir=str(out))
    _assert_failed_cleanly(tmp_path, out, r"holds NaN or inf.*allow_nonfinite", cfg)
    with pytest.raises(SalsaError, match=str(bad / "model.safetensors")):
        run_soup(cfg, quiet=True)


def test_full_soup_with_nan_allowed_is_written_and_verified_on_the_finite_part(tmp_path, full_seeds):
    bad = _rewrite(full_seeds[1], tmp_path / "bad", _with_nan)
    out = tmp_path / "soup"
    run_soup(SoupConfig(inputs=[str(full_seeds[0]), str(bad)], output_dir=str(out), allow_nonfinite=True,
                        verify_samples=1000), quiet=True)  # fmt: skip
    manifest = read_manifest(out)
    assert manifest["allow_nonfinite"] is True and math.isfinite(manifest["max_rel_error"])
    assert any(torch.isnan(t).any() for t in load_file(out / "model.safetensors").values())


def test_lora_soup_refuses_a_nan_adapter(tmp_path, lora_seeds):
    bad = tmp_path / "bad"
    shutil.copytree(lora_seeds[1], bad)
    sd = load_file(bad / "adapter_model.safetensors")
    _with_nan(sd)
    save_file(sd, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "soup"
    cfg = SoupConfig(inputs=[str(lora_seeds[0]), str(bad)], output_dir=str(out))
    _assert_failed_cleanly(tmp_path, out, r"holds NaN or inf.*allow_nonfinite", cfg)


def test_verification_error_keeps_nan():
    from salsa_lightning.soup.full import _rel_error, worst_error

    ref = torch.ones(4, dtype=torch.float64)
    got = ref.clone()
    got[0] = float("nan")
    assert math.isnan(_rel_error(got, ref))
    assert math.isnan(worst_error(0.0, math.nan)) and math.isnan(worst_error(math.nan, 0.5))  # max() would say 0.5
    assert worst_error(1e-7, 2e-7) == 2e-7
    both = ref.clone()
    both[0] = float("nan")
    assert _rel_error(got, both, allow_nonfinite=True) == 0.0 and math.isnan(_rel_error(got, both))
