"""Local paths and remote URIs (``s3://bucket/key``) behind one small set of file operations (pyarrow filesystems).

Tile tables and Ray Tune/Train storage may live on S3 so that every node of a cluster sees them. A
remote location is a plain ``s3://bucket/key`` URI; credentials, region and endpoint come from the
standard AWS configuration that pyarrow's S3 client reads: ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``
(or ``~/.aws``, an instance role), ``AWS_DEFAULT_REGION``, and ``AWS_ENDPOINT_URL`` for an
S3-compatible server (MinIO, Ceph, moto). Locations are written into manifests, sweep files and MLflow
tags, so a URI that carries credentials or options (``s3://key:secret@…``, ``?secret_key=…``) is refused
(``check_location``) rather than recorded.

A local location is a ``Path``; a remote one a ``str``. Writes are atomic on both: locally a temporary
name and a rename, on S3 because an object appears only once its upload completes.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow.fs as pafs

__all__ = ["Location", "cache_dir", "check_location", "exists", "filesystem", "is_remote", "join", "list_dir", "mtime", "name",
           "parent", "read_bytes", "read_text", "remove_tree", "resolve", "staged_output", "uri_of", "write_text"]

Location = Path | str


def cache_dir(*parts: str) -> Path:
    """Where histoweak keeps what it makes by default: sweeps' results and checkpoints (``ray_results``) and the
    embedded datasets (``data``).

    ``HISTOWEAK_HOME`` when set; else ``.cache`` in the working directory — unless that directory is the copy
    Ray made of a job's ``--working-dir`` (under ``…/runtime_resources/working_dir_files/`` in Ray's session
    folder), which belongs to one Ray session and which Ray deletes when it needs the space: then
    ``~/.histoweak`` on the machine that runs the driver (the head, under ``ray job submit``), so a checkpoint
    that MLflow names is still there when a user comes back for it.
    """
    home = os.environ.get("HISTOWEAK_HOME")
    if home:
        root = Path(home).expanduser()
    elif "runtime_resources" in Path.cwd().resolve().parts:
        root = Path.home() / ".histoweak"
    else:
        root = Path(".cache")
    return root.joinpath(*parts).resolve()


def is_remote(location: str | os.PathLike) -> bool:
    """Whether ``location`` is a URI of a remote filesystem (``s3://…``), not a local path or ``file://``."""
    text = str(location)
    return "://" in text and not text.startswith("file://")


def check_location(location: str) -> str:
    """``location`` without a trailing ``/``; ``ValueError`` if it carries credentials or options.

    The message shows the URI with its user part and query replaced by ``…``: the secret is not echoed.
    """
    parts = urlsplit(str(location))
    if parts.username is not None or parts.password is not None or parts.query:
        shown = f"{parts.scheme}://…@{parts.hostname}{parts.path}" if "@" in parts.netloc else \
            f"{parts.scheme}://{parts.netloc}{parts.path}?…"
        raise ValueError(f"{shown}: credentials and options do not belong in a storage URI (it is recorded in "
                         "manifests, sweep files and MLflow): give them through the environment or ~/.aws "
                         "(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION, AWS_ENDPOINT_URL)")
    if not parts.netloc:
        raise ValueError(f"{location}: a remote location needs a bucket, e.g. s3://bucket/prefix")
    return str(location).rstrip("/")


def resolve(location: str | os.PathLike) -> Location:
    """The canonical form: an absolute ``Path``, or a checked URI without a trailing ``/``."""
    return check_location(str(location)) if is_remote(location) else Path(location).resolve()


def filesystem(location: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(pyarrow filesystem, path on it) for a local path, a ``file://`` URI or a remote URI."""
    if is_remote(location):
        return pafs.FileSystem.from_uri(check_location(str(location)))
    if str(location).startswith("file://"):
        return pafs.FileSystem.from_uri(str(location))
    return pafs.LocalFileSystem(), str(Path(location).resolve())


def uri_of(fs: pafs.FileSystem, path: str) -> str:
    """The location of ``path`` on ``fs``: the path itself locally, else ``<scheme>://path``."""
    return path if fs.type_name == "local" else f"{fs.type_name}://{path}"


def join(base: str | os.PathLike, *parts: str) -> Location:
    """``base / part / …`` for a path or a URI."""
    if is_remote(base):
        return "/".join([check_location(str(base)), *parts])
    return Path(base).joinpath(*parts)


def name(location: str | os.PathLike) -> str:
    """The last component of a path or URI."""
    return str(location).rstrip("/").rsplit("/", 1)[-1] if is_remote(location) else Path(location).name


def parent(location: str | os.PathLike) -> Location:
    """The location one level up (a URI never above its bucket)."""
    if not is_remote(location):
        return Path(location).parent
    head, _, _ = check_location(str(location)).rpartition("/")
    if head.endswith(":/"):
        raise ValueError(f"{location}: a bucket has no parent")
    return head


def exists(location: str | os.PathLike) -> bool:
    fs, path = filesystem(location)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def mtime(location: str | os.PathLike) -> float:
    """Modification time of a file, in seconds since the epoch (0.0 when the filesystem does not say)."""
    fs, path = filesystem(location)
    info = fs.get_file_info(path)
    return info.mtime.timestamp() if info.mtime is not None else 0.0


def list_dir(location: str | os.PathLike) -> list[pafs.FileInfo]:
    """The entries directly under ``location`` (none when it does not exist); ``.base_name``, ``.type``, ``.path``."""
    fs, path = filesystem(location)
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def read_bytes(location: str | os.PathLike) -> bytes:
    fs, path = filesystem(location)
    with fs.open_input_stream(path) as f:
        return f.read()


def read_text(location: str | os.PathLike) -> str:
    return read_bytes(location).decode()


def write_text(location: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``location`` atomically (a reader sees the old content or the new, never half)."""
    if not is_remote(location):
        path = Path(location)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
        try:
            tmp.write_text(text)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return
    fs, path = filesystem(location)
    with fs.open_output_stream(path) as f:  # one PUT on close: the object appears whole
        f.write(text.encode())


def remove_tree(location: str | os.PathLike) -> None:
    """Delete a directory (a local tree, or every object under a remote prefix); nothing there is fine."""
    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = filesystem(location)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


@contextlib.contextmanager
def staged_output(location: str | os.PathLike) -> Iterator[str]:
    """A local path to write ``location``'s content to: the path itself when local, else a temporary file
    uploaded to ``location`` when the block finishes without an error (so writers that need a local file,
    and their own atomic rename, work unchanged on S3)."""
    if not is_remote(location):
        yield str(location)
        return
    fs, path = filesystem(location)
    with tempfile.TemporaryDirectory(prefix="histoweak-stage-") as tmp:
        local = os.path.join(tmp, name(location))
        yield local
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
