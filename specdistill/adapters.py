"""A trained target's peft adapters beside a drafter: how checkpoints, exports and loaders carry them.

Checkpoints keep them in drafter.safetensors under ADAPTER_PREFIX (one weight file, one checksum);
native exports write them to target_adapter.safetensors + adapter_config.json (peft's own layout).
"""

from __future__ import annotations

ADAPTER_PREFIX = "target_adapter."


class WithAdapters:
    """A drafter and its target's peft adapters as one state dict (adapter keys under ADAPTER_PREFIX),
    so checkpoints, resume and warm starts carry a trained target exactly as they carry a drafter."""

    def __init__(self, drafter, target):
        self.drafter, self.target = drafter, target

    def state_dict(self) -> dict:
        sd = dict(self.drafter.state_dict())
        sd.update({ADAPTER_PREFIX + k: v for k, v in self.target.adapter_state_dict().items()})
        return sd

    def load_state_dict(self, sd: dict, strict: bool = True):
        self.target.load_adapter_state_dict({k[len(ADAPTER_PREFIX):]: v for k, v in sd.items()
                                            if k.startswith(ADAPTER_PREFIX)})
        return self.drafter.load_state_dict({k: v for k, v in sd.items() if not k.startswith(ADAPTER_PREFIX)},
                                            strict=strict)


def restore(drafter, target, adapter_sd: dict, where: str) -> None:
    """Put the saved adapters on `target` (attaching them first from the drafter's lora_config())."""
    if not adapter_sd:
        return
    if not drafter.spec.needs(drafter.cfg, target.config).trains_target:
        raise ValueError(f"{where}: holds target adapters but drafter {drafter.spec.name!r} does not train the target")
    if not target.has_adapters:
        target.attach_lora(drafter.lora_config())
    target.load_adapter_state_dict(adapter_sd, where)


def split(sd: dict) -> tuple[dict, dict]:
    """(drafter tensors, adapter tensors without the prefix) of a checkpoint's weight file."""
    return ({k: v for k, v in sd.items() if not k.startswith(ADAPTER_PREFIX)},
            {k[len(ADAPTER_PREFIX):]: v for k, v in sd.items() if k.startswith(ADAPTER_PREFIX)})
