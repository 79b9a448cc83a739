"""Benchmarks, not tests: ``python -m region_medclip.bench
losses|data|train|compare|openclip|profile|gpu|accum [--out=JSON]``.

- ``losses`` (:mod:`.losses`): forward + backward time and XLA's peak memory per device of the
  global losses on 8 simulated CPU devices, as the global batch and the number of devices grow.
- ``data`` (:mod:`.data`): the train pipeline's examples/s.
- ``train`` (:mod:`.train`): the train step's examples/s and MFU.
- ``compare`` (:mod:`.compare`): the same CLIP train step in open_clip and here, examples/s of
  each, their ratio and our MFU.
- ``openclip`` (:mod:`.openclip`): open_clip's CLIP trained here on the embedded films for a
  wall-clock budget, imported into our towers and scored by our zero-shot and retrieval
  evaluators.
- ``profile`` (:mod:`.profile`): where one config's train step spends its time, kernel by kernel,
  from a ``jax.profiler`` trace.
- ``gpu`` (:mod:`.gpu`): one accelerator's figures in one process: its bfloat16 peak, the
  ViT-B/16 step (region-aware and global-only, XLA and cuDNN attention) with MFU and memory,
  open_clip's step at the same batch, and the global losses at a 32k batch.
- ``accum`` (:mod:`.accum`): peak memory per device of gradient accumulation that keeps the
  whole batch's negatives, against the micro-batch's step and the whole batch's.

The benchmarks run the repository's ``configs/tiny_roi.py`` and ``configs/vitb16_roi.py``, read by
path from ``--configs_dir`` (:mod:`.common`). All but ``gpu`` run on 8 simulated CPU devices. This
package imports nothing at import time: ``__main__`` sets the XLA flags before JAX starts.
"""
