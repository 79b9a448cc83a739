"""Tiny copies of each dataset in its exact distributed layout and columns, for the reader and
builder tests. Each ``write_<name>(tmp_path)`` returns a :class:`Fixture`."""

import csv
import dataclasses
import gzip
import io
import json
import pathlib

import numpy as np
import PIL.Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from region_medclip.data import formats


@dataclasses.dataclass
class Fixture:
    """What a test needs to know about a written fixture."""

    root: pathlib.Path  # what READERS[name] reads
    images: dict[str, pathlib.Path]  # record id → its image file
    options: dict = dataclasses.field(default_factory=dict)  # reader options


def image_bytes(height: int, width: int, *, fmt: str = "JPEG", seed: int = 0) -> bytes:
    """A noisy grayscale image (noise so that a truncated file cuts into the pixel data)."""
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def write_image(path: pathlib.Path, height: int = 40, width: int = 48, seed: int = 0) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = "PNG" if path.suffix.lower() == ".png" else "JPEG"
    path.write_bytes(image_bytes(height, width, fmt=fmt, seed=seed))


def write_dicom(
    path: pathlib.Path, pixels: np.ndarray, *, photometric: str = "MONOCHROME2", bits: int = 12
) -> None:
    """A minimal valid DICOM (secondary capture, explicit VR little endian) with ``pixels``."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.PatientID = path.stem
    dataset.Modality = "CR"
    dataset.set_pixel_data(pixels, photometric_interpretation=photometric, bits_stored=bits)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def write_jpeg_dicom(path: pathlib.Path, pixels: np.ndarray) -> None:
    """An 8-bit JPEG-baseline compressed DICOM, as the RSNA challenge ships its images."""
    buffer = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buffer, format="JPEG", quality=95)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEGBaseline8Bit
    dataset = Dataset()
    dataset.file_meta = meta
    dataset.SOPClassUID = SecondaryCaptureImageStorage
    dataset.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    dataset.Rows, dataset.Columns = pixels.shape
    dataset.SamplesPerPixel = 1
    dataset.PhotometricInterpretation = "MONOCHROME2"
    dataset.BitsAllocated = dataset.BitsStored = 8
    dataset.HighBit = 7
    dataset.PixelRepresentation = 0
    dataset.PixelData = encapsulate([buffer.getvalue()])
    dataset["PixelData"].VR = "OB"
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)


def ramp(height: int = 32, width: int = 40) -> np.ndarray:
    """A uint16 12-bit horizontal ramp: 0 at the left edge, 4095 at the right."""
    return np.tile(np.linspace(0, 4095, width).round().astype(np.uint16), (height, 1))


def write_csv(path: pathlib.Path, header: list[str], rows: list[list], *, gz: bool = False):
    path.parent.mkdir(parents=True, exist_ok=True)
    text = io.StringIO()
    writer = csv.writer(text)
    writer.writerow(header)
    writer.writerows(rows)
    data = text.getvalue().encode()
    path.write_bytes(gzip.compress(data) if gz else data)


MIMIC_REPORT = """                                 FINAL REPORT
 EXAMINATION:  CHEST (PA AND LAT)

 INDICATION:  ___ with cough.

 FINDINGS:

 The heart is mildly enlarged.  No pleural
 effusion.

 IMPRESSION:

 Mild cardiomegaly.
