"""TFDS builders for the real datasets, each over its raw-format reader (``data/formats.py``).

None can be downloaded by TFDS (credentialed or click-through licences): put the files where
``MANUAL_DOWNLOAD_INSTRUCTIONS`` says and pass that folder as ``manual_dir``::

  builder = BUILDERS["mimic_cxr"](data_dir="~/tfds", file_format="array_record")
  builder.download_and_prepare(
      download_config=tfds.download.DownloadConfig(manual_dir="/data/mimic-cxr-jpg/2.1.0"))
  source = builder.as_data_source()["train"]          # grain-ready, no TensorFlow

``image`` is stored as the encoded bytes the dataset ships; DICOM sources (RSNA, VinDr) are
decoded to 8 bit and stored as lossless PNG. Skipped and repaired records are counted in the
dataset's metadata (``builder.info.metadata["skipped"]`` / ``["repaired"]``) and logged;
``strict=True`` fails the build at the first bad record instead. Splits with no records are
left out (TFDS cannot write an empty split). Reader options go in ``reader_options``.

TFDS ships an unrelated legacy ``chexpert`` builder, so ours is not registered by name (two
registrations of one name fail at import): use ``BUILDERS["chexpert"]`` or
``tfds.builder_from_directory``; the others also load with ``tfds.data_source(name, data_dir=)``
once this module is imported.
"""

import dataclasses
import io
import itertools
import logging
from collections.abc import Callable, Iterator
from typing import Any, ClassVar

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from region_medclip.data import formats, schema
from region_medclip.data.builders import common

_log = logging.getLogger("region_medclip.data")
_PHYSIONET = "Credentialed PhysioNet access is needed ({url}). "


def encode_png(image: np.ndarray) -> bytes:
    """Lossless PNG bytes of a uint8 ``[H, W]`` or ``[H, W, 3]`` image."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


class _ManualBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A builder whose examples are the records of ``formats.READERS[SOURCE](manual_dir)``."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
    SOURCE: ClassVar[str] = ""
    HOMEPAGE: ClassVar[str] = ""

    def __init__(
        self,
        *,
        strict: bool = False,
        reader_options: dict | None = None,
        progress: Callable[[dict], None] | None = None,
        **kwargs,
    ):
        """Args: ``strict`` fails on the first bad record; ``reader_options`` go to the reader;
        ``progress`` is called with each record written (``python -m region_medclip.prepare``'s
        bar); the rest (``data_dir``, ``file_format``, ``config``, ...) to TFDS. After a build,
        ``counter`` holds what was skipped and repaired, with example ids."""
        self._strict = strict
        self._reader_options = dict(reader_options or {})
        self._progress = progress
        self.counter: formats.ReadCounter | None = None
        super().__init__(**kwargs)

    def _example_writer(self) -> tfds.core.ExampleWriter:
        # Fields in a canonical order: the same records give the same bytes in every process.
        return common.CanonicalExampleWriter(file_format=self.info.file_format)

    def _num_labels(self) -> int:
        return len(formats.LABEL_NAMES[self.SOURCE])

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=(self.__doc__ or "").strip(),
            features=common.record_features(self._num_labels()),
            homepage=self.HOMEPAGE,
            metadata=tfds.core.MetadataDict(),
        )

    def _records(self, root: Any, split: str | None, counter: formats.ReadCounter) -> Iterator:
        """The reader's records of one split (eager file and column checks raise here)."""
        options = dict(self._reader_options)
        return formats.READERS[self.SOURCE](root, split=split, counter=counter, **options)

    def _root(self, dl_manager: tfds.download.DownloadManager) -> Any:
        return dl_manager.manual_dir

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Iterator]:
        root = self._root(dl_manager)
        counter = self.counter = formats.ReadCounter(self.name, strict=self._strict)
        generators = {}
        for split in schema.SPLITS:
            # One reader per split (rows of other splits are dropped before their images are
            # read); peeking at the first record leaves out empty splits, which TFDS rejects.
            records = self._records(root, split, counter)
            first = next(records, None)
            if first is not None:
                generators[split] = self._examples(itertools.chain([first], records), counter)
        if not generators:
            raise schema.DataError(f"{self.name}: no readable records in {root}")
        return generators

    def _examples(self, records, counter) -> Iterator[tuple[str, dict]]:
        for record in records:
            example = common.to_example(record)
            if isinstance(example["image"], np.ndarray):
                example["image"] = encode_png(example["image"])
            if self._progress is not None:
                self._progress(record)
            yield record["id"], example
        # Splits are generated one after another and share the counter: the last one to finish
        # leaves the totals in the metadata that is written after all splits.
        self.info.metadata["skipped"] = dict(counter.counts)
        self.info.metadata["repaired"] = dict(counter.repairs)
        self.info.metadata["examples"] = dict(counter.examples)
        if counter.total:
            _log.warning(f"{self.name}: skipped {counter.total} records: {dict(counter.counts)}")

    def _generate_examples(self, **kwargs):
        # Unused: _split_generators returns the generators themselves.
        raise NotImplementedError


