"""The reward landscape over soups of SFT seeds (paper Fig. 2, DESIGN §5), and the soup report.

    python -m salsa_lightning landscape --config configs/quickstart/landscape.yaml

- `grid`: the α line and the barycentric plane as pure functions, with their validation;
- `models`: one in-memory model set to any soup of the seeds through the soup API (full weights or LoRA);
- `points`: one point's responses, KL to its references, reward and gold score, from that one model;
- `judging`: the llm judge on every point against a reference point (`llm_reference`), its verdicts cached;
- `report`: per-point records, the soup report, CSV/Markdown/Rich tables, the line plot and the plane heat map;
- `run`: `run_landscape(LandscapeConfig)`, the stage itself.
"""