"""


def write_mimic_cxr(tmp_path: pathlib.Path, *, gz: bool = True) -> Fixture:
    """Four images in three studies of three patients, one per MIMIC split spelling."""
    root = tmp_path / "mimic-cxr-jpg" / "2.1.0"
    # (dicom_id, subject_id, study_id, split, view)
    rows = [
        ("d1", "10000001", "50000001", "train", "PA"),
        ("d2", "10000001", "50000001", "train", "LATERAL"),
        ("d3", "10000002", "50000002", "validate", "AP"),
        ("d4", "11000003", "50000003", "test", "PA"),
    ]
    images = {}
    for index, (dicom, subject, study, _, _) in enumerate(rows):
        folder = root / f"files/p{subject[:2]}/p{subject}/s{study}"
        images[dicom] = folder / f"{dicom}.jpg"
        write_image(images[dicom], seed=index)
        (folder.parent / f"s{study}.txt").write_text(MIMIC_REPORT)
    ext = ".csv.gz" if gz else ".csv"
    write_csv(
        root / f"mimic-cxr-2.0.0-split{ext}",
        ["dicom_id", "study_id", "subject_id", "split"],
        [[d, st, su, sp] for d, su, st, sp, _ in rows],
        gz=gz,
    )
    meta = ["dicom_id", "subject_id", "study_id", "PerformedProcedureStepDescription"]
    write_csv(
        root / f"mimic-cxr-2.0.0-metadata{ext}",
        [*meta, "ViewPosition", "Rows", "Columns"],
        [[d, su, st, "CHEST (PA AND LAT)", v, 40, 48] for d, su, st, _, v in rows],
        gz=gz,
    )
    labels = sorted(formats.CHEXPERT_LABELS)  # MIMIC's file lists them alphabetically
    values = {"Cardiomegaly": "1.0", "Edema": "-1.0", "Pleural Effusion": "0.0"}
    write_csv(
        root / f"mimic-cxr-2.0.0-chexpert{ext}",
        ["subject_id", "study_id", *labels],
        [[su, st, *(values.get(n, "") for n in labels)] for _, su, st, _, _ in rows[1:3]],
        gz=gz,
    )
    return Fixture(root, images)


MS_CXR_HEADER = [
    "dicom_id", "category_name", "label_text", "path", "x", "y", "w", "h",
    "image_width", "image_height", "split",
]  # fmt: skip


def write_ms_cxr(tmp_path: pathlib.Path) -> Fixture:
    """Two images: one with two boxes (one partly outside), one resized to half its size."""
    root = tmp_path / "mimic-cxr-jpg"
    path_a = "files/p10/p10000001/s50000001/a1.jpg"
    path_b = "files/p12/p12000002/s50000002/b2.jpg"
    write_image(root / path_a, 40, 48)
    write_image(root / path_b, 20, 24, seed=1)  # stored at half the original 40 × 48
    rows = [
        ["a1", "Pneumothorax", "Small left apical pneumothorax", path_a, 30, 2, 10, 8, 48, 40,
         "train"],
        ["a1", "Cardiomegaly", "Enlarged heart", path_a, 20, 20, 40, 30, 48, 40, "train"],
        ["b2", "Pleural Effusion", "Right pleural effusion", path_b, 4, 10, 12, 20, 48, 40,
         "val"],
    ]  # fmt: skip
    write_csv(root / "MS_CXR_Local_Alignment_v1.1.0.csv", MS_CXR_HEADER, rows)
    return Fixture(root, {"a1": root / path_a, "b2": root / path_b})


CHEXPERT_HEADER = ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA", *formats.CHEXPERT_LABELS]


def chexpert_row(path: str, view: str, **labels: str) -> list:
    names = {name.replace(" ", "_"): name for name in formats.CHEXPERT_LABELS}
    values = {names[key]: value for key, value in labels.items()}
    frontal = "Frontal" if view == "frontal" else "Lateral"
    return [path, "Female", 68, frontal, "AP" if view == "frontal" else "",
            *(values.get(n, "") for n in formats.CHEXPERT_LABELS)]  # fmt: skip


def write_chexpert(tmp_path: pathlib.Path) -> Fixture:
    """Three train images (two patients) and one valid image; CheXpert's 1/0/−1/blank labels."""
    root = tmp_path / "CheXpert-v1.0-small"
    prefix = "CheXpert-v1.0-small"
    train = [
        chexpert_row(f"{prefix}/train/patient00001/study1/view1_frontal.jpg", "frontal",
                     Cardiomegaly="1.0", Edema="-1.0", Pleural_Effusion="0.0"),
        chexpert_row(f"{prefix}/train/patient00001/study1/view2_lateral.jpg", "lateral",
                     Cardiomegaly="1.0"),
        chexpert_row(f"{prefix}/train/patient00002/study1/view1_frontal.jpg", "frontal",
                     No_Finding="1.0"),
    ]  # fmt: skip
    valid = [
        chexpert_row(f"{prefix}/valid/patient64541/study1/view1_frontal.jpg", "frontal",
                     Atelectasis="1.0", Edema="0.0"),
    ]  # fmt: skip
    write_csv(root / "train.csv", CHEXPERT_HEADER, train)
    write_csv(root / "valid.csv", CHEXPERT_HEADER, valid)
    images = {}
    for index, row in enumerate(train + valid):
        images[row[0]] = tmp_path / row[0]
        write_image(images[row[0]], seed=index)
    return Fixture(root, images)


