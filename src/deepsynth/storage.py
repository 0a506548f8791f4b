"""Object storage for every path argument: local paths as they are, ``s3://`` / ``gs://`` / any
fsspec protocol through fsspec.

Every command reads and writes local files (Parquet shards, checkpoints, JSON reports); this module
is the one place that moves them to and from object storage:

* inputs: :func:`local_input` copies a remote file or folder into a local cache
  (``$DEEPSYNTH_CACHE`` or ``~/.cache/deepsynth``, then ``remote/inputs/<URI hash>/<listing hash>``)
  and returns the copy; a call with the same remote listing (names, sizes, ETags) reuses it;
* outputs: :func:`staged_output` (a file or a folder written whole) hands the writer a local path
  and uploads it when the writer finished without error; :class:`RemoteMirror` uploads single files
  of a folder as they are finished (`deepsynth prepare`: each shard and its marker as it is written,
  the manifest last), since object stores have no rename and a crash must not leave a
  half-uploaded folder that looks complete.

Credentials and endpoints come from each protocol's own standard environment: for ``s3://``
(s3fs, botocore) AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN, AWS_PROFILE,
AWS_DEFAULT_REGION and AWS_ENDPOINT_URL (an S3-compatible server: MinIO, Ceph, moto); for ``gs://``
(gcsfs) GOOGLE_APPLICATION_CREDENTIALS. A URI whose protocol fsspec does not know, or whose package
is not installed, raises :class:`StorageError` naming the protocol and the package, before any work.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from deepsynth.atomic import TMP_MARK, write_text_atomic

logger = logging.getLogger(__name__)

__all__ = ["StorageError", "is_uri", "check_uri", "filesystem", "local_input", "staged_output",
           "RemoteMirror", "join", "exists", "read_text", "write_text", "cache_root"]

# RFC 3986 scheme followed by "://"; Windows drive letters ("C:\\") and hub ids never match.
_URI = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")


class StorageError(ValueError):
    """A URI that cannot be read or written: unknown protocol, missing package, nothing there."""


def is_uri(path: str | os.PathLike | None) -> bool:
    """True for ``PROTOCOL://...`` other than ``file://`` (which is a local path)."""
    if path is None or isinstance(path, Path):
        # pathlib collapses "s3://b" into "s3:/b": a Path is always meant as local
        return False
    m = _URI.match(str(path))
    return bool(m) and m.group(1).lower() != "file"


def _local(path: str | os.PathLike) -> Path:
    s = str(path)
    return Path(s[len("file://"):] if s.lower().startswith("file://") else s).expanduser()


def _protocol(uri: str) -> str:
    return _URI.match(uri).group(1).lower()


def check_uri(uri: str) -> str:
    """The URI's protocol, after checking that fsspec knows it and its package is installed."""
    try:
        import fsspec
        from fsspec.registry import known_implementations
    except ImportError:
        raise StorageError(f"{uri}: object storage needs fsspec; install the cloud extra "
                           "(pip install 'deepsynth[cloud]')") from None
    proto = _protocol(uri)
    try:
        fsspec.get_filesystem_class(proto)
    except ImportError:
        impl = known_implementations.get(proto, {})
        package = impl.get("class", proto).split(".", 1)[0]
        raise StorageError(f"{uri}: the {proto}:// protocol needs the {package!r} package, which is not "
                           f"installed (pip install {package}; s3fs and gcsfs come with "
                           "pip install 'deepsynth[cloud]')") from None
    except ValueError:
        raise StorageError(f"{uri}: unknown storage protocol {proto!r} (fsspec knows: s3, gs, az, hf, "
                           "http, ... ; a local path has no PROTOCOL:// prefix)") from None
    return proto


