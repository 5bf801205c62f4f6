"""passreid: part-aware self-supervised pre-training (PASS) for person re-identification."""

__version__ = "0.1.0"