def write_rsna_pneumonia(tmp_path: pathlib.Path) -> Fixture:
    """Three DICOMs: two boxes; no box (Target 0, JPEG-compressed); MONOCHROME1 with one box."""
    root = tmp_path / "rsna"
    rows = [
        ["p-two", 2, 4, 10, 12, 1],
        ["p-two", 20, 4, 10, 50, 1],  # runs past the 32-pixel bottom: clipped
        ["p-none", "", "", "", "", 0],
        ["p-mono1", 5, 5, 8, 8, 1],
    ]
    write_csv(root / "stage_2_train_labels.csv", ["patientId", "x", "y", "width", "height",
                                                  "Target"], rows)  # fmt: skip
    classes = [["p-two", "Lung Opacity"], ["p-two", "Lung Opacity"],
               ["p-none", "No Lung Opacity / Not Normal"], ["p-mono1", "Lung Opacity"]]  # fmt: skip
    write_csv(root / "stage_2_detailed_class_info.csv", ["patientId", "class"], classes)
    images = {name: root / "stage_2_train_images" / f"{name}.dcm" for name in ("p-two", "p-none")}
    images["p-mono1"] = root / "stage_2_train_images" / "p-mono1.dcm"
    write_dicom(images["p-two"], ramp())
    write_jpeg_dicom(images["p-none"], (ramp() // 16).astype(np.uint8))
    write_dicom(images["p-mono1"], ramp(), photometric="MONOCHROME1")
    return Fixture(root, images)


VINDR_HEADER = ["image_id", "rad_id", "class_name", "x_min", "y_min", "x_max", "y_max", "class_id"]


def write_vindr_cxr(tmp_path: pathlib.Path) -> Fixture:
    """Two train images (one DICOM, one PNG export), one test DICOM with "No finding"."""
    root = tmp_path / "vindr-cxr" / "1.0.0"
    train = [
        ["img-a", "R8", "Cardiomegaly", 10, 20, 30, 28, 3],
        ["img-a", "R9", "Pleural effusion", 0, 25, 12, 40, 10],  # y_max past the image
        ["img-a", "R10", "ILD", 5, 5, 5, 9, 5],  # zero width: dropped
        ["img-b", "R8", "No finding", "", "", "", "", 14],
    ]
    test = [["img-c", "R1", "No finding", "", "", "", "", 14]]
    write_csv(root / "annotations/annotations_train.csv", VINDR_HEADER, train)
    write_csv(root / "annotations/annotations_test.csv", VINDR_HEADER, test)
    label_columns = ["Cardiomegaly", "Pleural effusion", "Lung tumor", "No finding"]
    write_csv(
        root / "annotations/image_labels_train.csv",
        ["image_id", "rad_ID", *label_columns],
        [["img-a", "R8", 1, 0, 1, 0], ["img-a", "R9", 0, 1, 0, 0], ["img-b", "R8", 0, 0, 0, 1]],
    )
    images = {
        "img-a": root / "train/img-a.dicom",
        "img-b": root / "train/img-b.png",
        "img-c": root / "test/img-c.dicom",
    }
    write_dicom(images["img-a"], ramp())
    write_image(images["img-b"], 32, 40)
    write_dicom(images["img-c"], ramp())
    return Fixture(root, images)


ENTRY_HEADER = [
    "Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age",
    "Patient Gender", "View Position", "OriginalImage[Width", "Height]",
    "OriginalImagePixelSpacing[x", "y]", "",
]  # fmt: skip


def write_chestxray14(tmp_path: pathlib.Path) -> Fixture:
    """Four images of three patients over two image archives, two with boxes."""
    root = tmp_path / "nih"
    rows = [
        ["00000001_000.png", "Cardiomegaly|Effusion", 0, 1],
        ["00000001_001.png", "No Finding", 1, 1],
        ["00000002_000.png", "Infiltration", 0, 2],
        ["00000003_000.png", "Pleural_Thickening", 0, 3],
    ]
    write_csv(
        root / "Data_Entry_2017.csv",
        ENTRY_HEADER,
        [[*row, 57, "M", "PA", 2500, 2048, 0.143, 0.143, ""] for row in rows],
    )
    write_csv(
        root / "BBox_List_2017.csv",
        ["Image Index", "Finding Label", "Bbox [x", "y", "w", "h]", "", "", ""],
        [["00000001_000.png", "Cardiomegaly", 10.5, 12.25, 20, 15, "", "", ""],
         ["00000002_000.png", "Infiltrate", 3, 4, 5, 6, "", "", ""]],
    )  # fmt: skip
    (root / "train_val_list.txt").write_text(
        "00000001_000.png\n00000001_001.png\n00000002_000.png\n"
    )
    (root / "test_list.txt").write_text("00000003_000.png\n")
    images = {}
    for index, row in enumerate(rows):
        archive = "images_001" if index < 2 else "images_002"
        images[row[0]] = root / archive / "images" / row[0]
        write_image(images[row[0]], 32, 32, seed=index)
    return Fixture(root, images)


def write_roco(tmp_path: pathlib.Path) -> Fixture:
    """One radiology figure per split."""
    root = tmp_path / "roco" / "data"
    images = {}
    for index, (split, short) in enumerate(
        [("train", "train"), ("validation", "val"), ("test", "test")]
    ):
        folder = root / split / "radiology"
        record_id = f"ROCO_0000{index}"
        name = f"PMC40{index}_Case-{index}-g001.jpg"
        write_csv(
            folder / f"radiology{short}data.csv",
            ["id", "name", "caption"],
            [[record_id, name, f" CT scan showing a mass in case {index}.\n"]],
        )
        images[record_id] = folder / "images" / name
        write_image(images[record_id], seed=index)
    return Fixture(root, images)


def write_generic(tmp_path: pathlib.Path, *, jsonl: bool = False) -> Fixture:
    """Three user images with boxes and 2 labels, as ``data.csv`` or ``data.jsonl``."""
    root = tmp_path / "mydata"
    rows = [
        dict(image="imgs/a.png", caption="Nodule in the right upper lobe.",
             boxes=[[1, 2, 11, 12]], box_captions=["right upper lobe nodule"], box_labels=[0],
             labels=[1, 0], patient_id="P1", split="train"),
        dict(image="imgs/b.jpg", caption="Normal chest.", labels=[0, None], patient_id="P2",
             split="validation"),
        dict(image="imgs/c.png", caption="Left effusion.", boxes=[[30, 30, 60, 50], [5, 5, 5, 9]],
             box_captions=["left effusion", "degenerate"], labels=[0, 1], patient_id="P3",
             split="test"),
    ]  # fmt: skip
    images = {}
    for index, row in enumerate(rows):
        images[row["image"]] = root / row["image"]
        write_image(images[row["image"]], 40, 48, seed=index)
    if jsonl:
        lines = [json.dumps(row) for row in rows]
        (root / "data.jsonl").write_text("\n".join(lines) + "\n")
    else:
        columns = ["image", "caption", "boxes", "box_captions", "box_labels", "labels",
                   "patient_id", "split"]  # fmt: skip
        cells = [
            [json.dumps(row[c]) if isinstance(row.get(c), list) else row.get(c, "")
             for c in columns]
            for row in rows
        ]  # fmt: skip
        write_csv(root / "data.csv", columns, cells)
    return Fixture(root, images, options=dict(num_labels=2))


WRITERS = {
    "mimic_cxr": write_mimic_cxr,
    "ms_cxr": write_ms_cxr,
    "chexpert": write_chexpert,
    "rsna_pneumonia": write_rsna_pneumonia,
    "vindr_cxr": write_vindr_cxr,
    "chestxray14": write_chestxray14,
    "roco": write_roco,
    "csv": write_generic,
}
