"""A run directory (DESIGN §8): ``config.yaml``, ``last.pth``, ``best.pth``, ``metrics.jsonl``, ``tb/``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from passreid.fileio import write_text_atomic


class RunDir:
    """A run directory: ``config.yaml``, ``last.pth``, ``best.pth``, ``metrics.jsonl``, ``tb/``.

    Only the main process writes; on other ranks every method is a no-op.
    """

    def __init__(self, path: str | os.PathLike, is_main: bool = True) -> None:
        self.path = Path(path)
        self.is_main = is_main
        self._tb: Any = None
        if is_main:
            self.path.mkdir(parents=True, exist_ok=True)

    @property
    def last(self) -> Path:
        return self.path / "last.pth"

    @property
    def best(self) -> Path:
        return self.path / "best.pth"

    @property
    def config_path(self) -> Path:
        return self.path / "config.yaml"

    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def write_config(self, yaml_text: str) -> None:
        if self.is_main:
            write_text_atomic(self.config_path, yaml_text)

    @property
    def tb(self) -> Any:
        """A TensorBoard ``SummaryWriter`` on ``tb/`` (created on first use, main rank only)."""
        if self._tb is None and self.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.path / "tb"))
        return self._tb

    def add_scalars(self, scalars: dict[str, float], step: int, prefix: str = "") -> None:
        if not self.is_main:
            return
        for key, value in scalars.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.tb.add_scalar(f"{prefix}{key}", value, step)

    def log_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON object (one epoch) to ``metrics.jsonl`` and its scalars to TensorBoard."""
        if not self.is_main:
            return
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(record, default=float) + "\n")
        step = int(record.get("epoch", 0))
        self.add_scalars({k: v for k, v in record.items() if k != "epoch"}, step, prefix="epoch/")
        self.tb.flush()

    def read_metrics(self) -> list[dict[str, Any]]:
        if not self.metrics_path.exists():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def truncate_metrics(self, last_epoch: int) -> None:
        """On resume, forget epochs logged after the checkpoint (a crash may have logged them)."""
        if self.is_main and self.metrics_path.exists():
            kept = [r for r in self.read_metrics() if int(r.get("epoch", 0)) <= last_epoch]
            write_text_atomic(self.metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None
