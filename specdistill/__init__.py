"""specdistill: train, distill, export and score drafters for speculative decoding."""

__version__ = "0.1.0"
