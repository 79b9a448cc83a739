"""``python -m region_medclip.bench data``: the train pipeline's throughput.

Examples/s of the whole train pipeline of ``configs/tiny_roi.py`` (decode, resize, augment,
tokenize, batch) on synth_cxr films at 128 and 224 px, in-process and with 2 worker processes.
The films are rendered in memory beforehand, so that neither rendering nor the disk is in the
figure.
"""

import time

from region_medclip.bench import common
from region_medclip.data import pipeline, synth

BATCH_SIZE = 32
SIZES = (128, 224)
WORKERS = (0, 2)


def examples_per_s(data_config, records, *, batches: int) -> float:
    """Examples/s over ``batches`` train batches of ``BATCH_SIZE`` from ``records``, after three
    batches of warm-up (worker start-up and tokenizer training)."""
    ds = pipeline.make_dataset(
        data_config, split="train", train=True, seed=0, batch_size=BATCH_SIZE, records=records
    )
    it = pipeline.BatchIterator(ds)
    for _ in range(3):
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batches * BATCH_SIZE / (time.perf_counter() - start)


def run(args) -> tuple[dict, str]:
    """One row per (image size, workers): (results for the JSON, the markdown report)."""
    base = common.load_config(args.configs_dir, "tiny_roi.py")
    rows = []
    for size in SIZES:
        records = [synth.render_record(i, size=size) for i in range(128)]
        for workers in WORKERS:
            config = base.copy_and_resolve_references()
            config.data.image_size, config.data.workers = size, workers
            rate = examples_per_s(config.data, records, batches=args.data_batches)
            rows.append(dict(size=size, workers=workers, examples_per_s=round(rate, 1)))
    report = common.markdown(rows, ["size", "workers", "examples_per_s"])
    return dict(machine=common.host(), rows=rows), report
