"""Loading models and tokenizers: the one place every stage goes through.

A model is named by a `ModelSpec.name_or_path` that is any of
  - `embedded:smollm2-135m-instruct` — the embedded default (see `embedded.py`);
  - a local directory in HF format (full weights, or a PEFT adapter directory);
  - a previous stage's output directory (same thing, plus `salsa_manifest.json`);
  - a Hugging Face Hub id (`HuggingFaceTB/SmolLM2-135M-Instruct`), on machines that reach the Hub.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import torch

from salsa_lightning.errors import SalsaError
from salsa_lightning.models.embedded import PREFIX as EMBEDDED_PREFIX
from salsa_lightning.models.embedded import resolve_embedded

# ModelSpec and LoraSpec live in models.spec (plain data); imported here too, where callers have always found them
from salsa_lightning.models.spec import DEFAULT_MODEL, DTYPES, NAMED_CHAT_TEMPLATES, LoraSpec, ModelSpec  # noqa: F401
from salsa_lightning.stage import read_manifest


def resolve_dtype(dtype: str) -> torch.dtype:
    if dtype == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return DTYPES[dtype]


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or Path(name).suffix in {".json", ".safetensors"}


def resolve_model_path(name_or_path: str) -> str:
    """A local path for embedded and local models, the id itself for Hub models."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return str(resolve_embedded(name_or_path[len(EMBEDDED_PREFIX) :]))
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not path.is_dir():
            raise SalsaError(f"The model path {path} is a file; pass the directory that holds config.json.")
        if not ((path / "config.json").is_file() or (path / "adapter_config.json").is_file()):
            raise SalsaError(
                f"{name_or_path} is not a model directory (no config.json or adapter_config.json); "
                "pass a stage output or an HF-format model directory."
            )
        return str(path.resolve())  # absolute: adapter configs and manifests must work from any directory
    if _looks_like_path(name_or_path):
        raise SalsaError(
            f"The model directory {name_or_path} does not exist; check the path (or run the stage that writes it)."
        )
    return name_or_path


def canonical_model_ref(name_or_path: str) -> str:
    """How a manifest records a model: `embedded:` names and Hub ids as given, local directories absolute."""
    if name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    path = Path(name_or_path).expanduser()
    return str(path.resolve()) if path.exists() else name_or_path


def base_model_of(name_or_path: str) -> str:
    """The model a stage output builds on: an adapter's frozen base, or (full weights) the model itself."""
    path = resolve_model_path(name_or_path)
    return adapter_base(path) if is_adapter_dir(path) else canonical_model_ref(name_or_path)


def is_adapter_dir(path: str) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


POLICY_STAGES = {"sft", "soup", "ppo", "salsa", "mkl"}  # stage outputs that are causal LMs


def model_kind(path: str) -> str | None:
    """`reward` (a sequence-classification model with a trained `score` head), `policy` (a causal LM), or None when
    a local directory does not say (a Hub id, or a plain HF directory of unknown architecture). Read from the stage
    manifest, else the PEFT adapter's `task_type`, else the model config's architecture — no weights are loaded."""
    p = Path(path).expanduser()
    if not p.is_dir():
        return None
    stage = (read_manifest(p) or {}).get("stage")
    if stage == "reward":
        return "reward"
    if stage in POLICY_STAGES:
        return "policy"
    if is_adapter_dir(str(p)):
        task = json.loads((p / "adapter_config.json").read_text()).get("task_type")
        return {"SEQ_CLS": "reward", "CAUSAL_LM": "policy"}.get(task)
    if (p / "config.json").is_file():
        archs = json.loads((p / "config.json").read_text()).get("architectures") or []
        if any(a.endswith("ForSequenceClassification") for a in archs):
            return "reward"
        if any(a.endswith("ForCausalLM") for a in archs):
            return "policy"
    return None


def check_model_role(path: str, role: str, field: str) -> None:
    """One sentence when the model at `path` is the wrong kind of stage output for `field`: a reward model where a
    policy goes (it would train or generate from an untrained LM head), or a policy where a reward model goes (it
    would score with a randomly initialised `score` head)."""
    kind = model_kind(resolve_model_path(path))
    if kind is None or kind == role:
        return
    if role == "policy":
        raise SalsaError(
            f"`{field}` is {path}, a reward model; it needs a policy (an SFT, soup or PPO stage output) — pass the "
            "reward model as `reward_model` instead."
        )
    raise SalsaError(
        f"`{field}` is {path}, a policy (SFT/soup/PPO output) with no trained reward head; pass a reward stage output "
        "(`python -m salsa_lightning fit --config .../reward.yaml` writes one)."
    )


