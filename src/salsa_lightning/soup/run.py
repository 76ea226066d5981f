"""`run_soup`: the `soup` stage — inputs in, one self-describing output directory out (or nothing)."""

from __future__ import annotations

import dataclasses
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
import yaml
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from salsa_lightning import __version__
from salsa_lightning.errors import SalsaError
from salsa_lightning.soup.config import SoupConfig
from salsa_lightning.soup.full import plan_full_soup, write_full_soup
from salsa_lightning.soup.inputs import SoupInput, copy_side_files, describe_inputs
from salsa_lightning.soup.lora import LoraAdapter, load_lora_adapter, merge_lora_soup, soup_lora_adapters
from salsa_lightning.soup.weights import resolve_weights
from salsa_lightning.stage import CONFIG_NAME, atomic_output_dir, check_output_dir, write_manifest


def _check_paths(cfg: SoupConfig) -> Path:
    out = check_output_dir(cfg.output_dir, cfg.overwrite)
    for p in cfg.inputs:
        if Path(p).resolve() == out.resolve():
            raise SalsaError(f"The output directory {out} is also an input; write the soup somewhere else.")
    return out


def _common_base(inputs: list[SoupInput]) -> str | None:
    bases = {i.base_model for i in inputs if i.base_model}
    return bases.pop() if len(bases) == 1 else None