class MimicCxr(_ManualBuilder):
    """MIMIC-CXR-JPG 2.x with MIMIC-CXR reports (findings + impression) and CheXpert labels."""

    name = "mimic_cxr"
    SOURCE = "mimic_cxr"
    HOMEPAGE = "https://physionet.org/content/mimic-cxr-jpg/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _PHYSIONET.format(url=HOMEPAGE) + (
        "Download MIMIC-CXR-JPG (files/ and mimic-cxr-2.0.0-{split,chexpert,metadata}.csv.gz) and "
        "unzip mimic-cxr-reports.zip from https://physionet.org/content/mimic-cxr/ into the same "
        "folder (files/p10/p10000032/s50414267.txt beside the image folders). manual_dir = that "
        "folder (or pass reader_options=dict(reports_dir=...))."
    )


class MsCxr(_ManualBuilder):
    """MS-CXR phrase grounding boxes on MIMIC-CXR-JPG images, one example per image."""

    name = "ms_cxr"
    SOURCE = "ms_cxr"
    HOMEPAGE = "https://physionet.org/content/ms-cxr/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _PHYSIONET.format(url=HOMEPAGE) + (
        "Put MS_CXR_Local_Alignment_v1.1.0.csv in the MIMIC-CXR-JPG folder (the one holding "
        "files/), which is manual_dir; or pass reader_options=dict(mimic_root=...)."
    )


@dataclasses.dataclass
class ChexpertConfig(tfds.core.BuilderConfig):
    """``subset``: "full" (every image, official splits) or "5x200" (the evaluation subset)."""

    subset: str = "full"
    per_class: int = 200
    seed: int = 0


class Chexpert(_ManualBuilder, skip_registration=True):
    """CheXpert v1.0 with reports synthesised from its 14 labels, and the 5x200 subset."""

    name = "chexpert"
    SOURCE = "chexpert"
    HOMEPAGE = "https://stanfordmlgroup.github.io/competitions/chexpert/"
    BUILDER_CONFIGS: ClassVar[list] = [
        ChexpertConfig(name="full", description="All images, train/valid(/test) CSV splits."),
        ChexpertConfig(
            name="5x200",
            subset="5x200",
            description="200 frontal train images per competition class, one positive each "
            "(GLoRIA / MedCLIP), as the test split.",
        ),
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Accept the licence at the homepage, download CheXpert-v1.0-small (or CheXpert-v1.0) and "
        "unzip it; manual_dir = the CheXpert-v1.0-small folder holding train.csv and valid.csv."
    )

    def _split_generators(self, dl_manager):
        if self.builder_config.subset != "5x200":
            return super()._split_generators(dl_manager)
        counter = self.counter = formats.ReadCounter(self.name, strict=self._strict)
        records = formats.READERS["chexpert"](
            dl_manager.manual_dir, split="train", counter=counter, frontal_only=True
        )
        config = self.builder_config
        selected = formats.select_5x200(records, per_class=config.per_class, seed=config.seed)
        if not selected:
            raise schema.DataError(f"{self.name}: no 5x200 candidates in {dl_manager.manual_dir}")
        return {"test": self._examples(iter(selected), counter)}


class RsnaPneumonia(_ManualBuilder):
    """RSNA Pneumonia Detection Challenge: DICOMs, pneumonia boxes, patient-level splits."""

    name = "rsna_pneumonia"
    SOURCE = "rsna_pneumonia"
    HOMEPAGE = "https://www.kaggle.com/c/rsna-pneumonia-detection-challenge"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download the competition data (kaggle competitions download -c "
        "rsna-pneumonia-detection-challenge) and unzip it; manual_dir = the folder holding "
        "stage_2_train_labels.csv and stage_2_train_images/."
    )


