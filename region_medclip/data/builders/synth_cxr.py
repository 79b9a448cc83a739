"""TFDS builder of ``synth_cxr``: renders the synthetic films into array_record files.

Builder configs fix the image size, the number of films and the seed (``128`` is the default,
26,000 films ≈ 20,800 train). Rendering runs in a process pool: every film is a pure function of
``(seed, index, size)``, so the result does not depend on the number of workers.
"""

import dataclasses
import multiprocessing
import os
import sys
from functools import partial
from typing import ClassVar

import tensorflow_datasets as tfds

from region_medclip.data import synth
from region_medclip.data.builders import common

DEFAULT_NUM = 26_000


@dataclasses.dataclass
class SynthConfig(tfds.core.BuilderConfig):
    """Image size (px), number of films (all splits together) and generator seed."""

    size: int = 128
    num: int = DEFAULT_NUM
    seed: int = 0


def config_name(size: int, num: int = DEFAULT_NUM, seed: int = 0) -> str:
    """Canonical config name, e.g. ``"128"`` or ``"64_n500_seed3"``."""
    name = str(size)
    if num != DEFAULT_NUM:
        name += f"_n{num}"
    if seed:
        name += f"_seed{seed}"
    return name


def make_config(size: int, num: int = DEFAULT_NUM, seed: int = 0) -> SynthConfig:
    """A :class:`SynthConfig` with its canonical name."""
    return SynthConfig(
        name=config_name(size, num, seed),
        description=f"{num} films at {size}px, seed {seed}",
        size=size,
        num=num,
        seed=seed,
    )


def _render_example(index: int, size: int, seed: int):
    record = synth.render_record(index, size=size, seed=seed)
    return record["id"], common.to_example(record)


class SynthCxr(tfds.core.GeneratorBasedBuilder):
    """Synthetic chest radiographs with findings, boxes, captions and reports."""

    name = "synth_cxr"
    VERSION = tfds.core.Version("1.2.0")
    # A new version makes TFDS build anew instead of reading films cached under the old one.
    RELEASE_NOTES: ClassVar[dict[str, str]] = {
        "1.0.0": "First release.",
        "1.1.0": "Larger nodules and masses, thicker atelectasis, denser consolidation, deeper"
        " pneumothorax.",
        "1.2.0": "Boxes of clear lung zones (captions such as 'right upper zone is clear', box"
        " label 'no finding') fill every film up to three boxes; films and reports are those of"
        " 1.1.0.",
    }
    BUILDER_CONFIGS = [make_config(128), make_config(224)]

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=synth.__doc__,
            features=common.record_features(len(synth.LABELS), raw_image=True),
            metadata=tfds.core.MetadataDict(labels=list(synth.LABELS)),
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is generated
        cfg = self.builder_config
        for split in ("train", "validation", "test"):
            if not any(synth.split_of(i, cfg.seed) == split for i in range(cfg.num)):
                raise ValueError(
                    f"synth_cxr num={cfg.num}: the {split!r} split gets no films (splits are by "
                    "patient, ~80/10/10); use a larger num (config.data.synth.num or --num)"
                )
        return {split: self._generate_examples(split) for split in ("train", "validation", "test")}

    def _generate_examples(self, split: str):
        cfg = self.builder_config
        indices = [i for i in range(cfg.num) if synth.split_of(i, cfg.seed) == split]
        render = partial(_render_example, size=cfg.size, seed=cfg.seed)
        workers = min(os.cpu_count() or 1, 8)
        # Forked workers only while JAX is not loaded: forking a process that runs JAX's
        # threads can deadlock, and spawn would re-import the caller's __main__.
        if workers == 1 or len(indices) < 256 or "jax" in sys.modules:
            yield from map(render, indices)
            return
        with multiprocessing.get_context("fork").Pool(workers) as pool:
            yield from pool.imap(render, indices, chunksize=64)


def builder(
    data_dir: str, size: int = 128, num: int = DEFAULT_NUM, seed: int = 0
) -> tfds.core.DatasetBuilder:
    """The ``synth_cxr`` builder for one (size, num, seed) under ``data_dir``."""
    name = config_name(size, num, seed)
    # TFDS wants the predefined configs by name and only custom ones as objects.
    predefined = {c.name for c in SynthCxr.BUILDER_CONFIGS}
    config = name if name in predefined else make_config(size, num, seed)
    return SynthCxr(data_dir=data_dir, config=config, file_format="array_record")


def ensure_built(data_dir: str, size: int = 128, num: int = DEFAULT_NUM, seed: int = 0):
    """Builds ``synth_cxr`` into ``data_dir`` if it is not there yet; returns the builder."""
    b = builder(data_dir, size, num, seed)
    if not b.is_prepared():
        b.download_and_prepare()
    return b
