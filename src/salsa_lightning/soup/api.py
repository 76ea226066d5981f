"""The soup's public API: the `soup` stage, and in-memory soups for PPO and the reward landscape.

from salsa_lightning.soup.api import SoupConfig, run_soup                  # the stage (files in, files out)
from salsa_lightning.soup.api import soup_state_dicts                      # full weights, in memory
from salsa_lightning.soup.api import LoraAdapter, soup_lora_adapters       # LoRA adapters, in memory
"""

from salsa_lightning.soup.config import SoupConfig
from salsa_lightning.soup.full import soup_state_dicts, weighted_sum
from salsa_lightning.soup.lora import (
    LoraAdapter,
    LoraSoup,
    load_lora_adapter,
    lora_delta,
    lora_scaling,
    merge_lora_soup,
    soup_lora_adapters,
)
from salsa_lightning.soup.run import run_soup
from salsa_lightning.soup.weights import resolve_weights

__all__ = [
    "LoraAdapter",
    "LoraSoup",
    "SoupConfig",
    "load_lora_adapter",
    "lora_delta",
    "lora_scaling",
    "merge_lora_soup",
    "resolve_weights",
    "run_soup",
    "soup_lora_adapters",
    "soup_state_dicts",
    "weighted_sum",
]
