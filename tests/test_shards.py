"""Shards round-trip with their manifest; bad rows are skipped and counted; splits never leak patients."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from medvl.data.images import encode_png
from medvl.data.records import Record, Skipped
from medvl.data.shards import LeakageError, ShardWriter, assign_split, read_manifest, write_shards
from medvl.data.storage import filesystem_for

from PIL import Image


def png(value: int = 128) -> bytes:
    return encode_png(Image.new("L", (16, 16), value))


def records(n: int, patients: int) -> list[Record]:
    return [Record(id=f"r{i}", group_id=f"p{i % patients}", image=png(i % 255), text=f"report {i}") for i in range(n)]


def test_round_trip_matches_manifest(tmp_path: Path):
    items = [*records(50, 20), Skipped("x1", "missing_image"), Skipped("x2", "missing_image"),
             Record(id="bad", group_id="p0", image=b"\xff\xd8 not a jpeg", text="t"),
             Record(id="empty", group_id="p0", image=png(), text="  ")]
    manifest = write_shards(items, str(tmp_path), source="mem", format="test", records_per_shard=8)
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == read_manifest(str(tmp_path))
    assert on_disk["skipped"] == {"empty_target": 1, "missing_image": 2, "unreadable_image": 1}
    assert sum(on_disk["counts"].values()) == 50
    rows_per_split: dict[str, list[str]] = {}
    for shard in on_disk["shards"]:
        table = pq.read_table(tmp_path / shard["path"])
        assert table.num_rows == shard["rows"] <= 8
        assert set(table.column("split").to_pylist()) == {shard["split"]}
        rows_per_split.setdefault(shard["split"], []).extend(table.column("id").to_pylist())
    assert {s: len(ids) for s, ids in rows_per_split.items()} == {s: c for s, c in on_disk["counts"].items() if c}
    assert sorted(sum(rows_per_split.values(), [])) == sorted(f"r{i}" for i in range(50))
    assert manifest["counts"] == on_disk["counts"]


def test_split_is_grouped_by_patient_and_deterministic(tmp_path: Path):
    manifest = write_shards(records(300, 60), str(tmp_path), source="mem", format="test")
    split_of_patient: dict[str, set[str]] = {}
    for shard in manifest["shards"]:
        table = pq.read_table(tmp_path / shard["path"], columns=["group_id", "split"])
        for group, split in zip(table.column("group_id").to_pylist(), table.column("split").to_pylist()):
            split_of_patient.setdefault(group, set()).add(split)
    assert all(len(splits) == 1 for splits in split_of_patient.values())
    assert manifest["groups"]["train"] > manifest["groups"]["val"] > 0
    assert assign_split("p7", 0, [0.8, 0.1, 0.1]) == assign_split("p7", 0, [0.8, 0.1, 0.1])


def test_a_leaking_official_split_is_refused(tmp_path: Path):
    leaking = [Record(id="a", group_id="p1", image=png(), text="t", split="train"),
               Record(id="b", group_id="p1", image=png(), text="t", split="test")]
    with pytest.raises(LeakageError, match="p1"):
        write_shards(leaking, str(tmp_path), source="mem", format="test")
    assert not (tmp_path / "manifest.json").exists()


def test_rerun_after_a_crash_gives_the_same_manifest(tmp_path: Path):
    clean = write_shards(records(100, 30), str(tmp_path / "clean"), source="mem", format="test", records_per_shard=10)

    def crashing():
        for i, record in enumerate(records(100, 30)):
            if i == 60:
                raise KeyboardInterrupt("simulated crash")
            yield record

    with pytest.raises(KeyboardInterrupt):
        write_shards(crashing(), str(tmp_path / "resumed"), source="mem", format="test", records_per_shard=10)
    assert not (tmp_path / "resumed" / "manifest.json").exists()  # nothing visible yet
    written_before = {p.name for p in (tmp_path / "resumed").glob("*.parquet")}
    assert written_before and not list((tmp_path / "resumed").glob("*.tmp-*"))
    resumed = write_shards(records(100, 30), str(tmp_path / "resumed"), source="mem", format="test", records_per_shard=10)
    assert resumed["_reused_shards"] == len(written_before)
    assert read_manifest(str(tmp_path / "resumed")) == read_manifest(str(tmp_path / "clean"))
    assert clean["_reused_shards"] == 0


@pytest.mark.slow
def test_corrupt_image_in_a_shard_is_skipped_and_counted_while_streaming(tmp_path: Path, ray_local):
    from medvl.data.pipeline import preprocessed, read_split
    from medvl.data.skips import skipped_counts
    from medvl.models.blip_common import BlipPreprocessor, save_tiny_blip
    from transformers import BlipForConditionalGeneration

    # Written with the low-level writer: prepare itself would have rejected the corrupt row.
    fs, root = filesystem_for(str(tmp_path / "shards"))
    writer = ShardWriter(fs, root, records_per_shard=100)
    good = records(9, 3)
    for record in good:
        record.split = "train"
        writer.add(record)
    writer.add(Record(id="corrupt", group_id="p0", image=png()[:40], text="t", split="train"))
    writer.close()
    (tmp_path / "shards" / "manifest.json").write_text(json.dumps({"counts": {"train": 10}, "shards": writer.shards}))

    model_dir = save_tiny_blip(BlipForConditionalGeneration, tmp_path, ["report one", "report two"], image_size=32)
    before = skipped_counts().get("unreadable_image", 0)
    factory = lambda: BlipPreprocessor(model_dir, image_size=32, max_text_length=16)  # noqa: E731
    rows = preprocessed(read_split(str(tmp_path / "shards"), "train"), factory).take_all()
    assert sorted(r["id"] for r in rows) == sorted(r.id for r in good)
    assert rows[0]["pixel_values"].shape == (3, 32, 32)
    assert skipped_counts().get("unreadable_image", 0) - before == 1


@pytest.mark.slow
def test_skip_counter_created_inside_a_trial_outlives_the_trial(ray_local):
    """A search's first trial may create the counter from inside its placement group; later trials count into
    the same counter after that trial (and its placement group) is gone."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from medvl.data.skips import COUNTER_NAME, report_skipped, skipped_counts

    try:
        ray.kill(ray.get_actor(COUNTER_NAME, namespace="medvl"))  # start from no counter, as a fresh cluster does
    except ValueError:
        pass

    @ray.remote(num_cpus=0.01)
    class Trial:
        def count_one(self) -> None:
            report_skipped("unreadable_image", 0)  # nothing to count into yet
            skipped_counts()  # creates the counter, as the train stage inside a trial does
            report_skipped("unreadable_image", 1)

    group = placement_group([{"CPU": 0.01}])
    ray.get(group.ready())
    strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
    trial = Trial.options(scheduling_strategy=strategy).remote()
    ray.get(trial.count_one.remote())
    ray.kill(trial)
    remove_placement_group(group)
    time.sleep(1)
    report_skipped("unreadable_image", 2)  # a later trial
    assert skipped_counts()["unreadable_image"] == 3
