"""Model folders on object storage, loaded from a local copy: fetched once per process's machine, reused after.

``from_pretrained`` and peft read local folders (or hub ids). A model whose folder is a URL (``s3://…``: an
``output_dir`` on object storage, ``serve.checkpoint``, ``medvl eval --model``) is downloaded into a local cache
and loaded from there. Every place that loads a model (Train workers, eval actors, Serve replicas, the driver
consolidating ZeRO shards) goes through :func:`local_model`; a local path or hub id passes through unchanged.

Cache entries are named by the URL and a fingerprint of the folder's listing (file names, sizes, modification
times), so a retrained model at the same URL is fetched again while a replica restarting on the same node is
not. An entry is filled in a temporary sibling and renamed into place, so concurrent loaders on one machine
never see half a folder. The cache is ``$MEDVL_CACHE_DIR``, else ``~/.cache/medvl/models``.

Saved folders can name another model folder: a peft adapter its base (``base_model_name_or_path``), a soft-prompt
model its base LM (``base_lm``). When that reference is a URL the referenced folder is fetched too and the
cached copy points at it. The other way round, a model trained from a cached copy names that copy's local path
in what it saves: :func:`portable_references` puts the URL back before an export leaves the machine. Cache
entry paths therefore carry their URL: ``<cache>/@<fingerprint>/<scheme>/<bucket>/<key>``.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from medvl.data.preprocessing import FolderPreprocessor
from medvl.storage import Location, is_remote

if TYPE_CHECKING:
    from medvl.models.base import Recipe

CACHE_VARIABLE = "MEDVL_CACHE_DIR"
#: Files of a saved model that name another model folder, and the key that names it.
REFERENCES = (("adapter_config.json", "base_model_name_or_path"), ("medvl_softprompt.json", "base_lm"))
_ENTRY = re.compile(r"^@[0-9a-f]{16}$")


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_VARIABLE) or Path.home() / ".cache" / "medvl" / "models")


def local_model(location: str, endpoint_url: str = "", filesystem=None) -> str:
    """A local folder holding the model ``location`` names: itself when it is local (or a hub id), else the
    cached copy of the URL's folder, fetched now if it is not cached yet.

    ``filesystem``: the one :func:`model_filesystem` built on the driver (it carries the driver's endpoint and
    keys to workers whose environment lacks them); None builds one from this process's environment.
    """
    if not is_remote(location):
        return location
    remote = Location.of(location, endpoint_url)
    if filesystem is not None:
        remote = Location(remote.url, filesystem, remote.path)
    entry = cache_root() / f"@{_fingerprint(remote)}" / _url_path(location)
    if not entry.is_dir():
        _fill(entry, remote, endpoint_url, filesystem)
    return str(entry)


def model_filesystem(location: str, endpoint_url: str = ""):
    """The filesystem of a model URL, built here to travel to Ray workers (None for a local folder or hub id)."""
    return Location.of(location, endpoint_url).fs if is_remote(location) else None


def _url_path(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}/{rest.strip('/')}"


def _fingerprint(remote: Location) -> str:
    import pyarrow.fs as pafs

    infos = remote.fs.get_file_info(pafs.FileSelector(remote.path, recursive=True, allow_not_found=True))
    listing = sorted((info.path, info.size, str(info.mtime)) for info in infos if info.type == pafs.FileType.File)
    if not listing:
        raise FileNotFoundError(f"{remote}: no model folder there (nothing under that prefix)")
    return hashlib.sha256(json.dumps([remote.url, listing]).encode()).hexdigest()[:16]


def _fill(entry: Path, remote: Location, endpoint_url: str, filesystem) -> None:
    entry.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        remote.download(staging)
        _localize_references(staging, endpoint_url, filesystem, remote.url.split("://")[0])
        try:
            staging.rename(entry)
        except OSError:  # another loader on this machine finished first: its copy is the same files
            if not entry.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _reference_files(folder: Path):
    for name, key in REFERENCES:
        for path in folder.rglob(name):
            yield path, key


def _localize_references(folder: Path, endpoint_url: str, filesystem, scheme: str) -> None:
    """Point the copy's references to other model folders on object storage at their cached copies."""
    for path, key in _reference_files(folder):
        record = json.loads(path.read_text())
        if is_remote(str(record.get(key) or "")):
            same_store = record[key].split("://")[0] == scheme  # the filesystem that reached this folder
            record[key] = local_model(record[key], endpoint_url, filesystem if same_store else None)
            path.write_text(json.dumps(record, indent=2))


