"""``medvl prepare`` on real-world copies of the datasets: the official VQA-RAD split (shared images), IU X-ray
annotation files with a broken split key, reruns on changed inputs, paths out of the dataset folder, undecodable
text and filtered rows. Each gets a clear outcome, nothing lost silently, nothing silently reused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medvl.data.leakage import LeakageError
from medvl.data.prepare import run_prepare_stage
from medvl.data.readers import ReaderOptions, read_dataset
from medvl.data.records import Record, Repaired, Skipped
from medvl.data.shards import assign_split
from medvl.spec import parse_spec

FIXTURES = Path(__file__).parent / "fixtures"
ROOT = Path(__file__).resolve().parents[1]


def prepare_spec(tmp_path: Path, format: str, source: Path | str, **data):
    return parse_spec({"name": "p", "output_dir": str(tmp_path / "run"), "stages": ["prepare"],
                       "data": {"format": format, "source": str(source), "records_per_shard": 4, **data}})


def official_vqa_rad(tmp_path: Path) -> Path:
    """The fixture's trainset.json + images with the official test file's layout beside them."""
    root = tmp_path / "vqa_rad"
    shutil.copytree(FIXTURES / "vqa_rad", root)
    shutil.copy(FIXTURES / "vqa_rad_testset/testset.json", root / "testset.json")
    return root


def shard_rows(location: Path, manifest: dict) -> list[dict]:
    rows = []
    for shard in manifest["shards"]:
        table = pq.read_table(location / shard["path"], columns=["id", "group_id", "split"])
        assert table.num_rows == shard["rows"], shard  # the manifest's count is the file's
        rows += table.to_pylist()
    return rows


# --------------------------------------------------------------------------------------- 1. official split


def test_the_official_vqa_rad_split_prepares_with_report_and_the_overlap_is_in_the_manifest(tmp_path, capsys):
    spec = prepare_spec(tmp_path, "vqa_rad", official_vqa_rad(tmp_path), leakage_check="report",
                        split_fractions=[0.5, 0.5, 0.0])
    manifest = run_prepare_stage(spec)
    rows = shard_rows(Path(spec.shards_location), manifest)
    test_ids = {row["id"] for row in rows if row["split"] == "test"}
    assert test_ids == {"9001", "9002", "9003"}  # the official test questions, all of them, and only them
    assert {row["split"] for row in rows if row["id"] not in test_ids} <= {"train", "val"}  # validation carved
    overlap = manifest["leakage"]
    assert overlap["check"] == "report" and overlap["groups"] == 2  # both test images are training images
    rows_per_pair = {name: pair["rows"] for name, pair in overlap["pairs"].items()}
    shared = {"synpic35191.jpg", "synpic45162.jpg"}
    for name, counts in rows_per_pair.items():
        first, second = name.split("/")
        assert counts[second] == sum(1 for row in rows if row["split"] == second and row["group_id"] in shared
                                     and any(r["group_id"] == row["group_id"] and r["split"] == first for r in rows))
    assert sum(pair["groups"] for name, pair in overlap["pairs"].items() if name.endswith("/test")) == 2
    assert json.loads((Path(spec.shards_location) / "manifest.json").read_text())["leakage"] == overlap
    out = capsys.readouterr().out
    assert "data.leakage_check: report: 2 groups are in more than one split" in out


def test_without_report_the_official_split_is_refused_naming_the_option(tmp_path):
    spec = prepare_spec(tmp_path, "vqa_rad", official_vqa_rad(tmp_path))
    with pytest.raises(LeakageError, match=r"synpic\d+\.jpg.*set data\.leakage_check: report"):
        run_prepare_stage(spec)
    assert not (Path(spec.shards_location) / "manifest.json").exists()


def test_the_vqa_rad_job_keeps_the_official_split_when_the_test_file_is_there():
    from medvl.spec import load_spec

    assert load_spec(ROOT / "jobs/vqarad_blip_dapt.yaml").data.leakage_check == "report"


@pytest.mark.slow
def test_medvl_prepare_of_the_official_split_on_the_command_line(tmp_path):
    """The acceptance run: `medvl prepare` succeeds with report (overlap in the manifest) and refuses without it."""
    source = official_vqa_rad(tmp_path)
    spec = tmp_path / "job.yaml"
    spec.write_text(json.dumps({"name": "vqarad", "output_dir": str(tmp_path / "run"), "stages": ["prepare"],
                                "ray": {"num_cpus": 1},
                                "data": {"format": "vqa_rad", "source": str(source), "task": "vqa"}}))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)

    def prepare(*overrides: str) -> subprocess.CompletedProcess:
        command = [sys.executable, "-m", "medvl.cli", "prepare", str(spec), *[w for o in overrides for w in ("--set", o)]]
        return subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)

    refused = prepare()
    assert refused.returncode != 0 and "data.leakage_check: report" in refused.stderr, refused.stderr[-2000:]
    done = prepare("data.leakage_check=report")
    assert done.returncode == 0, done.stderr[-3000:]
    manifest = json.loads((tmp_path / "run/shards/manifest.json").read_text())
    assert manifest["counts"]["test"] == 3 and manifest["leakage"]["groups"] == 2
    assert "2 groups are in more than one split" in done.stdout


# --------------------------------------------------------------------------------------- 2. IU X-ray split keys


def iu_xray_with_split_key(tmp_path: Path, bad_key: str) -> Path:
    root = tmp_path / "iu_xray"
    shutil.copytree(FIXTURES / "iu_xray_r2gen", root)
    annotation = json.loads((root / "annotation.json").read_text())
    annotation[bad_key] = annotation.pop("test")
    (root / "annotation.json").write_text(json.dumps(annotation))
    return root


@pytest.mark.parametrize("bad_key", ["", "tset"])
def test_iu_xray_studies_under_a_key_that_is_no_split_keep_their_own_split(tmp_path, bad_key):
    items = list(read_dataset("iu_xray", str(iu_xray_with_split_key(tmp_path, bad_key))))
    test = [item for item in items if isinstance(item, Record) and item.split == "test"]
    assert [record.id for record in test] == ["CXR1451_IM-0291_0"]
    assert not any(isinstance(item, Skipped) and item.id.startswith("CXR1451") for item in items)


def test_a_skip_reason_over_five_percent_is_printed_as_a_warning(tmp_path, capsys):
    root = tmp_path / "iu_xray"
    shutil.copytree(FIXTURES / "iu_xray_r2gen", root)
    annotation = json.loads((root / "annotation.json").read_text())
    for study in annotation["val"]:
        study["split"] = "nonsense"
    annotation["validation-set"] = annotation.pop("val")  # neither key nor study says which split
    (root / "annotation.json").write_text(json.dumps(annotation))
    manifest = run_prepare_stage(prepare_spec(tmp_path, "iu_xray", root))
    assert manifest["skipped"]["malformed_row"] == 2
    out = capsys.readouterr().out
    warnings = [line for line in out.splitlines() if "warning:" in line]
    # 6 rows: 2 records, 4 skips (a study whose split is unknown is one malformed row, whatever its images)
    assert "[medvl prepare] warning: 2 of 6 rows (33%) were skipped as malformed_row" in warnings, out
    assert len(warnings) == 3  # the tiny fixture's missing and empty rows are over 5 % too


def test_no_warning_below_five_percent():
    from medvl.data.prepare import warnings

    manifest = {"counts": {"train": 96, "val": 0, "test": 0}, "skipped": {"missing_image": 4},
                "filtered": {"other_language": 100}}
    assert warnings(manifest) == []  # 4 of 200 rows: 2 %
    manifest["skipped"]["missing_image"] = 12
    assert warnings(manifest) == ["12 of 208 rows (6%) were skipped as missing_image"]


# --------------------------------------------------------------------------------------- 3. reruns


def test_a_rerun_with_another_seed_rebuilds_and_says_why(tmp_path, capsys):
    spec = prepare_spec(tmp_path, "synthetic", "", synthetic_images=40, synthetic_image_size=32, seed=0)
    first = run_prepare_stage(spec)
    capsys.readouterr()
    again = run_prepare_stage(spec)  # same inputs: every shard kept
    assert again["_reused_shards"] == len(first["shards"]) and again["counts"] == first["counts"]
    assert "same inputs" in capsys.readouterr().out

    reseeded = parse_spec({**json.loads(json.dumps(_raw(spec))), "data": {**_raw(spec)["data"], "seed": 1}})
    second = run_prepare_stage(reseeded)
    out = capsys.readouterr().out
    assert "rebuilding" in out and "settings.seed 0 → 1" in out
    assert second["_reused_shards"] == 0 and "warning" not in out
    location = Path(spec.shards_location)
    rows = shard_rows(location, second)  # every shard holds what the manifest says
    assert sorted(p.name for p in location.glob("*.parquet")) == sorted(s["path"] for s in second["shards"])
    assert len(rows) == sum(second["counts"].values()) == 40
    assert all(row["split"] == assign_split(row["group_id"], 1, [0.8, 0.1, 0.1]) for row in rows)  # seed 1's
    assert any(row["split"] != assign_split(row["group_id"], 0, [0.8, 0.1, 0.1]) for row in rows)


def _raw(spec) -> dict:
    import dataclasses

    return dataclasses.asdict(spec)


def test_a_rerun_on_changed_source_files_rebuilds(tmp_path, capsys):
    source = tmp_path / "vqa_rad"
    shutil.copytree(FIXTURES / "vqa_rad", source)
    spec = prepare_spec(tmp_path, "vqa_rad", source)
    first = run_prepare_stage(spec)
    rows = json.loads((source / "trainset.json").read_text())
    rows[0]["answer"] = "Definitely"
    (source / "trainset.json").write_text(json.dumps(rows))
    capsys.readouterr()
    second = run_prepare_stage(spec)
    assert "rebuilding" in capsys.readouterr().out and second["_reused_shards"] == 0
    answers = []
    for shard in second["shards"]:
        answers += pq.read_table(Path(spec.shards_location) / shard["path"], columns=["answer"]).column(0).to_pylist()
    assert "Definitely" in answers and first["inputs"]["source"] != second["inputs"]["source"]


def test_shards_of_unknown_origin_are_rebuilt_not_kept(tmp_path, capsys):
    from medvl.data.shards import write_shards

    spec = prepare_spec(tmp_path, "synthetic", "", synthetic_images=20, synthetic_image_size=32)
    location = Path(spec.shards_location)
    write_shards([], str(location), source="x", format="test")  # an empty manifest from elsewhere
    (location / "train-00000.parquet").write_bytes(b"not this run's")
    manifest = run_prepare_stage(spec)
    assert "no record of the inputs" in capsys.readouterr().out and manifest["_reused_shards"] == 0
    shard_rows(location, manifest)


# --------------------------------------------------------------------------------------- 4. paths, text, filters


def slake_with(tmp_path: Path, rows: list[dict], raw: bytes | None = None) -> Path:
    root = tmp_path / "slake"
    shutil.copytree(FIXTURES / "slake/imgs", root / "imgs")
    (root / "train.json").write_bytes(raw if raw is not None else json.dumps(rows).encode())
    return root


def qa(qid: int, image: str, question: str = "What is shown?", lang: str = "en") -> dict:
    return {"qid": qid, "img_name": image, "question": question, "answer": "CT", "answer_type": "OPEN",
            "q_lang": lang}


def test_paths_out_of_the_dataset_folder_are_refused_and_counted(tmp_path):
    secret = tmp_path / "secret.png"
    shutil.copy(FIXTURES / "slake/imgs/xmlab1/source.jpg", secret)
    root = slake_with(tmp_path, [])
    (root / "imgs/escape.jpg").symlink_to(secret)
    inside = root / "imgs/inside.jpg"
    inside.symlink_to(root / "imgs/xmlab1/source.jpg")  # a symlink within the tree is fine
    rows = [qa(1, "../../secret.png"), qa(2, str(secret)), qa(3, "escape.jpg"), qa(4, "inside.jpg"),
            qa(5, "xmlab1/source.jpg")]
    (root / "train.json").write_text(json.dumps(rows))
    items = list(read_dataset("slake", str(root)))
    assert [(i.id, i.reason) for i in items if isinstance(i, Skipped)] == [
        ("1", "path_outside_source"), ("2", "path_outside_source"), ("3", "path_outside_source")]
    assert [i.id for i in items if isinstance(i, Record)] == ["4", "5"]
    manifest = run_prepare_stage(prepare_spec(tmp_path, "slake", root, task="vqa"))
    assert manifest["skipped"] == {"path_outside_source": 3}


def test_undecodable_json_text_is_repaired_and_counted_not_fatal(tmp_path):
    good = json.dumps([qa(1, "xmlab1/source.jpg", "Which organ?"), qa(2, "xmlab1/source.jpg", "Is it CT?")]).encode()
    broken = good.replace(b"Which", b"Wh\xffich")  # one byte that is not UTF-8, inside one row
    root = slake_with(tmp_path, [], raw=broken)
    items = list(read_dataset("slake", str(root)))
    assert [item.id for item in items if isinstance(item, Repaired)] == ["1"]
    assert [item.question for item in items if isinstance(item, Record)] == ["Wh\ufffdich organ?", "Is it CT?"]
    manifest = run_prepare_stage(prepare_spec(tmp_path, "slake", root, task="vqa"))
    assert manifest["repaired"] == {"undecodable_text": 1} and sum(manifest["counts"].values()) == 2


def test_a_lone_surrogate_in_a_row_skips_that_row_only(tmp_path):
    raw = json.dumps([qa(1, "xmlab1/source.jpg", "Which organ?"), qa(2, "xmlab1/source.jpg", "x")])
    root = slake_with(tmp_path, [], raw=raw.replace('"x"', '"\\ud800?"').encode())
    manifest = run_prepare_stage(prepare_spec(tmp_path, "slake", root, task="vqa"))
    assert manifest["skipped"] == {"invalid_text": 1} and sum(manifest["counts"].values()) == 1


def test_rocov2_replaced_bytes_are_counted_as_repaired(tmp_path):
    root = tmp_path / "rocov2"
    shutil.copytree(FIXTURES / "rocov2", root)
    captions = (root / "train_captions.csv").read_bytes()
    lines = captions.splitlines(keepends=True)
    lines[1] = lines[1].replace(b",", b",\xfe", 1)  # the first caption gets a byte that is not UTF-8
    (root / "train_captions.csv").write_bytes(b"".join(lines))
    items = list(read_dataset("rocov2", str(root)))
    repaired = [item.id for item in items if isinstance(item, Repaired)]
    first_id = lines[1].split(b",")[0].decode()
    assert repaired == [first_id]


def test_rows_the_language_filter_drops_are_counted_as_filtered(tmp_path):
    rows = [qa(1, "xmlab1/source.jpg"), qa(2, "xmlab1/source.jpg", "这是什么?", lang="zh"),
            qa(3, "xmlab5/source.jpg")]
    root = slake_with(tmp_path, rows)
    manifest = run_prepare_stage(prepare_spec(tmp_path, "slake", root, task="vqa"))
    assert manifest["filtered"] == {"other_language": 1} and manifest["skipped"] == {}
    assert sum(manifest["counts"].values()) == 2
    assert read_dataset("slake", str(root), ReaderOptions(language="all"))
