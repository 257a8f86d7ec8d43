"""Learning-rate schedule: linear warmup, then cosine (or linear) decay to lr * min_lr_ratio."""

from __future__ import annotations

import math


def lr_factor(step: int, warmup_steps: int, max_steps: int, min_lr_ratio: float, shape: str = "cosine") -> float:
    """Multiplier of the peak lr after `step` optimizer steps (LambdaLR convention); shape cosine or linear."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if max_steps <= warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    decay = 1.0 - progress if shape == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def param_groups(params, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on matrices only; `trainable_parameters()` may hand dicts with an
    `lr_scale` (e.g. heads at a multiple of the adapters' rate) besides plain parameters."""
    groups: dict[tuple, list] = {}
    for item in params:
        ps, scale = (item["params"], float(item.get("lr_scale", 1.0))) if isinstance(item, dict) else ([item], 1.0)
        for p in ps:
            groups.setdefault((scale, p.ndim >= 2), []).append(p)
    return [{"params": ps, "weight_decay": weight_decay if dec else 0.0, "lr_scale": scale}
            for (scale, dec), ps in sorted(groups.items(), key=lambda kv: (kv[0][0] != 1.0, kv[0][0], not kv[0][1]))]
