"""What a checkpoint's weight file holds when a family trains the target too."""

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
