"""Training metrics: ``workdir/metrics.jsonl``, TensorBoard events in ``workdir/tb/`` and a
progress line with steps/s, examples/s and ETA."""

import json
import logging
import math
import time
from typing import Any

from etils import epath

_log = logging.getLogger("region_medclip.train")


class MetricsWriter:
    """Appends one JSON line per logged step and the same scalars to TensorBoard.

    Only process 0 writes (``enabled``); other processes hold a no-op writer. A run that
    resumes from step ``start_step`` first drops what the interrupted run logged after it (those
    steps run again), so every step appears once in ``metrics.jsonl`` and in TensorBoard.
    """

    def __init__(self, workdir: str, *, enabled: bool = True, start_step: int | None = None):
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        path = epath.Path(workdir)
        if start_step is not None:
            truncate(path / "metrics.jsonl", start_step)
        self._file = (path / "metrics.jsonl").open("a")
        # tensorboardX writes the event format without TensorFlow; purge_step makes TensorBoard
        # discard the events of the steps from there on that an earlier writer left.
        from tensorboardX import SummaryWriter

        purge = None if start_step is None else start_step + 1
        self._tb = SummaryWriter(str(path / "tb"), purge_step=purge)

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


def truncate(path: epath.Path, last_step: int) -> int:
    """Keeps the rows of the metrics file ``path`` up to ``last_step`` (and drops a last line
    that a killed process left half-written); returns how many rows were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            step = json.loads(line)["step"]
        except (json.JSONDecodeError, KeyError, TypeError):
            dropped += 1
            continue
        if step <= last_step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.parent / (path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)  # atomic: a kill now leaves the old file or the new one
        _log.info("%s: dropped %d row(s) logged after step %d", path, dropped, last_step)
    return dropped


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
