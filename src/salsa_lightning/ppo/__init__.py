"""PPO orchestration: the model stack (full-weight and LoRA layouts) and the PPO LightningModule's helpers."""
