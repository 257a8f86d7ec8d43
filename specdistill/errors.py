"""Errors shared across the package, on the ground floor of the import graph (imports nothing of ours)."""

from __future__ import annotations


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


class ProtocolError(TypeError):
    """A drafter family does not implement the Drafter protocol (drafters/base.py); names the method."""
