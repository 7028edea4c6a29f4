"""Dataset readers against tiny copies of each published layout (tests/fixtures, see its README).

Each fixture holds good rows, a malformed row, a missing image and a corrupt image; the tests pin the
exact records and skips produced, and show that a corrupt image still reaches a Record (``prepare``
counts it when :func:`decode_image` raises). The DICOM decoder is checked on pydicom's own CT and MR
test files and on small synthetic files whose displayed values are worked out by hand.
"""

from __future__ import annotations

import gzip
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from medvl.data.images import UnreadableImage, decode_image
from medvl.data.readers import READERS, ReaderOptions, extract_findings, read_dataset
from medvl.data.records import Record

FIXTURES = Path(__file__).parent / "fixtures"
MIMIC = FIXTURES / "mimic_cxr"
PA1, LAT1, AP2, AP3, PA4, PA5, BAD, LL6 = (
    "1a2b3c4d-5e6f7a8b-9c0d1e2f-3a4b5c6d-7e8f9a0b",
    "2b3c4d5e-6f7a8b9c-0d1e2f3a-4b5c6d7e-8f9a0b1c",
    "3c4d5e6f-7a8b9c0d-1e2f3a4b-5c6d7e8f-9a0b1c2d",
    "4d5e6f7a-8b9c0d1e-2f3a4b5c-6d7e8f9a-0b1c2d3e",
    "5e6f7a8b-9c0d1e2f-3a4b5c6d-7e8f9a0b-1c2d3e4f",
    "6f7a8b9c-0d1e2f3a-4b5c6d7e-8f9a0b1c-2d3e4f5a",
    "7a8b9c0d-1e2f3a4b-5c6d7e8f-9a0b1c2d-3e4f5a6b",
    "8b9c0d1e-2f3a4b5c-6d7e8f9a-0b1c2d3e-4f5a6b7c",
)
FINDINGS_A = (
    "The lungs are clear without focal consolidation. No pleural effusion or pneumothorax is seen. "
    "The cardiac and mediastinal silhouettes are unremarkable."
)
FINDINGS_B = (
    "Portable AP upright view of the chest. Mild pulmonary vascular congestion with small bilateral pleural "
    "effusions. Heart size is mildly enlarged."
)
FINDINGS_D = "Right-sided PICC terminates in the mid SVC. No pneumothorax. Lungs are otherwise clear."


def summary(items) -> list[tuple]:
    """Records as (id, group_id, split, text, question, answer, answer_type); skips as (id, reason)."""
    return [
        (i.id, i.group_id, i.split, i.text, i.question, i.answer, i.answer_type)
        if isinstance(i, Record)
        else (i.id, i.reason)
        for i in items
    ]


def by_id(items) -> dict[str, Record]:
    return {i.id: i for i in items if isinstance(i, Record)}


def assert_images(records: dict[str, Record], files: dict[str, Path], corrupt: set[str]) -> None:
    """Each record carries its file's bytes unchanged; good ones decode, corrupt ones raise UnreadableImage."""
    for record_id, path in files.items():
        assert records[record_id].image == path.read_bytes()
        if record_id in corrupt:
            with pytest.raises(UnreadableImage):
                decode_image(records[record_id].image)
        else:
            assert decode_image(records[record_id].image).size == (16, 16)


def caption(record_id: str, split: str, text: str) -> tuple:
    return (record_id, record_id, split, text, "", "", "")