class VindrCxr(_ManualBuilder):
    """VinDr-CXR: 18k radiographs with radiologists' boxes for 22 findings and 6 diagnoses."""

    name = "vindr_cxr"
    SOURCE = "vindr_cxr"
    HOMEPAGE = "https://physionet.org/content/vindr-cxr/"
    MANUAL_DOWNLOAD_INSTRUCTIONS = _PHYSIONET.format(url=HOMEPAGE) + (
        "Download VinDr-CXR 1.0.0; manual_dir = the folder holding annotations/, train/ and "
        "test/ (DICOM, or PNG/JPEG exports at the DICOMs' resolution with the same names)."
    )


class Chestxray14(_ManualBuilder):
    """NIH ChestX-ray14: 112k radiographs, 14 text-mined labels, ~1k boxes."""

    name = "chestxray14"
    SOURCE = "chestxray14"
    HOMEPAGE = "https://nihcc.app.box.com/v/ChestXray-NIHCC"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download Data_Entry_2017(_v2020).csv, BBox_List_2017.csv, train_val_list.txt, "
        "test_list.txt and images_001..012.tar.gz from the homepage; untar the images beside the "
        "CSVs (images_001/images/*.png, ...); manual_dir = that folder."
    )


class Roco(_ManualBuilder):
    """ROCO radiology subset: PubMed Central figures with their captions."""

    name = "roco"
    SOURCE = "roco"
    HOMEPAGE = "https://github.com/razorx89/roco-dataset"
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Fetch ROCO with the repository's scripts; manual_dir = its data/ folder holding "
        "{train,validation,test}/radiology/radiology{train,val,test}data.csv and images/."
    )


@dataclasses.dataclass
class CsvConfig(tfds.core.BuilderConfig):
    """A user's dataset: ``name`` is the name configs use (``data.train=NAME``); ``path`` the
    CSV/JSONL file (or its folder; empty → ``manual_dir``); ``label_names`` the names behind
    its ``labels`` column, in order; ``num_labels`` C when the labels have no names (0: none
    or ``len(label_names)``)."""

    path: str = ""
    num_labels: int = 0
    label_names: tuple[str, ...] = ()


class Csv(_ManualBuilder):
    """The user's own image–caption data from a CSV or JSONL file (docs/design.md §5.2).

    Each prepared config is a dataset of its own, stored in ``data_dir/csv/<name>`` with its
    label names in the metadata, and registered under ``<name>`` for configs
    (``data/registry.py``): several coexist. ``python -m region_medclip.prepare
    --dataset=csv --name=NAME --manual_dir=FILE`` builds one.
    """

    name = "csv"
    SOURCE = "csv"
    BUILDER_CONFIGS: ClassVar[list] = [CsvConfig(name="default")]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Write a CSV or JSONL with columns image, caption[, boxes, box_captions, box_labels, "
        "labels, id, patient_id, split] (images relative to the file). Pass "
        "config=CsvConfig(name=..., path=FILE, label_names=(...)), or put the file alone (or as "
        "data.csv / data.jsonl) in manual_dir."
    )

    def _num_labels(self) -> int:
        config = self.builder_config
        return len(config.label_names) or config.num_labels

    def _info(self) -> tfds.core.DatasetInfo:
        info = super()._info()
        info.metadata["label_names"] = list(self.builder_config.label_names)
        return info

    def _records(self, root, split, counter):
        options = dict(num_labels=self._num_labels(), **self._reader_options)
        return formats.READERS["csv"](root, split=split, counter=counter, **options)

    def _root(self, dl_manager):
        # manual_dir is not needed (nor checked) when the config names the file.
        return self.builder_config.path or dl_manager.manual_dir


BUILDERS: dict[str, type[_ManualBuilder]] = {
    "mimic_cxr": MimicCxr,
    "ms_cxr": MsCxr,
    "chexpert": Chexpert,
    "rsna_pneumonia": RsnaPneumonia,
    "vindr_cxr": VindrCxr,
    "chestxray14": Chestxray14,
    "roco": Roco,
    "csv": Csv,
}
