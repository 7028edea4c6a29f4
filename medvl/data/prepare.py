"""The prepare stage: a dataset in its published layout (or the synthetic generator) → shards + manifest."""
from __future__ import annotations

import dataclasses
from typing import Iterator

from medvl.data.records import ReaderItem, Record
from medvl.data.shards import write_shards
from medvl.spec import FORMAT_OPTIONS, DataSpec, JobSpec


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
        progress=lambda n: print(f"[medvl prepare] {n} source rows read", flush=True) if n % 5000 == 0 else None,
    )
    print(f"[medvl prepare] counts {manifest['counts']}, skipped {manifest['skipped'] or 'none'}, "
          f"{len(manifest['shards'])} shards", flush=True)
    return manifest