def remote_name(path: str) -> str | None:
    """The URL a cached copy's path stands for (whatever machine's cache it is in); None for any other path."""
    parts = Path(path).parts
    for i, part in enumerate(parts):
        if _ENTRY.match(part) and len(parts) > i + 2:
            return f"{parts[i + 1]}://{'/'.join(parts[i + 2:])}"
    return None


def portable_references(folder: Path, moved: tuple[str, str] | None = None) -> None:
    """Replace references to cached copies (local paths of the machine that trained) by their URLs, and with
    ``moved=(local prefix, URL prefix)`` references into a folder about to be uploaded by their URLs there."""
    for path, key in _reference_files(folder):
        record = json.loads(path.read_text())
        value = str(record.get(key) or "")
        url = remote_name(value)
        if moved and (value == moved[0] or value.startswith(moved[0].rstrip("/") + "/")):
            url = moved[1].rstrip("/") + value[len(moved[0].rstrip("/")):]
        if url:
            record[key] = url
            path.write_text(json.dumps(record, indent=2))


# --------------------------------------------------------------------------------------------- writing models


@contextmanager
def publishing(target: Location) -> Iterator[Path]:
    """A local folder to write a model folder into; on a clean exit it replaces ``target``: renamed into place on
    a local disk (readers see the old folder or the new one), uploaded to object storage. References to cached
    copies become URLs again (:func:`portable_references`)."""
    if target.is_local:
        staging = Path(target.path + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.parent.mkdir(parents=True, exist_ok=True)
        try:
            yield staging
            portable_references(staging)
            shutil.rmtree(target.path, ignore_errors=True)
            staging.rename(target.path)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return
    with tempfile.TemporaryDirectory(prefix="medvl-export-") as tmp:
        staging = Path(tmp) / (target.name or "model")
        yield staging
        portable_references(staging)
        target.upload(staging)


def initial_model_in(recipe: Recipe, work_dir: Location, texts: Callable[[], Iterable[str]]) -> str:
    """``recipe.initial_model`` for a work folder on any filesystem: a model it builds (a preset) is built in a
    local temporary folder and uploaded below ``work_dir`` when that is on object storage."""
    if work_dir.is_local:
        return recipe.initial_model(Path(work_dir.path), texts)
    with tempfile.TemporaryDirectory(prefix="medvl-initial-") as tmp:
        source = recipe.initial_model(Path(tmp), texts)
        if not source.startswith(tmp):  # a hub id or an existing folder: nothing was built
            return source
        target = work_dir / os.path.relpath(source, tmp)
        portable_references(Path(source), moved=(tmp, str(work_dir)))
        target.upload(source)
        return str(target)


def preprocessor_for(recipe: Recipe, model_source: str, filesystem=None):
    """``recipe.preprocessor`` of a model anywhere (picklable with functools.partial, called on Ray Data actors);
    ``filesystem``: see :func:`local_model`."""
    return recipe.preprocessor(local_model(model_source, recipe.spec.data.endpoint_url, filesystem))


def folder_preprocessor(model_source: str, endpoint_url: str, filesystem, **settings) -> FolderPreprocessor:
    """A :class:`FolderPreprocessor` of a model anywhere: what a recipe's torch-free ``preprocessor_factory``
    builds on a Ray Data actor (this module imports neither torch nor the recipes)."""
    return FolderPreprocessor(local_model(model_source, endpoint_url, filesystem), **settings)