def adapter_base(path: str) -> str:
    """The base model an adapter directory was trained on: the manifest's spec when there is one (it
    re-resolves `embedded:` names on another machine), else PEFT's own record."""
    manifest = read_manifest(path) or {}
    if manifest.get("base_model"):
        return manifest["base_model"]
    return json.loads((Path(path) / "adapter_config.json").read_text())["base_model_name_or_path"]


def _hub_error(name: str, err: Exception) -> SalsaError:
    return SalsaError(
        f"Could not load model '{name}': it is not a local directory and the Hugging Face Hub could not serve it "
        f"({type(err).__name__}); check the id and your network, or pass a local path or `{DEFAULT_MODEL}`."
    )


def load_tokenizer(spec: ModelSpec | str, padding_side: str = "right"):
    """The tokenizer of a model (a stage output carries its own; a bare adapter falls back to its base).

    A tokenizer without a pad token gets its EOS token as pad (said in a warning): generation and
    batching need one, and masks — never token ids — decide what is padding everywhere in this package.
    """
    from transformers import AutoTokenizer

    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    path = resolve_model_path(spec.name_or_path)
    source = path
    if is_adapter_dir(path) and not (Path(path) / "tokenizer_config.json").is_file():
        source = resolve_model_path(adapter_base(path))
    try:
        tok = AutoTokenizer.from_pretrained(source, trust_remote_code=spec.trust_remote_code, revision=spec.revision)
    except OSError as err:
        raise _hub_error(spec.name_or_path, err) from err
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise SalsaError(f"The tokenizer of {spec.name_or_path} has neither a pad nor an EOS token; add one.")
        warnings.warn(f"The tokenizer of {spec.name_or_path} has no pad token; using its EOS token {tok.eos_token!r}.")
        tok.pad_token = tok.eos_token
    if spec.chat_template is not None:
        tok.chat_template = NAMED_CHAT_TEMPLATES.get(spec.chat_template, spec.chat_template)
    if tok.chat_template is None:
        raise SalsaError(
            f"The tokenizer of {spec.name_or_path} has no chat template; use an instruct/chat model or set one "
            "with `model.chat_template: zephyr` (or chatml, or a Jinja string)."
        )
    tok.padding_side = padding_side
    return tok


def _from_pretrained(cls, name: str, spec: ModelSpec, new_head: str | None = None, **kwargs):
    """`cls.from_pretrained` with the spec's settings. `new_head`: a module the checkpoint lacks by design (a reward
    model's `score` on an SFT model), whose "newly initialized" load report is not shown (see `_NewHeadReport`)."""
    from salsa_lightning.models.quantization import is_quantized, prepare_quantized, quantized_load_kwargs

    path = resolve_model_path(name)
    kwargs = {
        **quantized_load_kwargs(spec),
        "dtype": resolve_dtype(spec.dtype),
        "trust_remote_code": spec.trust_remote_code,
        "revision": spec.revision,
        **({"attn_implementation": spec.attn_implementation} if spec.attn_implementation else {}),
        **spec.extra_kwargs,
        **kwargs,
    }
    try:
        if new_head is None:
            model = cls.from_pretrained(path, **kwargs)
        else:
            with _NewHeadReport(new_head) as report:
                model, report.info = cls.from_pretrained(path, output_loading_info=True, **kwargs)
    except OSError as err:
        raise _hub_error(name, err) from err
    except Exception as err:  # transformers' own words for a broken local model are not one sentence
        sentence = _local_model_error(path, spec, err)
        if sentence is None:
            raise
        raise sentence from err
    return prepare_quantized(model, spec) if is_quantized(spec) else model


def _local_model_error(path: str, spec: ModelSpec, err: Exception) -> SalsaError | None:
    """One sentence for what can be wrong with a local model directory (None when it is not that): weights that are
    truncated or not safetensors, or model code that needs `trust_remote_code`."""
    directory = Path(path)
    if not directory.is_dir():
        return None
    if type(err).__name__ == "SafetensorError":
        bad = next((f for f in sorted(directory.glob("*.safetensors")) if not _safetensors_header_ok(f)), None)
        return SalsaError(
            f"Cannot read the weights {bad or directory} ({err}); the file is truncated or not safetensors — re-run the "
            "stage that wrote it, or copy it again."
        )
    config = directory / "config.json"
    auto_map = json.loads(config.read_text()).get("auto_map") if config.is_file() else None
    if isinstance(err, ValueError) and auto_map and not spec.trust_remote_code:
        return SalsaError(
            f"The model in {directory} needs its own Python code ({config.name} has an auto_map); set "
            "`trust_remote_code: true` in the model settings only if you trust that code."
        )
    return None