def filesystem(uri: str):
    """``(fs, path)``: the fsspec filesystem for ``uri`` (credentials from the environment)."""
    import fsspec

    check_uri(uri)
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def join(base: str | os.PathLike, *parts: str) -> str | Path:
    """``base/part/...`` for a URI or a local path (a URI stays a string)."""
    if is_uri(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return Path(base).joinpath(*parts)


def exists(path: str | os.PathLike) -> bool:
    if not is_uri(path):
        return _local(path).exists()
    fs, p = filesystem(str(path))
    return fs.exists(p)


def read_text(path: str | os.PathLike) -> str:
    if not is_uri(path):
        return _local(path).read_text(encoding="utf-8")
    fs, p = filesystem(str(path))
    with fs.open(p, "rb") as f:
        return f.read().decode("utf-8")


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` whole: atomically on disk; one PUT (atomic per object) on object storage."""
    if not is_uri(path):
        write_text_atomic(_local(path), text)
        return
    fs, p = filesystem(str(path))
    fs.pipe_file(p, text.encode("utf-8"))


def cache_root() -> Path:
    """Where remote inputs are copied and remote outputs staged."""
    root = os.environ.get("DEEPSYNTH_CACHE")
    base = Path(root).expanduser() if root else Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "deepsynth"
    return base / "remote"


def _slot(uri: str, kind: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]", "_", uri.rstrip("/").rsplit("/", 1)[-1])[:60] or "root"
    return cache_root() / kind / f"{hashlib.sha256(uri.rstrip('/').encode()).hexdigest()[:16]}-{name}"


def _listing(fs, path: str) -> dict[str, dict]:
    """Relative name -> size and version tag of every object under ``path`` (a file: ``{"": ...}``)."""
    def tag(info: dict) -> str:
        return str(info.get("ETag") or info.get("etag") or info.get("md5Hash") or info.get("mtime")
                   or info.get("LastModified") or "")

    fs.invalidate_cache()  # listings cached by an earlier call may predate another writer's objects
    if fs.isfile(path):
        info = fs.info(path)
        return {"": {"size": info.get("size"), "tag": tag(info)}}
    found = fs.find(path, detail=True)
    root = path.rstrip("/") + "/"
    return {k[len(root):]: {"size": v.get("size"), "tag": tag(v)} for k, v in found.items()
            if k.startswith(root) and v.get("type", "file") == "file"}


def local_input(path: str | os.PathLike, *, what: str = "input") -> Path:
    """A local path holding what ``path`` names: the path itself when local; for a URI, a cached
    copy of the remote file or folder (copied again only when the remote listing changed).

    Each version of the remote listing gets its own folder, filled under a temporary name and
    renamed into place, so processes copying the same URI at once (Ray replicas on one node) never
    see a half-written copy: the first rename wins and the others use its copy."""
    if not is_uri(path):
        return _local(path)
    uri = str(path)
    fs, p = filesystem(uri)
    listing = _listing(fs, p)
    if not listing:
        raise FileNotFoundError(f"{uri}: no such {what} (nothing stored under it)")
    version = hashlib.sha256(json.dumps(listing, sort_keys=True).encode()).hexdigest()[:16]
    slot = _slot(uri, "inputs")
    is_file = set(listing) == {""}
    name = (uri.rstrip("/").rsplit("/", 1)[-1] or "data") if is_file else "data"
    done = slot / version
    if (done / name).exists():
        logger.info("%s: using the cached copy in %s", uri, done / name)
        return done / name
    slot.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{version}.", suffix=TMP_MARK, dir=slot))
    try:
        logger.info("%s: copying %d object(s) to %s", uri, len(listing), done / name)
        if is_file:
            fs.get_file(p, str(tmp / name))
        else:
            for rel in sorted(listing):
                dest = tmp / name / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{p.rstrip('/')}/{rel}", str(dest))
        try:
            tmp.rename(done)
        except OSError:
            if not (done / name).exists():  # not a concurrent copy that won the rename
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return done / name


def upload_file(local: str | os.PathLike, uri: str) -> None:
    fs, p = filesystem(uri)
    fs.put_file(str(local), p)


def upload_tree(local: str | os.PathLike, uri: str, *, skip_hidden: bool = True) -> list[str]:
    """Upload every file under the local folder to ``uri/<relative path>``; returns the names.

    Hidden entries (temporary ``.NAME.tmp`` siblings, caches) are skipped when ``skip_hidden``."""
    local = Path(local)
    names = []
    for f in sorted(local.rglob("*")):
        rel = f.relative_to(local)
        if not f.is_file() or (skip_hidden and any(part.startswith(".") for part in rel.parts)):
            continue
        upload_file(f, join(uri, rel.as_posix()))
        names.append(rel.as_posix())
    return names


@contextlib.contextmanager
def staged_output(path: str | os.PathLike, *, folder: bool = False) -> Iterator[Path]:
    """A local path to write ``path`` into. Local: ``path`` itself. URI: a local staging file or
    folder, uploaded when the block ends without error (a file as one object; a folder file by
    file, so a reader sees each file whole) and removed afterwards; on error nothing is uploaded."""
    if not is_uri(path):
        yield _local(path)
        return
    uri = str(path)
    check_uri(uri)
    stage = Path(tempfile.mkdtemp(prefix="deepsynth-stage-"))
    target = stage / "out" if folder else stage / (uri.rstrip("/").rsplit("/", 1)[-1] or "out")
    try:
        yield target
        if folder:
            upload_tree(target, uri, skip_hidden=False)
        elif target.exists():
            upload_file(target, uri)
    finally:
        shutil.rmtree(stage, ignore_errors=True)


class RemoteMirror:
    """A local staging folder kept in step with a remote folder, file by file.

    ``pull()`` copies what the remote folder already holds (an earlier, maybe interrupted run)
    into the stage, so a resumable writer (`deepsynth prepare`) sees its own earlier output;
    ``put(name)`` uploads one finished file; ``delete(name)`` removes one. A local folder needs
    none of this: :func:`mirror_for` gives a no-op mirror over it."""

    def __init__(self, uri: str | None, stage: Path) -> None:
        self.uri = uri  # None: local folder, every method does nothing
        self.stage = stage  # the folder the writer writes into

    def pull(self) -> list[str]:
        if self.uri is None:
            return []
        fs, p = filesystem(self.uri)
        listing = _listing(fs, p) if fs.exists(p) else {}
        if set(listing) == {""}:
            raise StorageError(f"{self.uri} is a file; an output folder was expected")
        shutil.rmtree(self.stage, ignore_errors=True)
        self.stage.mkdir(parents=True, exist_ok=True)
        for rel in sorted(listing):
            dest = self.stage / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(f"{p.rstrip('/')}/{rel}", str(dest))
        return sorted(listing)

    def put(self, name: str) -> None:
        if self.uri is not None:
            upload_file(self.stage / name, join(self.uri, name))

    def delete(self, name: str) -> None:
        if self.uri is None:
            return
        fs, p = filesystem(str(join(self.uri, name)))
        if fs.exists(p):
            fs.rm_file(p)

    def put_tree(self, name: str = "") -> list[str]:
        """Upload every file under ``stage/name`` (the whole stage by default; hidden temporaries skipped)."""
        if self.uri is None:
            return []
        return upload_tree(self.stage / name, join(self.uri, name) if name else self.uri)

    def delete_tree(self, name: str) -> None:
        if self.uri is None:
            return
        fs, p = filesystem(str(join(self.uri, name)))
        if fs.exists(p):
            fs.rm(p, recursive=True)

    def public(self, local: str | os.PathLike) -> str:
        """What a user calls a staged path: its URI (the local path itself without a remote)."""
        if self.uri is None:
            return str(local)
        return str(join(self.uri, Path(local).relative_to(self.stage).as_posix()))


def mirror_for(out: str | os.PathLike) -> RemoteMirror:
    """The mirror of an output folder: a staging folder under the cache for a URI (the same one on
    every run, so an interrupted run's stage is reused), the folder itself for a local path."""
    if not is_uri(out):
        return RemoteMirror(None, _local(out))
    check_uri(str(out))
    return RemoteMirror(str(out).rstrip("/"), _slot(str(out), "outputs"))
