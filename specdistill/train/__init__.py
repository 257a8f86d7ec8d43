"""The one Trainer (only this package may call .backward or step an optimizer)."""

from specdistill.train.trainer import NonFiniteLossError, Trainer

__all__ = ["Trainer", "NonFiniteLossError"]