def test_roco_reads_published_layout_with_both_image_namings():
    items = list(read_dataset("roco", str(FIXTURES / "roco")))
    assert summary(items) == [
        caption(
            "ROCO_00002",
            "train",
            "Computed tomography scan in axial view showing obliteration of the left maxillary sinus.",
        ),
        caption("ROCO_00003", "train", "Chest radiograph shows a right pleural effusion."),
        ("ROCO_00004", "malformed_row"),  # space instead of tab
        ("ROCO_00005", "empty_target"),
        ("ROCO_00006", "missing_image"),
        caption("ROCO_00020", "val", "Axial computed tomography scan of the pelvis showing a thickened bladder wall."),
        caption("ROCO_00001", "test", "Lateral radiograph of the cervical spine."),
    ]
    records = by_id(items)
    assert records["ROCO_00002"].meta == {
        "subset": "radiology",
        "keywords": ["computed", "tomography", "maxillary", "sinus", "obliteration"],
        "cuis": ["C0040405", "C0024947"],
        "semtypes": ["T060", "T023"],
        "licence": "CC BY-NC-SA",
    }
    assert records["ROCO_00001"].meta["cuis"] == ["C0728985", "C0034571"]  # from cuis_tp_test_revised.txt
    roco = FIXTURES / "roco"
    assert_images(
        records,
        {
            "ROCO_00002": roco / "train/radiology/images/PMC4083325_IJD-59-396-g001.jpg",  # fetch.py's name, via dlinks
            "ROCO_00003": roco / "train/radiology/images/ROCO_00003.jpg",
            "ROCO_00020": roco / "validation/radiology/images/ROCO_00020.jpg",
            "ROCO_00001": roco / "test/radiology/images/PMC3000001_fig2.jpg",
        },
        corrupt={"ROCO_00003"},
    )


def test_roco_reads_non_radiology_only_when_asked_and_accepts_a_repository_clone(tmp_path):
    (tmp_path / "data").symlink_to(FIXTURES / "roco")
    items = list(read_dataset("roco", str(tmp_path), ReaderOptions(include_non_radiology=True)))
    assert [i.id for i in items] == [
        "ROCO_00002",
        "ROCO_00003",
        "ROCO_00004",
        "ROCO_00005",
        "ROCO_00006",
        "ROCO_81826",
        "ROCO_00020",
        "ROCO_00001",
    ]
    assert by_id(items)["ROCO_81826"].meta["subset"] == "non-radiology"
    assert "ROCO_81826" not in [i.id for i in read_dataset("roco", str(FIXTURES / "roco"))]


def test_rocov2_reads_captions_and_concepts():
    items = list(read_dataset("rocov2", str(FIXTURES / "rocov2")))
    assert summary(items) == [
        caption("ROCOv2_2023_train_000001", "train", "Head CT demonstrating left parotiditis."),
        caption("ROCOv2_2023_train_000002", "train", "Chest X-ray, PA view: cardiomegaly with pulmonary congestion."),
        ("ROCOv2_2023_train_000003", "malformed_row"),  # unquoted comma: three fields
        ("ROCOv2_2023_train_000004", "empty_target"),
        ("ROCOv2_2023_train_000005", "missing_image"),
        caption("ROCOv2_2023_valid_000001", "val", "Ultrasound of the thyroid gland showing a hypoechoic nodule."),
        caption("ROCOv2_2023_test_000001", "test", "Coronal CT of the abdomen."),
    ]
    records = by_id(items)
    assert records["ROCOv2_2023_train_000001"].meta == {"cuis": ["C0040405", "C0030580"]}
    assert records["ROCOv2_2023_test_000001"].meta == {"cuis": []}  # no test_concepts.csv
    root = FIXTURES / "rocov2"
    assert_images(
        records,
        {
            "ROCOv2_2023_train_000001": root / "train/ROCOv2_2023_train_000001.jpg",
            "ROCOv2_2023_train_000002": root / "train/ROCOv2_2023_train_000002.jpg",
            "ROCOv2_2023_valid_000001": root / "valid/ROCOv2_2023_valid_000001.jpg",
        },
        corrupt={"ROCOv2_2023_train_000002"},
    )


