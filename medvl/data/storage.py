"""One way to reach a shard location, local folder or ``s3://bucket/prefix``: a pyarrow filesystem.

pyarrow's filesystems are what Ray Data's ``read_parquet`` takes, so prepare, training and eval all go
through the same object. S3-compatible stores (MinIO, moto, Ceph) are reached with ``endpoint_url`` from
the spec, or the standard ``AWS_ENDPOINT_URL`` environment variable; credentials come from the usual AWS
environment variables / config files.

The filesystem is built on the driver and pickled to Ray's workers (read tasks, Train workers uploading
checkpoints), whose environment was fixed when Ray started and may lack what the driver sees. So whatever
the driver resolves from its environment (endpoint, region, static keys) is set on the filesystem
explicitly and travels with it. The trade-off: keys ride inside Ray task arguments, and a session token is
frozen at driver time (it can expire during a long job: prefer instance roles on the workers for those).
Without keys in the environment, each process uses its own default chain (instance role, config files).
"""
from __future__ import annotations

import os
from urllib.parse import urlparse

import pyarrow.fs as pafs


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def filesystem_for(location: str, endpoint_url: str = "") -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local folder or an ``s3://`` URL."""
    if not is_s3(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    parsed = urlparse(location)
    endpoint = endpoint_url or os.environ.get("AWS_ENDPOINT_URL", "")
    kwargs: dict = {}
    if endpoint:
        scheme, _, _ = endpoint.partition("://")
        kwargs = {"endpoint_override": endpoint, "scheme": scheme or "https"}
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs, **_environment_keys()), f"{parsed.netloc}{parsed.path}".rstrip("/")


def _environment_keys() -> dict:
    """Static keys from the driver's environment, to be set on the filesystem (see the module docstring)."""
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if not (key and secret):
        return {}
    keys = {"access_key": key, "secret_key": secret}
    if os.environ.get("AWS_SESSION_TOKEN"):
        keys["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return keys


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write so that readers see either nothing or the whole file.

    An S3 PUT is atomic by itself; on a local disk we write a temporary sibling and rename it.
    """
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{os.getpid()}"
        with fs.open_output_stream(tmp) as stream:
            stream.write(data)
        os.replace(tmp, path)
    else:
        with fs.open_output_stream(path) as stream:
            stream.write(data)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type == pafs.FileType.File
