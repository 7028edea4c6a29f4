"""Which rows a prepare stage takes: ROCOv2 by modality, MIMIC-CXR frontal views and the first N studies, and a
re-split by patient, each reachable from the spec (data.modalities, frontal_only, max_studies, resplit)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medvl.data.prepare import source_items
from medvl.data.readers import ReaderOptions, read_dataset
from medvl.data.readers.roco import MODALITY_CUIS, modality_cuis
from medvl.data.records import Record, Skipped
from medvl.data.shards import write_shards
from medvl.spec import SpecError, parse_spec

FIXTURES = Path(__file__).parent / "fixtures"
ROCOV2, MIMIC = FIXTURES / "rocov2", FIXTURES / "mimic_cxr"


def ids(items) -> list[str]:
    return [item.id if isinstance(item, Record) else f"{item.id}:{item.reason}" for item in items]


def spec_for(**data):
    return parse_spec({"name": "t", "output_dir": "/tmp/unused", "stages": ["prepare"], "data": data})


# ------------------------------------------------------------------------------------------------ ROCOv2 modalities


def test_rocov2_modality_filter_keeps_ct_mri_and_xray_by_their_cuis():
    items = list(read_dataset("rocov2", str(ROCOV2), ReaderOptions(modalities=("ct", "mri", "xray"))))
    assert ids(items) == [
        "ROCOv2_2023_train_000001",  # C0040405: CT
        "ROCOv2_2023_train_000002",  # C1306645: plain x-ray
        "ROCOv2_2023_train_000003:malformed_row",  # no id to look up: reported as before
        # train_000004 (no concepts) and valid_000001 (C0041618: ultrasound) are not selected
        "ROCOv2_2023_train_000005:missing_image",  # C0024485: MRI, selected, but its image is missing
        # test_000001: its split has no concepts file, so no known modality
    ]
    only_ultrasound = read_dataset("rocov2", str(ROCOV2), ReaderOptions(modalities=("ultrasound",)))
    assert [i.id for i in only_ultrasound if isinstance(i, Record)] == ["ROCOv2_2023_valid_000001"]
    assert len([i for i in read_dataset("rocov2", str(ROCOV2)) if isinstance(i, Record)]) == 4  # no filter: all


def test_rocov2_reads_the_manually_curated_concepts_too(tmp_path):
    root = tmp_path / "rocov2"
    shutil.copytree(ROCOV2, root)
    (root / "test_concepts_manual.csv").write_text("ID,CUIs\nROCOv2_2023_test_000001,C0040405;C0000726\n")
    (root / "train_concepts_manual.csv").write_text("ID,CUIs\nROCOv2_2023_train_000001,C0040405;C0037303\n")
    records = {i.id: i for i in read_dataset("rocov2", str(root), ReaderOptions(modalities=("ct",)))
               if isinstance(i, Record)}
    assert set(records) == {"ROCOv2_2023_train_000001", "ROCOv2_2023_test_000001"}
    assert records["ROCOv2_2023_train_000001"].meta == {"cuis": ["C0040405", "C0030580", "C0037303"]}  # no repeat


def test_modality_names_map_to_umls_cuis_and_the_spec_knows_the_same_names():
    assert modality_cuis(["ct", "xray"]) == {"C0040405", "C1306645", "C0034571"}
    with pytest.raises(ValueError, match="unknown modality 'cr'"):
        modality_cuis(["cr"])
    assert spec_for(format="rocov2", source="x", modalities=list(MODALITY_CUIS)).data.modalities == list(MODALITY_CUIS)


def test_the_spec_passes_modalities_to_the_reader():
    spec = spec_for(format="rocov2", source=str(ROCOV2), modalities=["ultrasound"])
    assert [i.id for i in source_items(spec) if isinstance(i, Record)] == ["ROCOv2_2023_valid_000001"]


# ------------------------------------------------------------------------------------------------ MIMIC-CXR


PA1, LAT1, AP2, AP3 = ("1a2b3c4d-5e6f7a8b-9c0d1e2f-3a4b5c6d-7e8f9a0b", "2b3c4d5e-6f7a8b9c-0d1e2f3a-4b5c6d7e-8f9a0b1c",
                       "3c4d5e6f-7a8b9c0d-1e2f3a4b-5c6d7e8f-9a0b1c2d", "4d5e6f7a-8b9c0d1e-2f3a4b5c-6d7e8f9a-0b1c2d3e")


def test_mimic_max_studies_stops_after_that_many_studies_with_a_record():
    records = lambda **o: [i.id for i in read_dataset("mimic_cxr", str(MIMIC), ReaderOptions(**o))
                           if isinstance(i, Record)]
    assert records() == [PA1, LAT1, AP2, AP3]  # studies 50000001 (two images), 50000002, 50000003
    assert records(max_studies=1) == [PA1, LAT1]  # a study's every image
    assert records(max_studies=2) == [PA1, LAT1, AP2]
    assert records(max_studies=2, frontal_only=True) == [PA1, AP2]
    assert records(max_studies=50) == records()


def test_the_spec_reaches_frontal_only_max_studies_and_resplits_by_patient(tmp_path):
    spec = spec_for(format="mimic_cxr", source=str(MIMIC), frontal_only=True, max_studies=3, resplit=True)
    items = list(source_items(spec))
    records = [i for i in items if isinstance(i, Record)]
    assert [r.id for r in records] == [PA1, AP2, AP3]  # LAT1 is lateral
    assert all(r.split == "" for r in records)  # the official split is dropped…
    assert any(isinstance(i, Skipped) for i in items)  # …and skipped rows still reach the manifest
    official = [r.split for r in read_dataset("mimic_cxr", str(MIMIC), ReaderOptions(frontal_only=True, max_studies=3))
                if isinstance(r, Record)]
    assert official == ["train", "train", "val"]


def test_a_resplit_never_puts_one_patient_in_two_splits(tmp_path):
    """Two patients, several images each: whatever the fractions, a patient's images share one split."""
    from medvl.data.prepare import without_splits
    from medvl.data.synthetic import synthetic_records

    images = [r for r in synthetic_records(40, seed=0, image_size=32, task="caption") if isinstance(r, Record)]
    for i, record in enumerate(images):
        record.group_id, record.split = f"patient{i % 8}", "train"  # the dataset said: all train
    manifest = write_shards(without_splits(iter(images)), str(tmp_path / "shards"), source="s", format="synthetic",
                            split_fractions=[0.5, 0.25, 0.25], records_per_shard=100)
    assert sum(manifest["counts"].values()) == 40
    assert manifest["counts"]["train"] < 40 and sum(manifest["groups"].values()) == 8  # re-split, 8 patients once