MIMIC_ALL = [
    (PA1, "10000001", "train", FINDINGS_A, "", "", ""),
    (LAT1, "10000001", "train", FINDINGS_A, "", "", ""),
    (AP2, "10000001", "train", FINDINGS_B, "", "", ""),
    (AP3, "10000002", "val", FINDINGS_D, "", "", ""),  # report under mimic-cxr-reports/, image a .dcm
    (PA4, "no_findings_section"),
    (PA5, "missing_image"),
    (BAD, "malformed_row"),  # empty study_id
    (LL6, "missing_report"),
    ("9c0d1e2f-3a4b5c6d-7e8f9a0b-1c2d3e4f-5a6b7c8d", "malformed_row"),  # a line cut short
]


def test_mimic_cxr_one_record_per_image_grouped_by_subject():
    items = list(read_dataset("mimic_cxr", str(MIMIC)))
    assert summary(items) == MIMIC_ALL
    records = by_id(items)
    assert records[LAT1].meta == {"study_id": "50000001", "subject_id": "10000001", "view_position": "LATERAL"}
    study1 = MIMIC / "files/p10/p10000001/s50000001"
    assert_images(
        records,
        {PA1: study1 / f"{PA1}.jpg", AP2: MIMIC / f"files/p10/p10000001/s50000002/{AP2}.jpg"},
        corrupt={AP2},  # a truncated JPEG
    )
    assert records[AP3].image == (MIMIC / f"files/p10/p10000002/s50000003/{AP3}.dcm").read_bytes()


def test_mimic_cxr_frontal_only_keeps_pa_and_ap():
    items = read_dataset("mimic_cxr", str(MIMIC), ReaderOptions(frontal_only=True))
    assert summary(items) == [(row[0], "not_frontal") if row[0] in (LAT1, LL6) else row for row in MIMIC_ALL]


def test_mimic_cxr_reads_gzipped_csvs_and_needs_metadata_for_frontal_only(tmp_path):
    root = tmp_path / "mimic"
    shutil.copytree(MIMIC, root)
    for name in ("mimic-cxr-2.0.0-split.csv", "mimic-cxr-2.0.0-metadata.csv"):
        (root / f"{name}.gz").write_bytes(gzip.compress((root / name).read_bytes()))
        (root / name).unlink()
    assert summary(read_dataset("mimic_cxr", str(root))) == MIMIC_ALL
    (root / "mimic-cxr-2.0.0-metadata.csv.gz").unlink()
    assert by_id(read_dataset("mimic_cxr", str(root)))[PA1].meta["view_position"] == ""
    with pytest.raises(ValueError, match="metadata"):
        read_dataset("mimic_cxr", str(root), ReaderOptions(frontal_only=True))


@pytest.mark.parametrize(
    "report, findings",
    [
        ((MIMIC / "files/p10/p10000001/s50000001.txt").read_text(), FINDINGS_A),  # header on its own line
        ((MIMIC / "files/p10/p10000001/s50000002.txt").read_text(), FINDINGS_B),  # inline IMPRESSION ends it
        ((MIMIC / "mimic-cxr-reports/files/p10/p10000002/s50000003.txt").read_text(), FINDINGS_D),  # combined
        ((MIMIC / "files/p10/p10000002/s50000004.txt").read_text(), ""),  # impression only
        (
            (MIMIC / "files/p11/p11000003/s50000005.txt").read_text(),
            "Compared to ___, there is no change. Heart size is normal.",
        ),
        (" FINDINGS/IMPRESSION:  No acute process.\n", "No acute process."),
        (" FINDINGS:\n \n FINDINGS:  PA view: lungs clear.\n \n IMPRESSION:  Normal.\n", "PA view: lungs clear."),
        (
            " FINDINGS:\n LUNGS: Clear.\n HEART: Normal size.\n \n RECOMMENDATION(S):  None.\n",
            "LUNGS: Clear. HEART: Normal size.",
        ),
        (" INDICATION:  Fever.\n \n IMPRESSION:  Findings: none acute.  No findings of pneumonia.\n", ""),
        (" FINDINGS:  Stable.\n \n CLINICAL HISTORY:  ___.\n", "Stable."),
        (" FINDINGS:  Unchanged.  COMPARISON EXAM:  ___.\n", "Unchanged."),
    ],
)
def test_extract_findings(report, findings):
    assert extract_findings(report) == findings


