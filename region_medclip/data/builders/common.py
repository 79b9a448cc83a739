"""What every builder shares: the TFDS features of the record schema and a reader-backed base.

Features use only Tensor / Text / bytes so that ``download_and_prepare`` runs without TensorFlow
(``file_format="array_record"``) and ``tfds.data_source`` reads the files into grain.
"""

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import tensorflow_datasets as tfds

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
