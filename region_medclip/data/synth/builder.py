"""TFDS builder of ``synth_cxr``: renders the synthetic films into array_record files.

Builder configs fix the image size, the number of films and the seed (``128`` is the default,
26,000 films ≈ 20,800 train). The films render on every core (``parallel.render_records``),
also from a process that has loaded JAX; every film is a pure function of
``(seed, index, size)``, and the examples are written in canonical protobuf form, so two builds
give the same bytes whatever the number of workers.

Several processes may start on an empty ``data_dir`` at once (``launch/local_multiprocess.sh``
runs one per simulated host): :func:`ensure_built` lets one of them build while the others
wait on a file lock, then read what it built.
"""

import contextlib
import dataclasses
import fcntl
import logging
import os
from typing import ClassVar

import tensorflow_datasets as tfds

from region_medclip.data import synth
from region_medclip.data.builders import common
from region_medclip.data.synth import parallel
from region_medclip.data.synth.records import split_of
from region_medclip.data.synth.spec import LABELS

_log = logging.getLogger("region_medclip.data.synth")

DEFAULT_NUM = 26_000
SPLITS = ("train", "validation", "test")


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
            features=common.record_features(len(LABELS), raw_image=True),
            metadata=tfds.core.MetadataDict(labels=list(LABELS)),
        )

    def _example_writer(self) -> tfds.core.ExampleWriter:
        return common.CanonicalExampleWriter(file_format=self.info.file_format)

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download: the data is generated
        cfg = self.builder_config
        by_split = {split: [] for split in SPLITS}
        for i in range(cfg.num):
            by_split[split_of(i, cfg.seed)].append(i)
        for split, indices in by_split.items():
            if not indices:
                raise ValueError(
                    f"synth_cxr num={cfg.num}: the {split!r} split gets no films (splits are by "
                    "patient, ~80/10/10); use a larger num (config.data.synth.num or --num)"
                )
        return {split: self._generate_examples(indices) for split, indices in by_split.items()}

    def _generate_examples(self, indices: list[int]):
        cfg = self.builder_config
        for record in parallel.render_records(indices, size=cfg.size, seed=cfg.seed):
            yield record["id"], common.to_example(record)


def builder(
    data_dir: str, size: int = 128, num: int = DEFAULT_NUM, seed: int = 0
) -> tfds.core.DatasetBuilder:
    """The ``synth_cxr`` builder for one (size, num, seed) under ``data_dir``."""
    name = config_name(size, num, seed)
    # TFDS wants the predefined configs by name and only custom ones as objects.
    predefined = {c.name for c in SynthCxr.BUILDER_CONFIGS}
    config = name if name in predefined else make_config(size, num, seed)
    return SynthCxr(data_dir=data_dir, config=config, file_format="array_record")


def lock_path(data_dir: str, size: int = 128, num: int = DEFAULT_NUM, seed: int = 0) -> str:
    """``<data_dir>/synth_cxr/.<config>.lock``: the lock the builds of one config take."""
    folder = os.path.join(os.path.expanduser(os.fspath(data_dir)), SynthCxr.name)
    return os.path.join(folder, f".{config_name(size, num, seed)}.lock")


@contextlib.contextmanager
def _exclusive(path: str):
    """Holds an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as file:  # closing the file releases the lock, also on a crash
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            _log.info("synth_cxr: waiting for the build that holds %s", path)
            fcntl.flock(file, fcntl.LOCK_EX)
        yield


def ensure_built(data_dir: str, size: int = 128, num: int = DEFAULT_NUM, seed: int = 0):
    """Builds ``synth_cxr`` into ``data_dir`` if it is not there yet; returns the builder.

    Safe to call from several processes at once: one builds, the others wait and then read.
    """
    b = builder(data_dir, size, num, seed)
    if b.is_prepared():
        return b
    with _exclusive(lock_path(data_dir, size, num, seed)):
        # Anew: a builder reads the dataset's info when it is made, and the process that held
        # the lock before may have built the dataset since.
        b = builder(data_dir, size, num, seed)
        if not b.is_prepared():
            _log.info("synth_cxr: building %s into %s", b.builder_config.name, data_dir)
            b.download_and_prepare()
    return b