def test_iu_xray_r2gen_annotation_one_record_per_image():
    items = list(read_dataset("iu_xray", str(FIXTURES / "iu_xray_r2gen")))
    assert summary(items) == [
        (
            "CXR2384_IM-0942_0",
            "CXR2384",
            "train",
            "Heart size is within normal limits. A small hiatal hernia is present.",
            "",
            "",
            "",
        ),
        ("CXR2384_IM-0942_1", "missing_image"),
        ("CXR1000_IM-0003_0", "empty_target"),
        ("CXR5_IM-2117", "malformed_row"),  # image_path is a string, not a list
        ("CXR2926_IM-1328_0", "CXR2926", "val", "No focal consolidation. No pleural effusion.", "", "", ""),
        ("CXR2926_IM-1328_1", "CXR2926", "val", "No focal consolidation. No pleural effusion.", "", "", ""),
        (
            "CXR1451_IM-0291_0",
            "CXR1451",
            "test",
            "Calcified granuloma in the left lower lobe. Normal heart size.",
            "",
            "",
            "",
        ),
    ]
    images = FIXTURES / "iu_xray_r2gen/images"
    assert_images(
        by_id(items),
        {"CXR2384_IM-0942_0": images / "CXR2384_IM-0942/0.png", "CXR2926_IM-1328_1": images / "CXR2926_IM-1328/1.png"},
        corrupt={"CXR2926_IM-1328_1"},
    )


def test_iu_xray_openi_xml_reports():
    items = list(read_dataset("iu_xray", str(FIXTURES / "iu_xray_openi")))
    findings_1 = "The cardiac silhouette is within normal limits. There are no XXXX of a pleural effusion."
    findings_10 = "Stable cardiomegaly. Mild degenerative changes of the spine."
    assert summary(items) == [
        ("CXR1_1_IM-0001-3001", "CXR1", "", findings_1, "", "", ""),
        ("CXR1_1_IM-0001-4001", "CXR1", "", findings_1, "", "", ""),
        ("CXR2_IM-0652-1001", "empty_target"),  # <AbstractText Label="FINDINGS"/>
        ("CXR3", "missing_image"),  # a report without parentImage
        ("4", "malformed_row"),  # truncated XML
        ("CXR10_IM-0002-1001", "missing_image"),
        ("CXR10_IM-0002-2001", "CXR10", "", findings_10, "", "", ""),  # 10.xml sorts after 4.xml
    ]
    records = by_id(items)
    assert records["CXR10_IM-0002-2001"].meta == {
        "study_id": "CXR10",
        "impression": "No acute cardiopulmonary abnormality.",
        "mesh_major": ["Cardiomegaly/mild", "Spine/degenerative/mild"],
    }
    images = FIXTURES / "iu_xray_openi/images"
    assert_images(
        records,
        {
            "CXR1_1_IM-0001-3001": images / "CXR1_1_IM-0001-3001.png",
            "CXR1_1_IM-0001-4001": images / "CXR1_1_IM-0001-4001.png",
        },
        corrupt={"CXR1_1_IM-0001-4001"},
    )


def test_vqa_rad_osf_layout_splits_on_phrase_type():
    items = list(read_dataset("vqa_rad", str(FIXTURES / "vqa_rad_osf")))
    assert summary(items) == [
        # training questions: prepare carves validation out of them (the release has no validation split)
        ("1", "synpic900001.jpg", "train|val", "", "Is there a pneumothorax?", "No", "closed"),
        ("2", "synpic900001.jpg", "train|val", "", "How many ribs are fractured?", "2", "open"),  # stored as 2
        ("3", "synpic900002.jpg", "test", "", "Is this an MRI?", "Yes", "closed"),  # "CLOSED ", test_freeform
        ("4", "malformed_row"),  # no question
        ("5", "empty_target"),
        ("6", "missing_image"),
    ]
    records = by_id(items)
    assert records["2"].meta == {
        "image_organ": "CHEST",
        "question_type": "COUNT",
        "phrase_type": "para",
        "qid_linked_id": "00000002-aaaa-4bbb-8ccc-dddddddddddd",
    }
    folder = FIXTURES / "vqa_rad_osf/VQA_RAD Image Folder"
    assert_images(records, {"1": folder / "synpic900001.jpg", "3": folder / "synpic900002.jpg"}, corrupt={"3"})