@pytest.mark.parametrize("data, message", [
    ({"format": "vqa_rad", "source": "x", "modalities": ["ct"]},
     "data.modalities: expected it unset with data.format vqa_rad (only rocov2 reads it), got ['ct']"),
    ({"format": "rocov2", "source": "x", "modalities": ["cr"]}, "data.modalities[0]: expected one of 'ct', 'mri'"),
    ({"format": "rocov2", "source": "x", "frontal_only": True},
     "data.frontal_only: expected it unset with data.format rocov2 (only mimic_cxr reads it), got True"),
    ({"format": "iu_xray", "source": "x", "max_studies": 10}, "data.max_studies: expected it unset"),
    ({"format": "mimic_cxr", "source": "x", "max_studies": -1}, "data.max_studies: expected a number ≥ 0, got -1"),
    ({"format": "mimic_cxr", "source": "x", "resplit": "yes"}, 'data.resplit: expected true or false, got "yes"'),
    ({"format": "shards", "resplit": True}, "data.resplit: expected false with data.format shards"),
])
def test_dataset_options_are_refused_where_no_reader_reads_them(data, message):
    with pytest.raises(SpecError) as info:
        spec_for(**data)
    assert str(info.value).startswith(message), str(info.value)


def test_synthetic_data_stands_in_for_any_dataset_and_ignores_its_filters():
    spec = spec_for(format="synthetic", modalities=["ct"], frontal_only=True, max_studies=5, synthetic_images=8)
    assert len([i for i in source_items(spec) if isinstance(i, Record)]) == 8
