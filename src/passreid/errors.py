"""Exceptions for mistakes a user can fix: the CLI prints them as one line."""

from __future__ import annotations


class PassReIDError(Exception):
    """Base class: an error whose message names the file, key or value at fault."""


class DatasetError(PassReIDError, ValueError):
    """A data set folder, list file or image is missing, malformed or unreadable."""


class BadImageError(DatasetError):
    """One image file is missing, empty, not an image or truncated (its path is in the message)."""


class CheckpointError(PassReIDError, ValueError):
    """A checkpoint cannot be read or does not fit the model."""


class ConfigError(PassReIDError, ValueError):
    """A config key is unknown, has the wrong type or an impossible value."""


class TrainingError(PassReIDError, RuntimeError):
    """Training cannot go on (non-finite loss, out of memory, ...)."""