def test_vqa_rad_real_mevf_sample():
    items = list(read_dataset("vqa_rad", str(FIXTURES / "vqa_rad")))
    skin = "superficial to the patient's skin"  # stored with a leading space
    assert summary(items) == [
        ("3371", "synpic35191.jpg", "", "", "Is this an infectious process?", "Maybe", "closed"),
        ("3372", "synpic35191.jpg", "", "", "Does this represent infectious process?", "Yes", "closed"),
        ("2392", "synpic45162.jpg", "", "", "How many gallstones are identified?", "4", "open"),
        (
            "2393",
            "synpic45162.jpg",
            "",
            "",
            "How many gallstones are present/visualized in the image?",
            "4",
            "open",
        ),
        (
            "3504",
            "synpic26764.jpg",
            "",
            "",
            "Is the opacity located in the middle of the image inside the patient or superficial to the patient's skin?",
            skin,
            "closed",
        ),
        ("3505", "synpic26764.jpg", "", "", "Where is/are the circular opacity located?", skin, "closed"),
    ]
    assert by_id(items)["3371"].meta == {"image_organ": "HEAD", "question_type": "OTHER", "phrase_type": "freeform"}
    for record in items:
        assert record.image == (FIXTURES / "vqa_rad/images" / record.group_id).read_bytes()
        assert max(decode_image(record.image).size) == 64


def test_vqa_rad_mevf_with_testset_keeps_the_published_split(tmp_path):
    """trainset.json alone carries no split (prepare carves one); with testset.json the test split is kept and
    the training questions are train|val (prepare carves validation out of them)."""
    root = tmp_path / "vqa_rad"
    shutil.copytree(FIXTURES / "vqa_rad", root)
    rows = json.loads((root / "trainset.json").read_text())
    (root / "testset.json").write_text(json.dumps(rows[:2]))
    (root / "trainset.json").write_text(json.dumps(rows[2:]))
    splits = {(i.id, i.split) for i in read_dataset("vqa_rad", str(root)) if isinstance(i, Record)}
    assert splits == {("3371", "test"), ("3372", "test"), ("2392", "train|val"), ("2393", "train|val"),
                      ("3504", "train|val"), ("3505", "train|val")}


SLAKE_EN = [
    ("0", "xmlab1/source.jpg", "train", "", "What modality is used to take this image?", "CT", "open"),
    ("2", "xmlab1/source.jpg", "train", "", "Does the picture contain lung?", "Yes", "closed"),
    ("3", "xmlab2/source.jpg", "train", "", "Which organ is abnormal?", "Lung", "open"),
    ("4", "empty_target"),
    ("5", "missing_image"),
    ("6", "malformed_row"),  # no img_name
    ("7", "xmlab5/source.jpg", "val", "", "What modality is shown?", "MRI", "open"),
    ("8", "xmlab6/source.jpg", "test", "", "Is the heart enlarged?", "No", "closed"),
]


def test_slake_keeps_english_by_default():
    items = list(read_dataset("slake", str(FIXTURES / "slake")))
    assert summary(items) == SLAKE_EN[:1] + [("1", "other_language")] + SLAKE_EN[1:]  # counted, not dropped
    records = by_id(items)
    assert records["3"].meta == {
        "img_id": 2,
        "q_lang": "en",
        "content_type": "Abnormality",
        "modality": "X-Ray",
        "location": "Chest_lung",
        "base_type": "vqa",
    }
    imgs = FIXTURES / "slake/imgs"
    assert_images(records, {"0": imgs / "xmlab1/source.jpg", "3": imgs / "xmlab2/source.jpg"}, corrupt={"3"})


