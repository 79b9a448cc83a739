"""What every builder shares: the TFDS features of the record schema, the split generators of a
record iterator, and an example writer whose files are the same bytes on every run.

Features use only Tensor / Text / bytes so that ``download_and_prepare`` runs without TensorFlow
(``file_format="array_record"``) and ``tfds.data_source`` reads the files into grain.
"""

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds
from tensorflow_datasets.proto import tf_example_pb2

from region_medclip.data import schema


def record_features(num_labels: int, *, raw_image: bool = False) -> tfds.features.FeaturesDict:
    """TFDS features of a schema record.

    Args:
      num_labels: C, the length of ``labels``.
      raw_image: store ``image`` as a uint8 ``[H, W]`` tensor (synthetic data, decoded for free)
        instead of the encoded PNG/JPEG bytes the dataset ships (no re-encoding, smaller files).
    """
    if raw_image:
        image = tfds.features.Tensor(shape=(None, None), dtype=np.uint8, encoding="bytes")
    else:
        image = tfds.features.Tensor(shape=(), dtype=np.object_)
    return tfds.features.FeaturesDict(
        {
            "image": image,
            "report": tfds.features.Text(),
            "labels": tfds.features.Tensor(shape=(num_labels,), dtype=np.float32),
            "boxes": tfds.features.Tensor(shape=(None, 4), dtype=np.float32),
            "box_captions": tfds.features.Sequence(tfds.features.Text()),
            "box_labels": tfds.features.Tensor(shape=(None,), dtype=np.int32),
            "id": tfds.features.Text(),
            "patient_id": tfds.features.Text(),
            "split": tfds.features.Text(),
        }
    )


def to_example(record: schema.Record) -> dict:
    """A schema record in the form the features above encode (lists → arrays)."""
    example = dict(record)
    example["boxes"] = np.asarray(record["boxes"], np.float32).reshape(-1, 4)
    example["box_labels"] = np.asarray(record["box_labels"], np.int32).reshape(-1)
    example["box_captions"] = list(record["box_captions"])
    return example


def split_generators(
    records_fn: Callable[[], Iterator[schema.Record]], splits: Sequence[str] = schema.SPLITS
) -> dict[str, Iterator[tuple[str, dict]]]:
    """``{split: generator of (key, example)}`` from one pass-able record iterator factory.

    Each split re-reads the source and keeps its own records, so memory stays flat.
    """

    def generate(split):
        for record in records_fn():
            if record["split"] == split:
                yield record["id"], to_example(record)

    return {split: generate(split) for split in splits}


class CanonicalExampleWriter(tfds.core.ExampleWriter):
    """Writes every example in protobuf's deterministic form (map entries sorted by key).

    A ``tf.train.Example`` holds its fields in a protobuf map, and protobuf's C runtime (upb)
    serialises a map in the order of a hash table seeded afresh in every process: TFDS's plain
    ``SerializeToString()`` gives each build its own field order, so two builds of the same
    records differed byte for byte. Re-serialising with ``deterministic=True`` makes the files a
    function of the records alone. Used by a builder's ``_example_writer`` (the TFDS hook).
    """

    def write(self, path, examples):
        """Writes ``examples``, ``(key, serialized tf.train.Example)`` pairs, to ``path``."""
        return super().write(path, ((key, canonical_example(ex)) for key, ex in examples))


def canonical_example(serialized: bytes) -> bytes:
    """``serialized`` (a ``tf.train.Example``) with its fields in key order."""
    return tf_example_pb2.Example.FromString(serialized).SerializeToString(deterministic=True)