def run_soup(cfg: SoupConfig, quiet: bool = False) -> dict[str, Any]:
    """Build the soup described by `cfg` into `cfg.output_dir`; returns the manifest written there.

    Everything that can be checked is checked before anything is written (weights, paths, headers, shapes,
    adapter configs); the output is built in a temporary directory and renamed into place only when complete
    and verified, so a failure leaves nothing behind. Raises `SalsaError` for anything the user can fix.
    With `cfg.report`, the soup report (`soup.report`) is checked first and written into that same temporary
    directory once the soup is complete; its table is printed after the soup's.
    """
    console = Console(quiet=quiet)
    weights = resolve_weights(len(cfg.inputs), cfg.weights, cfg.alpha, cfg.allow_extrapolation)
    out = _check_paths(cfg)
    inputs, fmt = describe_inputs(list(cfg.inputs), cfg.mode)
    notes = []
    if len(inputs) == 1:
        notes.append("one input: the soup is that model (weight 1)")
        console.print(f"[yellow]Only one input: the soup is {inputs[0].path} itself.[/yellow]")
    if fmt == "full" and cfg.merge:
        raise SalsaError("`merge: true` applies to LoRA adapters, but the inputs are full weights; set `merge: false`.")
    if fmt == "lora" and cfg.lora_combination == "approx_average":
        console.print("[yellow]lora_combination=approx_average is NOT the soup (it adds cross terms).[/yellow]")
    report, report_plan, report_result = None, None, None
    if cfg.report is not None:
        # imported only here: the report loads the landscape, which builds its models through the soup API
        from salsa_lightning.soup import report

        report_plan = report.plan_report(cfg, fmt)  # checked, and its prompts read, before anything is built

    manifest: dict[str, Any] = {
        "stage": "soup",
        "salsa_lightning_version": __version__,
        "weights": weights,
        "alpha": cfg.alpha,
        "allow_extrapolation": cfg.allow_extrapolation,
        "input_format": fmt,
        "verify_tolerance": cfg.verify_tolerance,
        "allow_nonfinite": cfg.allow_nonfinite,
        "base_model": _common_base(inputs),
    }
    if notes:
        manifest["notes"] = notes

    if fmt == "full":
        plan = plan_full_soup(inputs)  # headers only: fails on bad inputs before any output exists
        # Hashing every input is as much CPU work as the soup itself; a thread overlaps it with the soup
        # (hashlib and file reads release the GIL).
        hasher = ThreadPoolExecutor(max_workers=1)
        digests = hasher.submit(lambda: [i.digests() for i in inputs])
        with hasher, atomic_output_dir(out, cfg.overwrite) as tmp:
            progress = Progress(
                TextColumn("soup"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=console,
                transient=True,
            )
            with progress:
                task = progress.add_task("tensors", total=len(plan.tensors))
                result = write_full_soup(
                    plan,
                    weights,
                    tmp,
                    on_tensor=lambda _: progress.advance(task),
                    verify_samples=cfg.verify_samples,
                    allow_nonfinite=cfg.allow_nonfinite,
                )
            if not result["max_rel_error"] <= cfg.verify_tolerance:
                raise SalsaError(
                    f"The soup deviates from the naive weighted sum by {result['max_rel_error']:.3g} (relative), above "
                    f"`verify_tolerance` {cfg.verify_tolerance:g}; check the inputs for NaNs or extreme values."
                )
            copy_side_files(inputs[0].path, tmp)
            if report_plan is not None:
                report_result = report.write_report(report_plan, weights, tmp, console)
                manifest["report"] = {k: v for k, v in report_result.items() if k != "rows"}
            manifest["inputs"] = digests.result()
            manifest.update(
                format="full",
                exact=True,
                max_rel_error=result["max_rel_error"],
                verified=result["verified_tensors"],
                files=result["files"],
            )
            _finish(tmp, cfg, manifest)
    else:
        adapters = [load_lora_adapter(i.path) for i in inputs]
        if not cfg.allow_nonfinite:
            for adapter in adapters:
                bad = next(
                    (k for k, v in adapter.state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()),
                    None,
                )
                if bad is not None:
                    raise SalsaError(
                        f"Tensor {bad} of the adapter {adapter.name} holds NaN or inf, which the soup would inherit; fix "
                        "or drop that input, or set `allow_nonfinite: true` to soup it anyway."
                    )
        manifest["inputs"] = [i.digests() for i in inputs]
        soup = soup_lora_adapters(
            adapters,
            weights,
            combination=cfg.lora_combination,
            allow_extrapolation=cfg.allow_extrapolation,
            verify_samples=cfg.verify_samples,
            verify_tolerance=cfg.verify_tolerance,
        )
        base = manifest["base_model"] or _adapter_base(adapters)
        manifest.update(
            lora_combination=cfg.lora_combination,
            exact=cfg.lora_combination == "cat",
            max_rel_error=soup.max_rel_error,
            verified=soup.verified_modules,
            base_model=base,
            merged=cfg.merge,
        )
        if cfg.merge and not base:
            raise SalsaError(
                "`merge: true` needs the base model, which neither the inputs' salsa_manifest.json (`base_model`) nor "
                "their adapter_config.json (`base_model_name_or_path`) names; record it there or set `merge: false`."
            )
        with atomic_output_dir(out, cfg.overwrite) as tmp:
            if cfg.merge:
                with console.status("merging the souped adapter into the base model"):
                    model = merge_lora_soup(soup, base)
                    model.save_pretrained(tmp)
                manifest["format"] = "full"
            else:
                soup.save(tmp)
                manifest["format"] = "lora"
                manifest["rank"] = {"r": soup.config["r"], "rank_pattern": soup.config.get("rank_pattern") or {}}
            # A merged model keeps the config.json that save_pretrained wrote; an adapter takes the input's files.
            copy_side_files(inputs[0].path, tmp, replace=not cfg.merge)
            if report_plan is not None:
                report_result = report.write_report(report_plan, weights, tmp, console)
                manifest["report"] = {k: v for k, v in report_result.items() if k != "rows"}
            _finish(tmp, cfg, manifest)
    _summary(console, cfg, manifest)
    if report_result is not None:
        console.print(report.soup_table(report_result["rows"]))
    return manifest


def _adapter_base(adapters: list[LoraAdapter]) -> str | None:
    bases = {a.base_model for a in adapters if a.base_model}
    return bases.pop() if len(bases) == 1 else None


def _finish(tmp: Path, cfg: SoupConfig, manifest: dict[str, Any]) -> None:
    (tmp / CONFIG_NAME).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    write_manifest(tmp, manifest)


def _summary(console: Console, cfg: SoupConfig, manifest: dict[str, Any]) -> None:
    table = Table(title=f"soup -> {cfg.output_dir}", show_header=True)
    table.add_column("input")
    table.add_column("weight", justify="right")
    table.add_column("sha256")
    for inp, w in zip(manifest["inputs"], manifest["weights"], strict=True):
        table.add_row(inp["path"], f"{w:.4g}", inp["sha256"][:12])
    console.print(table)
    kind = manifest["format"]
    if manifest["input_format"] == "lora":
        kind += f" (LoRA {manifest['lora_combination']}{', merged' if manifest['merged'] else ''})"
    console.print(
        f"format: {kind}   exact: {manifest['exact']}   max relative error: {manifest['max_rel_error']:.2e} "
        f"over {len(manifest['verified'])} verified layers"
    )