def test_slake_language_option():
    chinese = ("1", "xmlab1/source.jpg", "train", "", "这张图片的成像方式是什么?", "CT", "open")
    chinese_only = summary(read_dataset("slake", str(FIXTURES / "slake"), ReaderOptions(language="zh")))
    assert [row for row in chinese_only if row[1:] != ("other_language",)] == [chinese]
    assert [row[0] for row in chinese_only if row[1:] == ("other_language",)] == [row[0] for row in SLAKE_EN]
    every = summary(read_dataset("slake", str(FIXTURES / "slake"), ReaderOptions(language="all")))
    assert every == SLAKE_EN[:1] + [chinese] + SLAKE_EN[1:]


def test_optional_images_give_records_without_bytes():
    items = by_id(read_dataset("slake", str(FIXTURES / "slake"), ReaderOptions(require_image=False)))
    assert items["5"].image == b"" and items["5"].answer == "Left"


def test_unknown_format_names_the_known_ones():
    with pytest.raises(ValueError) as error:
        read_dataset("chexpert", str(FIXTURES))
    assert all(name in str(error.value) for name in READERS)


@pytest.mark.parametrize("format", sorted(READERS))
def test_a_folder_that_is_not_the_layout_raises_when_called(format, tmp_path):
    with pytest.raises(ValueError, match="layout"):
        read_dataset(format, str(tmp_path))  # no next(): the check is eager
    with pytest.raises(ValueError, match="not a directory"):
        read_dataset(format, str(tmp_path / "absent"))


# --- DICOM -----------------------------------------------------------------------------------------


def dicom_bytes(pixels: np.ndarray, photometric: str = "MONOCHROME2", **tags) -> bytes:
    """A minimal valid DICOM file holding ``pixels`` (frames first when 3-D grey)."""
    pydicom = pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian

    sop_class, sop_instance = "1.2.840.10008.5.1.4.1.1.7", "1.2.826.0.1.3680043.8.498.1"  # Secondary Capture
    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, sop_instance
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, sop_instance
    colour = photometric == "RGB"
    ds.Rows, ds.Columns = pixels.shape[-3:-1] if colour else pixels.shape[-2:]
    if pixels.ndim == (4 if colour else 3):
        ds.NumberOfFrames = pixels.shape[0]
    ds.SamplesPerPixel = 3 if colour else 1
    if colour:
        ds.PlanarConfiguration = 0
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    for name, value in tags.items():
        setattr(ds, name, value)
    ds.PixelData = pixels.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert pydicom.dcmread(io.BytesIO(buffer.getvalue())).pixel_array.shape == pixels.shape
    return buffer.getvalue()


def grey(data: bytes) -> np.ndarray:
    image = decode_image(data)  # through the same entry point prepare uses
    assert image.mode == "RGB"
    return np.asarray(image)[..., 0]


def test_dicom_ct_without_window_spans_its_own_range():
    pydicom = pytest.importorskip("pydicom")
    data = Path(pydicom.data.get_testdata_file("CT_small.dcm")).read_bytes()
    pixels = grey(data)
    # Stored values run 128..2191 (rescale intercept -1024 shifts them, slope 1): 128 -> 0, 2191 -> 255,
    # and pixel (64, 64), stored 1928, -> (1928 - 128) / 2063 * 255 = 222.5 -> 222.
    assert pixels.shape == (128, 128)
    assert (pixels.min(), pixels.max(), pixels[64, 64]) == (0, 255, 222)


