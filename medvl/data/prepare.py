"""The prepare stage: a dataset in its published layout (or the synthetic generator) → shards + manifest."""
from __future__ import annotations

from typing import Iterator

from medvl.data.fingerprint import prepare_inputs
from medvl.data.leakage import describe_overlap
from medvl.data.records import ReaderItem
from medvl.data.shards import write_shards
from medvl.spec import JobSpec

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

    return read_dataset(data.format, data.source, ReaderOptions(language=data.language))


def run_prepare_stage(spec: JobSpec) -> dict:
    if spec.data.format == "shards":
        print(f"[medvl prepare] data.format is 'shards': using {spec.shards_location} as it is", flush=True)
        from medvl.data.shards import read_manifest

        return read_manifest(spec.shards_location, spec.data.endpoint_url)
    location = spec.shards_location
    print(f"[medvl prepare] {spec.data.format} → {location}", flush=True)
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
        progress=lambda n: print(f"[medvl prepare] {n} source rows read", flush=True) if n % 5000 == 0 else None,
        log=lambda message: print(f"[medvl prepare] {message}", flush=True),
    )
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
