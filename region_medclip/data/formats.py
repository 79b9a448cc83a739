"""Raw-format readers: each dataset's files as distributed → schema records
(docs/design.md §5.1).

``READERS[name](root, *, strict=False, counter=None, split=None, verify_images=True, **options)``
returns :class:`~region_medclip.data.formats_io.Records`, an iterator of records whose
``counter`` (a :class:`~region_medclip.data.formats_io.ReadCounter`) holds what was skipped by
reason (``counter.counts``) and what was repaired (``counter.repairs``)::

  records = READERS["mimic_cxr"]("/data/mimic-cxr-jpg/2.1.0", views=("PA", "AP"))
  for record in records: ...
  print(records.counter.counts)   # Counter({'missing image': 2, 'empty report': 31})

What is checked (docs/design.md §5.5):

* at the call, a source that cannot be read at all — a missing folder or CSV, a CSV without a
  required column — raises :class:`~region_medclip.data.schema.DataError` naming the file and
  the column;
* while iterating, a bad row — missing, zero-byte, corrupt or truncated image (the bytes are
  decoded once), empty report, unparseable label or split — is skipped, counted and warned about
  with its id; ``strict=True`` raises ``DataError`` at the first one instead. Nothing else
  escapes mid-iteration: an unexpected error in one row is counted as ``bad row``;
* boxes are clipped to the image and degenerate (or NaN) ones dropped with their captions;
  blank / NaN labels become 0.

``image`` is the encoded JPEG/PNG bytes as stored, or uint8 ``[H, W]`` for DICOM. Sources
without reports (CheXpert, RSNA, VinDr, ChestX-ray14) get one synthesised from their labels.
"""

from collections.abc import Callable

from region_medclip.data.formats_chestxray14 import CHESTXRAY14_LABELS, read_chestxray14
from region_medclip.data.formats_chexpert import (
    COMPETITION_LABELS,
    read_chexpert,
    select_5x200,
)
from region_medclip.data.formats_detection import (
    RSNA_LABELS,
    VINDR_LABELS,
    read_rsna_pneumonia,
    read_vindr_cxr,
)
from region_medclip.data.formats_generic import read_generic, read_roco
from region_medclip.data.formats_io import DICOM_SUFFIXES, ReadCounter, Records, dicom_to_uint8
from region_medclip.data.formats_mimic import (
    CHEXPERT_LABELS,
    MS_CXR_LABELS,
    read_mimic_cxr,
    read_ms_cxr,
    report_sections,
)

__all__ = [
    "CHESTXRAY14_LABELS",
    "CHEXPERT_LABELS",
    "COMPETITION_LABELS",
    "DICOM_SUFFIXES",
    "LABEL_NAMES",
    "MS_CXR_LABELS",
    "READERS",
    "RSNA_LABELS",
    "VINDR_LABELS",
    "ReadCounter",
    "Records",
    "dicom_to_uint8",
    "report_sections",
    "select_5x200",
]

READERS: dict[str, Callable[..., Records]] = {
    "mimic_cxr": read_mimic_cxr,
    "ms_cxr": read_ms_cxr,
    "chexpert": read_chexpert,
    "rsna_pneumonia": read_rsna_pneumonia,
    "vindr_cxr": read_vindr_cxr,
    "chestxray14": read_chestxray14,
    "roco": read_roco,
    "csv": read_generic,
}

# The names behind each source's ``labels [C]``; None: set by the user (``num_labels``).
LABEL_NAMES: dict[str, tuple[str, ...] | None] = {
    "mimic_cxr": CHEXPERT_LABELS,
    "ms_cxr": MS_CXR_LABELS,
    "chexpert": CHEXPERT_LABELS,
    "rsna_pneumonia": RSNA_LABELS,
    "vindr_cxr": VINDR_LABELS,
    "chestxray14": CHESTXRAY14_LABELS,
    "roco": (),
    "csv": None,
}