def test_dicom_mr_window_matches_pydicom_linear_voi():
    pydicom = pytest.importorskip("pydicom")
    from pydicom.pixels import apply_voi_lut

    path = pydicom.data.get_testdata_file("MR_small.dcm")
    pixels = grey(Path(path).read_bytes())
    # Window 600 / 1600: stored 127 -> ((127 - 599.5) / 1599 + 0.5) * 255 = 52.2 -> 52; >= 1399 -> 255.
    ds = pydicom.dcmread(path)
    assert pixels[ds.pixel_array == 127].tolist()[:1] == [52]
    assert (pixels[ds.pixel_array >= 1400] == 255).all()
    # pydicom's own windowing, mapped from its signed 16-bit output range, agrees to rounding.
    reference = (apply_voi_lut(ds.pixel_array, ds).astype(float) + 32768) / 65535 * 255
    assert np.abs(pixels - reference).max() <= 0.5


def test_dicom_monochrome1_is_inverted_after_rescale_and_window():
    stored = np.array([[50, 100], [200, 250]], dtype=np.uint16)
    data = dicom_bytes(
        stored, "MONOCHROME1", RescaleSlope=2, RescaleIntercept=-100, WindowCenter=200.5, WindowWidth=401
    )
    # Rescaled: 0, 100, 300, 400. The window spans 0..400 exactly: 0, 63.75, 191.25, 255 -> 0, 64, 191, 255,
    # then MONOCHROME1 puts low values white: 255, 191, 64, 0.
    assert grey(data).tolist() == [[255, 191], [64, 0]]


def test_dicom_multiframe_gives_the_middle_frame():
    frames = np.stack([np.full((2, 2), value, dtype=np.uint16) for value in (0, 500, 2000)])
    data = dicom_bytes(frames, WindowCenter=1000.5, WindowWidth=2001)  # window spans 0..2000
    assert grey(data).tolist() == [[64, 64], [64, 64]]  # 500 / 2000 * 255 = 63.75


def test_dicom_multiframe_decodes_only_the_middle_frame():
    import tracemalloc

    frames = np.stack([np.full((128, 128), value, dtype=np.uint16) for value in range(64)])  # 2 MiB of pixels
    data = dicom_bytes(frames, WindowCenter=32.5, WindowWidth=64)
    tracemalloc.start()
    try:
        image = decode_image(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.asarray(image)[0, 0, 0] == 128  # frame 32 of 0..63, the window's middle
    # Reading the file holds its bytes once; decoding every frame would hold them twice more (uint16, then
    # float64 for the window); one frame adds 1/64 of that.
    assert peak < 2 * len(data), (peak, len(data))


@pytest.mark.parametrize("format", ["BMP", "GIF", "TIFF", "WEBP", "ICO", "PPM"])
def test_only_png_jpeg_and_dicom_decode(format: str):
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buffer, format=format)
    with pytest.raises(UnreadableImage):
        decode_image(buffer.getvalue())


def test_eps_never_reaches_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n%%EndComments\n0 0 moveto showpage\n"
    with pytest.raises(UnreadableImage, match="cannot identify"):
        decode_image(eps)


def test_dicom_rgb_passes_through():
    rgb = np.array([[[255, 0, 0], [10, 20, 30]]], dtype=np.uint8)
    assert np.asarray(decode_image(dicom_bytes(rgb, "RGB"))).tolist() == rgb.tolist()


def test_dicom_fixture_in_mimic_layout_decodes_with_its_window():
    pytest.importorskip("pydicom")
    data = (MIMIC / f"files/p10/p10000002/s50000003/{AP3}.dcm").read_bytes()
    pixels = grey(data)
    # Stored (x + 16 y) * 16, window 2048 / 4096: 0 -> 0.03 -> 0; 4080 -> ((4080 - 2047.5) / 4095 + 0.5) * 255 = 254.1.
    assert pixels.shape == (16, 16) and (pixels[0, 0], pixels[15, 15]) == (0, 254)


def test_truncated_dicom_raises_unreadable_image():
    pydicom = pytest.importorskip("pydicom")
    data = Path(pydicom.data.get_testdata_file("MR_small.dcm")).read_bytes()
    with pytest.raises(UnreadableImage, match="pixel data"):
        decode_image(data[: len(data) // 2])  # a download cut short: half the pixel data
