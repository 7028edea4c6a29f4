"""Where medvl reads and writes: a local folder or any pyarrow filesystem URI (``s3://bucket/prefix``, ``gs://…``).

One way to reach a location, whatever it is: a pyarrow filesystem and a path inside it. pyarrow's filesystems
are what Ray Data's readers, Ray Train's ``storage_filesystem`` and Tune's take, so shards, checkpoints, the
search state and the run folder's own files (models, summaries, metrics) all go through the same object.
:class:`Location` wraps one file or folder with the few path operations the stages need (join, read, write,
list, delete), so a stage is written once for a local ``output_dir`` and an ``s3://`` one.

S3-compatible stores (MinIO, moto, Ceph) are reached with ``endpoint_url`` from the spec (``data.endpoint_url``)
or the standard ``AWS_ENDPOINT_URL`` environment variable; credentials come from the usual AWS environment
variables / config files.

The filesystem is built on the driver and pickled to Ray's workers (read tasks, Train workers uploading
checkpoints, Tune trials), whose environment was fixed when Ray started and may lack what the driver sees. So
whatever the driver resolves from its environment (endpoint, region, static keys) is set on the filesystem
explicitly and travels with it. The trade-off: keys ride inside Ray task arguments, and a session token is
frozen at driver time (it can expire during a long job: prefer instance roles on the workers for those).
Without keys in the environment, each process uses its own default chain (instance role, config files).

pyarrow is imported inside the functions: the spec layer imports this module, and ``medvl validate`` stays light.
"""
from __future__ import annotations

import fnmatch
import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

if TYPE_CHECKING:
    import pyarrow.fs as pafs


def is_remote(location: str) -> bool:
    """A URI of a filesystem other than this machine's (``file://`` URIs and plain paths are local)."""
    return "://" in location and not location.startswith("file://")


def is_s3(location: str) -> bool:
    return location.startswith("s3://")


def filesystem_for(location: str, endpoint_url: str = "") -> tuple[pafs.FileSystem, str]:
    """Return ``(filesystem, path inside it)`` for a local folder, an ``s3://`` URL or another pyarrow URI."""
    import pyarrow.fs as pafs

    if location.startswith("file://"):
        location = urlparse(location).path
    if not is_remote(location):
        return pafs.LocalFileSystem(), os.path.abspath(location)
    if not is_s3(location):
        fs, path = pafs.FileSystem.from_uri(location)
        return fs, path.rstrip("/")
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
    """``base`` and ``parts`` joined with ``/`` (for URLs and local paths alike)."""
    return "/".join([base.rstrip("/"), *parts])


def absolute(location: str) -> str:
    """A local path made absolute (Ray workers and Tune trials run in other directories); a URL as it is."""
    if location.startswith("file://"):
        location = urlparse(location).path
    return location.rstrip("/") if is_remote(location) else os.path.abspath(location)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes_atomic(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write so that readers see either nothing or the whole file.

    An object store's PUT is atomic by itself; on a local disk we write a temporary sibling and rename it.
    """
    import pyarrow.fs as pafs

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
    import pyarrow.fs as pafs

    return fs.get_file_info(path).type == pafs.FileType.File


# --------------------------------------------------------------------------------------------- Location


@dataclass(frozen=True)
class Location:
    """One file or folder, named as a user names it: an absolute local path or a URL (``str()`` gives that name).

    The operations are the few the stages need, the same on every filesystem. Object stores have no folders:
    ``mkdir`` does nothing there, a "folder" exists when an object lies under it, and writes are whole objects.
    Picklable (the filesystem carries its endpoint and keys), so a Location can travel to Ray tasks.
    """

    url: str
    fs: Any = field(compare=False, repr=False)  # pyarrow.fs.FileSystem
    path: str = field(compare=False, repr=False)  # the path inside ``fs``

    @classmethod
    def of(cls, location: str | os.PathLike, endpoint_url: str = "") -> Location:
        name = absolute(os.fspath(location))
        fs, path = filesystem_for(name, endpoint_url)
        return cls(name, fs, path)

    # ---- naming

    def __str__(self) -> str:
        return self.url

    def __fspath__(self) -> str:
        """Only a local location is a path of this machine; ``open(remote)`` fails here rather than writing a
        local folder named after the URL."""
        if not self.is_local:
            raise TypeError(f"{self.url} is not on this machine's filesystem")
        return self.path

    def __truediv__(self, name: str) -> Location:
        return Location(join(self.url, name), self.fs, join(self.path, name))

    @property
    def name(self) -> str:
        return posixpath.basename(self.url.rstrip("/"))

    @property
    def parent(self) -> Location:
        return Location(posixpath.dirname(self.url.rstrip("/")), self.fs, posixpath.dirname(self.path))

    @property
    def is_local(self) -> bool:
        return not is_remote(self.url)

    def relative_to(self, other: Location) -> str:
        """This location's path below ``other`` ('' for itself); ValueError when it is not below it."""
        if self.url == other.url:
            return ""
        prefix = other.url.rstrip("/") + "/"
        if not self.url.startswith(prefix):
            raise ValueError(f"{self.url} is not inside {other.url}")
        return self.url[len(prefix):]

    # ---- inspecting

    def _type(self):
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.Directory

    def modified(self) -> float:
        """The file's modification time (seconds since the epoch; 0.0 where the store keeps none)."""
        mtime = self.fs.get_file_info(self.path).mtime
        return mtime.timestamp() if mtime is not None else 0.0

    def iterdir(self) -> list[Location]:
        """The entries directly inside this folder (none when it does not exist), sorted by name."""
        import pyarrow.fs as pafs

        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))
        return sorted((self / posixpath.basename(info.path) for info in infos), key=lambda loc: loc.name)

    def glob(self, pattern: str) -> list[Location]:
        """Entries of this folder whose name matches ``pattern`` (one level, fnmatch rules)."""
        return [entry for entry in self.iterdir() if fnmatch.fnmatch(entry.name, pattern)]

    def files(self) -> list[str]:
        """Every file below this folder, as paths relative to it (sorted)."""
        import pyarrow.fs as pafs

        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=True))
        root = self.path.rstrip("/") + "/"
        return sorted(info.path[len(root):] for info in infos if info.type == pafs.FileType.File)

    # ---- reading and writing

    def read_bytes(self) -> bytes:
        return read_bytes(self.fs, self.path)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Replace the file as a whole (readers never see half of it); its folder is created as needed."""
        write_bytes_atomic(self.fs, self.path, data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        if self.is_local:
            os.makedirs(self.path, exist_ok=exist_ok)

    def unlink(self, missing_ok: bool = False) -> None:
        if missing_ok and not self.is_file():
            return
        self.fs.delete_file(self.path)

    def rmtree(self) -> None:
        """Delete this folder and everything below it (nothing happens when it does not exist)."""
        if self.is_dir():
            self.fs.delete_dir(self.path)

    # ---- whole folders

    def upload(self, local_dir: str | os.PathLike) -> None:
        """Copy a local folder's files here (replacing what is here); a local target gets a plain copy."""
        import pyarrow.fs as pafs

        self.rmtree()
        self.mkdir()
        pafs.copy_files(os.fspath(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, local_dir: str | os.PathLike) -> None:
        """Copy this folder's files into a local folder."""
        import pyarrow.fs as pafs

        os.makedirs(local_dir, exist_ok=True)
        pafs.copy_files(self.path, os.fspath(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