def _safetensors_header_ok(path: Path) -> bool:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception:
        return False
    return True


class _NewHeadReport(logging.Filter):
    """Holds back transformers' load report (a warning of `transformers.modeling_utils`) while a model is loaded whose
    `head` is new by design, and drops it if the head's weights are all it reports missing; any other report, or
    any report when transformers' verbosity is info or lower (`TRANSFORMERS_VERBOSITY=info`), is shown as usual."""

    def __init__(self, head: str):
        super().__init__()
        self.head, self.held, self.info = head, [], None
        self.logger = logging.getLogger("transformers.modeling_utils")

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING:
            return True
        self.held.append(record)
        return False

    def __enter__(self) -> _NewHeadReport:
        if not self.logger.isEnabledFor(logging.INFO):
            self.logger.addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        self.logger.removeFilter(self)
        info = self.info or {}
        missing = set(info.get("missing_keys", ()))
        only_head = (
            missing
            and all(k == self.head or k.startswith(f"{self.head}.") for k in missing)
            and not info.get("unexpected_keys")
            and not info.get("mismatched_keys")
        )
        for record in self.held:
            if not (only_head and all(k in record.getMessage() for k in missing)):
                self.logger.handle(record)


def lora_config(lora: LoraSpec, task_type: str = "CAUSAL_LM", modules_to_save: list[str] | None = None):
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        use_rslora=lora.use_rslora,
        init_lora_weights=lora.init_lora_weights,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def lora_config_like(path: str, task_type: str, dropout: float, modules_to_save: list[str] | None = None):
    """A LoraConfig with the same shape (ranks, alphas, targets, scaling rule) as the adapter saved at `path`, for
    another task: a reward adapter that starts from an SFT adapter, or a causal-LM twin of a reward adapter."""
    from peft import LoraConfig

    saved = LoraConfig.from_pretrained(path)
    return LoraConfig(
        r=saved.r,
        lora_alpha=saved.lora_alpha,
        target_modules=saved.target_modules,
        rank_pattern=saved.rank_pattern,
        alpha_pattern=saved.alpha_pattern,
        use_rslora=saved.use_rslora,
        lora_dropout=dropout,
        task_type=task_type,
        modules_to_save=modules_to_save,
    )


def load_causal_lm(spec: ModelSpec | str, trainable: bool = True):
    """A causal LM ready to train or to score with.

    - full-weight directory + `spec.lora` -> a fresh LoRA adapter on the frozen base;
    - adapter directory -> its base + the adapter (trainable if `trainable`);
    - otherwise plain full weights (all trainable if `trainable`).
    """
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    from salsa_lightning.models.quantization import refuse_full_weights

    spec = ModelSpec(spec) if isinstance(spec, str) else spec
    path = resolve_model_path(spec.name_or_path)
    if trainable and spec.lora is None and not is_adapter_dir(path):
        refuse_full_weights(spec, f"Fine-tuning {spec.name_or_path} without `lora`")
    if is_adapter_dir(path):
        base = _from_pretrained(AutoModelForCausalLM, adapter_base(path), spec)
        model = PeftModel.from_pretrained(base, path, is_trainable=trainable)
    else:
        model = _from_pretrained(AutoModelForCausalLM, spec.name_or_path, spec)
        if spec.lora is not None:
            model = get_peft_model(model, lora_config(spec.lora))
    if spec.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    if not trainable:
        model.requires_grad_(False)
        model.eval()
    return model


def enable_gradient_checkpointing(model) -> None:
    """The model's own activation checkpointing (non-reentrant), with inputs that require grad so that a frozen
    base's checkpointed layers still pass gradients to the adapters inside them."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if hasattr(model, "enable_input_require_grads"):
        model.enable_input_require_grads()


def is_peft_model(model) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def merge_if_peft(model):
    """`model` with any PEFT adapter folded into its base weights (`merge_and_unload`); other models as they are."""
    return model.merge_and_unload() if is_peft_model(model) else model
