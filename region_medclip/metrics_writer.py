"""Training metrics: ``workdir/metrics.jsonl``, TensorBoard events in ``workdir/tb/`` and a
progress line with steps/s, examples/s and ETA."""

import json
import math
import time
from typing import Any

from etils import epath


class MetricsWriter:
    """Appends one JSON line per logged step and the same scalars to TensorBoard.

    Only process 0 writes (``enabled``); other processes hold a no-op writer.
    """

    def __init__(self, workdir: str, *, enabled: bool = True):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        path = epath.Path(workdir)
        self._file = (path / "metrics.jsonl").open("a")
        # tensorboardX writes the event format without TensorFlow.
        from tensorboardX import SummaryWriter

        self._tb = SummaryWriter(str(path / "tb"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        """Writes host scalars for ``step``; non-finite values become JSON ``null``."""
        if not self.enabled:
            return
        clean = {k: (float(v) if math.isfinite(float(v)) else None) for k, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **clean}) + "\n")
        self._file.flush()
        for key, value in clean.items():
            if value is not None:
                self._tb.add_scalar(key, value, step)

    @property
    def tensorboard(self):
        """The TensorBoard writer (None on processes that do not write)."""
        return self._tb

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
    """All rows of ``workdir/metrics.jsonl`` (a resumed run appends; later rows win per step)."""
    rows: dict[int, dict] = {}
    path = epath.Path(workdir) / "metrics.jsonl"
    for line in path.read_text().splitlines():
        if line.strip():
            row = json.loads(line)
            rows[row["step"]] = row
    return [rows[s] for s in sorted(rows)]


class Progress:
    """Throughput since the last report and the ETA of the run."""

    def __init__(self, total_steps: int, start_step: int, batch_size: int):
        self.total_steps = total_steps
        self.batch_size = batch_size
        self._step, self._time = start_step, time.perf_counter()

    def rates(self, step: int) -> dict[str, float]:
        now = time.perf_counter()
        steps_per_s = (step - self._step) / max(now - self._time, 1e-9)
        self._step, self._time = step, now
        return {
            "perf/steps_per_s": steps_per_s,
            "perf/examples_per_s": steps_per_s * self.batch_size,
            "perf/eta_s": (self.total_steps - step) / max(steps_per_s, 1e-9),
        }

    def line(self, step: int, metrics: dict[str, float]) -> str:
        eta = metrics.get("perf/eta_s", 0.0)
        return (
            f"step {step}/{self.total_steps} loss {metrics.get('loss', float('nan')):.4f} "
            f"| {metrics.get('perf/steps_per_s', 0):.2f} steps/s "
            f"{metrics.get('perf/examples_per_s', 0):.1f} examples/s "
            f"| ETA {int(eta) // 60}m{int(eta) % 60:02d}s"
            f" | skipped {int(metrics.get('skipped_steps', 0))}"
        )
