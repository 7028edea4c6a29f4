"""The prepare stage: a dataset in its published layout (or the synthetic generator) → shards + manifest."""
from __future__ import annotations

import dataclasses
import time
from typing import Iterator

from medvl.data.fingerprint import prepare_inputs
from medvl.data.leakage import describe_overlap
from medvl.data.records import ReaderItem, Record
from medvl.data.shards import write_shards
from medvl.spec import FORMAT_OPTIONS, DataSpec, JobSpec
from medvl.tracking.progress import Progress

# A skip reason taking more than this share of a dataset's rows is printed as a warning, not only counted.
WARN_SKIPPED_SHARE = 0.05


def source_items(spec: JobSpec) -> Iterator[ReaderItem]:
    data = spec.data
    if data.format == "synthetic":
        from medvl.data.synthetic import synthetic_records

        return synthetic_records(
            data.synthetic_images, seed=data.seed, image_size=data.synthetic_image_size, task=data.task
        )
    from medvl.data.readers import ReaderOptions, read_dataset

    options = ReaderOptions(language=data.language, frontal_only=data.frontal_only,
                            modalities=tuple(data.modalities), max_studies=data.max_studies)
    items = read_dataset(data.format, data.source, options)
    return without_splits(items) if data.resplit else items


def without_splits(items: Iterator[ReaderItem]) -> Iterator[ReaderItem]:
    """``data.resplit``: records lose the dataset's split, so prepare assigns one by group_id (the patient, where
    the dataset has one) with data.split_fractions, as for data that ships none."""
    for item in items:
        yield dataclasses.replace(item, split="") if isinstance(item, Record) else item


def run_prepare_stage(spec: JobSpec) -> dict:
    if spec.data.format == "shards":
        print(f"[medvl prepare] data.format is 'shards': using {spec.shards_location} as it is", flush=True)
        from medvl.data.shards import read_manifest

        return read_manifest(spec.shards_location, spec.data.endpoint_url)
    location = spec.shards_location
    print(f"[medvl prepare] {spec.data.format} → {location}", flush=True)
    # Only synthetic captions know their row count up front (synthetic VQA asks 4-6 questions an image; readers
    # of published datasets find out as they read).
    total = spec.data.synthetic_images if spec.data.format == "synthetic" and spec.data.task == "caption" else None
    progress = Progress("prepare", total=total, unit="rows", every_s=spec.tracking.progress_every_s)
    ignored = [name for name in FORMAT_OPTIONS if getattr(spec.data, name) != getattr(DataSpec(), name)]
    if spec.data.format == "synthetic" and ignored:
        print(f"[medvl prepare] synthetic data ignores data.{', data.'.join(ignored)} (dataset filters)", flush=True)
    manifest = write_shards(
        source_items(spec),
        location,
        source=spec.data.source or "synthetic",
        format=spec.data.format,
        seed=spec.data.seed,
        split_fractions=spec.data.split_fractions,
        records_per_shard=spec.data.records_per_shard,
        endpoint_url=spec.data.endpoint_url,
        leakage_check=spec.data.leakage_check,
        inputs=prepare_inputs(spec.data),
        progress=lambda rows, skipped: progress.update(
            rows, skipped=skipped, **{"rows/s": round(rows / max(1e-9, time.monotonic() - progress.started), 1)}),
        log=lambda message: print(f"[medvl prepare] {message}", flush=True),
    )
    skipped = sum(manifest["skipped"].values())
    progress.update(sum(manifest["counts"].values()) + skipped + sum(manifest["filtered"].values()), skipped=skipped)
    progress.close()
    print(f"[medvl prepare] counts {manifest['counts']}, skipped {manifest['skipped'] or 'none'}, "
          f"filtered {manifest['filtered'] or 'none'}, repaired {manifest['repaired'] or 'none'}, "
          f"{len(manifest['shards'])} shards ({manifest['_reused_shards']} kept from an interrupted run)", flush=True)
    for line in warnings(manifest):
        print(f"[medvl prepare] warning: {line}", flush=True)
    if manifest["leakage"]["groups"]:
        print(f"[medvl prepare] data.leakage_check: report: {describe_overlap(manifest['leakage'])} "
              "(recorded in the manifest under \"leakage\")", flush=True)
    return manifest


def warnings(manifest: dict) -> list[str]:
    """A line per skip reason that took more than WARN_SKIPPED_SHARE of the rows read."""
    rows = sum(manifest["counts"].values()) + sum(manifest["skipped"].values()) + sum(manifest["filtered"].values())
    return [f"{n:,} of {rows:,} rows ({n / rows:.0%}) were skipped as {reason}"
            for reason, n in manifest["skipped"].items() if rows and n > WARN_SKIPPED_SHARE * rows]
