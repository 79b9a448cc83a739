"""Rendering many ``synth_cxr`` films on every core, in order, from any process.

The workers are fresh interpreters started with ``subprocess`` that import only this package
(numpy and the renderer): forking a process that has loaded JAX can deadlock on the locks of
JAX's threads, and multiprocessing's spawn and forkserver children re-import the caller's
``__main__`` (``region_medclip.main`` imports JAX, Flax and TFDS) before they run anything.

Worker ``w`` of ``W`` renders chunks ``w, w + W, ...`` in turn and writes each as one pickle to
its stdout; the parent reads the chunks round-robin, so the records come out in the order of
``indices`` whatever the number of workers. A worker can run one chunk ahead of the reader
(the pipe holds the rest back), which keeps memory flat.
"""

import contextlib
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator, Sequence

from region_medclip.data import schema
from region_medclip.data.synth.records import render_record

CHUNK = 64  # films per message
MIN_PARALLEL = 256  # fewer films render faster in-process than workers start
MAX_WORKERS = 8


def default_workers() -> int:
    """The cores this process may run on (at most MAX_WORKERS)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, MAX_WORKERS))


def _start() -> subprocess.Popen:
    # The workers import the same tree as this process, whichever sys.path found it.
    root = os.path.dirname(os.path.dirname(os.path.abspath(sys.modules["region_medclip"].__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    command = "from region_medclip.data.synth.parallel import serve; serve()"
    return subprocess.Popen(
        [sys.executable, "-c", command], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
    )


def _receive(proc: subprocess.Popen) -> list[schema.Record]:
    try:
        return pickle.load(proc.stdout)
    except EOFError:
        raise RuntimeError(
            f"synth_cxr render worker {proc.pid} exited with status {proc.wait()} (its error "
            "is above, on stderr)"
        ) from None


def render_records(
    indices: Sequence[int], *, size: int, seed: int, workers: int | None = None
) -> Iterator[schema.Record]:
    """The records of films ``indices`` (``render_record(i, size=size, seed=seed)``), in order.

    Args:
      indices: film numbers.
      size, seed: as in ``render_record``.
      workers: worker processes (default: one per core, at most MAX_WORKERS); one, or fewer than
        MIN_PARALLEL films, renders in this process.

    Raises:
      RuntimeError: a worker died.
    """
    indices = [int(i) for i in indices]
    workers = default_workers() if workers is None else workers
    if workers <= 1 or len(indices) < MIN_PARALLEL:
        yield from (render_record(i, size=size, seed=seed) for i in indices)
        return
    chunks = [indices[k : k + CHUNK] for k in range(0, len(indices), CHUNK)]
    workers = min(workers, len(chunks))
    procs = []
    try:
        # All started before any is written to: the workers' imports overlap.
        for _ in range(workers):
            procs.append(_start())
        for w, proc in enumerate(procs):
            pickle.dump((size, seed, chunks[w::workers]), proc.stdin)
            proc.stdin.close()
        for c in range(len(chunks)):
            yield from _receive(procs[c % workers])
        for proc in procs:
            if proc.wait():
                raise RuntimeError(f"synth_cxr render worker {proc.pid}: status {proc.returncode}")
    finally:
        for proc in procs:  # on an error or an abandoned generator: stop the rest
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                with contextlib.suppress(OSError):  # a dead worker's pipe may not flush
                    pipe.close()


def serve() -> None:
    """Worker side: reads ``(size, seed, chunks)`` from stdin, writes each chunk's records."""
    size, seed, chunks = pickle.load(sys.stdin.buffer)
    out = os.fdopen(os.dup(sys.stdout.fileno()), "wb")
    # Whatever else writes to stdout must not corrupt the stream of pickles.
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    with out:
        for chunk in chunks:
            pickle.dump([render_record(i, size=size, seed=seed) for i in chunk], out, protocol=5)
            out.flush()
