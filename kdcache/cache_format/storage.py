"""Byte-level access to a cache root: a local directory or an fsspec URL (like zarr's stores).

``open_storage(path)`` picks the implementation: ``LocalStorage`` (plain os calls: temp file +
rename, fsync, flock) or ``FsspecStorage`` (one put per file, atomic on object stores such as s3
and gs; no rename, no fsync, no lock). Writer, reader, verify and inspect go through the
``Storage`` interface and never branch on which one they hold.

Durability on local disks lives here, in one place: ``atomic_write`` (temp file, fsync, rename,
fsync the directory) and ``FsyncTree`` / ``fsync_tree`` (every file and directory under a tree,
on a few threads). data/features.py uses them too. Nothing here knows the cache format.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from abc import ABC, abstractmethod
from collections.abc import Iterator

__all__ = [
    "FsspecStorage",
    "FsyncTree",
    "LocalStorage",
    "Storage",
    "atomic_write",
    "fsync_dir",
    "fsync_tree",
    "is_url",
    "open_storage",
    "staged_dir",
]


def is_url(path: str) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


# ------------------------------------------------------------------------- local durability


def fsync_dir(path: str) -> None:
    """fsync a directory (its entries: renames, new files); best effort."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str, data: bytes, *, fsync: bool = True) -> None:
    """Write a local file so that readers see either nothing or all of it: a temp file next to
    it (``NAME.tmp-<pid>``), fsync, rename over ``path``, fsync the directory."""
    d = os.path.dirname(path)
    os.makedirs(d, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        if fsync:
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    if fsync:
        fsync_dir(d)


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike) -> Iterator[str]:
    """Build a local output directory where a killed process leaves nothing half-written: yield a
    temporary sibling (``.NAME.tmp-<pid>``) to fill, then fsync it and move it to ``out`` (an
    existing ``out`` is replaced: the caller has checked ``--overwrite``). On an exception the
    temporary directory is removed and ``out`` is left as it was."""
    out = os.path.abspath(os.fspath(out))
    parent, name = os.path.split(out)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.lexists(out):
        old = os.path.join(parent, f".{name}.old-{os.getpid()}")
        os.rename(out, old)
    os.rename(tmp, out)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old) if os.path.isdir(old) and not os.path.islink(old) else os.remove(old)


class FsyncTree:
    """Context manager: fsync every file and directory under a local directory on a few threads
    (started on entry); leaving the block waits for all of them and re-raises the first error.

    File fsyncs must succeed; directory fsyncs are best effort (fsync_dir). Journaled file
    systems (ext4 and most others) batch concurrent fsyncs into one journal commit, so work done
    inside the block overlaps them.
    """

    def __init__(self, root: str, threads: int = 8):
        self.root, self.threads = str(root), threads

    def __enter__(self) -> FsyncTree:
        from concurrent.futures import ThreadPoolExecutor

        jobs = []
        for dirpath, _, files in os.walk(self.root):
            jobs.extend((_fsync_file, os.path.join(dirpath, f)) for f in files)
            jobs.append((fsync_dir, dirpath))
        self.pool = ThreadPoolExecutor(max_workers=max(1, min(self.threads, len(jobs))))
        self.futures = [self.pool.submit(fn, p) for fn, p in jobs]
        return self

    def __exit__(self, *exc) -> None:
        try:
            for f in self.futures:
                f.result()
        finally:
            self.pool.shutdown(wait=True)


def fsync_tree(root: str, threads: int = 8) -> None:
    """fsync every file and directory under a local directory (see FsyncTree)."""
    with FsyncTree(root, threads):
        pass


# ------------------------------------------------------------------------- storage


class Storage(ABC):
    """Byte-level access to a cache root. Paths (``rel``) are '/'-separated, relative to it.

    Attributes:
        url: The path or URL as given (without ``file://``).
        root: Absolute local path, or the fsspec path of the root (no trailing '/').
        read_only: Opened for reading only (zarr_store() honours it).
        local: True for LocalStorage (what durability means differs; callers need not care).
    """

    local: bool

    def __init__(self, url: str, root: str, *, read_only: bool, storage_options: dict | None):
        self.url = url
        self.root = root
        self.read_only = read_only
        self.storage_options = storage_options or {}

    @abstractmethod
    def zarr_store(self):
        """A zarr v3 store on the root."""

    @abstractmethod
    def full(self, rel: str) -> str:
        """The full path of rel (for messages, and for the implementation's own calls)."""

    @abstractmethod
    def exists(self, rel: str) -> bool: ...

    @abstractmethod
    def read_bytes(self, rel: str) -> bytes: ...

    @abstractmethod
    def listdir(self, rel: str) -> list[str]:
        """Sorted entry names under rel ([] when it does not exist)."""

    @abstractmethod
    def files(self, rel: str) -> set[str]:
        """Paths (relative to rel, '/'-separated) of every file below rel (empty when absent)."""

    @abstractmethod
    def size_tree(self, rel: str = "") -> int:
        """Total bytes of all files under rel."""

    @abstractmethod
    def remove(self, rel: str) -> None:
        """Remove a file or a whole directory; nothing when absent."""

    def write_atomic(self, rel: str, data: bytes, *, fsync: bool = True) -> None:
        """Write a file so that readers see either nothing or all of it (the one entry point for
        whole-file writes: tests hook it to kill a writer just before one)."""
        self._put_atomic(rel, data, fsync)

    @abstractmethod
    def _put_atomic(self, rel: str, data: bytes, fsync: bool) -> None: ...

    @abstractmethod
    def fsyncing(self, rel: str) -> contextlib.AbstractContextManager:
        """Context manager: every file and directory under rel is durable when the block is left
        (local: fsynced on a few threads while the block runs; URLs: nothing to do)."""

    @abstractmethod
    def lock(self, name: str) -> contextlib.AbstractContextManager:
        """Context manager holding an exclusive lock on the file ``name`` at the root (local:
        flock, created if needed; URLs: no lock)."""


class LocalStorage(Storage):
    """A local directory: os calls, temp file + rename, fsync, flock."""

    local = True

    def __init__(self, path: str, *, read_only: bool, storage_options: dict | None = None):
        super().__init__(
            path, os.path.abspath(path), read_only=read_only, storage_options=storage_options
        )

    def zarr_store(self):
        import zarr.storage

        return zarr.storage.LocalStore(self.root, read_only=self.read_only)

    def full(self, rel: str) -> str:
        return os.path.join(self.root, *rel.split("/")) if rel else self.root

    def exists(self, rel: str) -> bool:
        return os.path.exists(self.full(rel))

    def read_bytes(self, rel: str) -> bytes:
        with open(self.full(rel), "rb") as f:
            return f.read()

    def listdir(self, rel: str) -> list[str]:
        p = self.full(rel)
        return sorted(os.listdir(p)) if os.path.isdir(p) else []

    def files(self, rel: str) -> set[str]:
        base = self.full(rel)
        out: set[str] = set()
        for dirpath, _, names in os.walk(base):
            for f in names:
                out.add(os.path.relpath(os.path.join(dirpath, f), base).replace(os.sep, "/"))
        return out

    def size_tree(self, rel: str = "") -> int:
        total = 0
        for dirpath, _, files in os.walk(self.full(rel)):
            for f in files:
                try:
                    total += os.path.getsize(os.path.join(dirpath, f))
                except OSError:
                    pass
        return total

    def _put_atomic(self, rel: str, data: bytes, fsync: bool) -> None:
        atomic_write(self.full(rel), data, fsync=fsync)

    def remove(self, rel: str) -> None:
        p = self.full(rel)
        if os.path.isdir(p):
            shutil.rmtree(p, ignore_errors=True)
        elif os.path.exists(p):
            os.remove(p)

    def fsyncing(self, rel: str) -> contextlib.AbstractContextManager:
        return FsyncTree(self.full(rel))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        import fcntl

        os.makedirs(self.root, exist_ok=True)
        fd = os.open(os.path.join(self.root, name), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class FsspecStorage(Storage):
    """An fsspec URL: a single put is atomic on object stores (s3, gs); no rename, fsync or
    lock exist there.

    What the writer relies on (docs/format.md, "Object storage"): a single PUT is atomic
    (readers see the old object, none, or the whole new one), a read or a listing after a
    completed PUT or DELETE sees it (S3 has been strongly consistent since 2020; GCS too).
    fsspec filesystems may cache directory listings per process (s3fs does), which would hide
    files another process wrote or deleted since; every existence check, listing and read here
    drops that cache for its path first, so a resume or a reader opened later in the same
    process sees the store as it is.
    """

    local = False

    def __init__(self, url: str, *, read_only: bool, storage_options: dict | None = None):
        import fsspec

        fs, root = fsspec.core.url_to_fs(url, **(storage_options or {}))
        super().__init__(
            url, root.rstrip("/"), read_only=read_only, storage_options=storage_options
        )
        self.fs = fs

    def zarr_store(self):
        import zarr.storage

        return zarr.storage.FsspecStore.from_url(
            self.url, storage_options=self.storage_options or None, read_only=self.read_only
        )

    def full(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def _fresh(self, p: str) -> str:
        """Forget cached listings of p and its parents (other processes write here too)."""
        self.fs.invalidate_cache(p)
        return p

    def exists(self, rel: str) -> bool:
        return self.fs.exists(self._fresh(self.full(rel)))

    def read_bytes(self, rel: str) -> bytes:
        # s3fs sizes a file from the cached listing of its directory before a whole-file read
        # and calls a file missing from a stale listing missing.
        return self.fs.cat_file(self._fresh(self.full(rel)))

    def listdir(self, rel: str) -> list[str]:
        p = self._fresh(self.full(rel))
        if not self.fs.exists(p):
            return []
        return sorted(
            x.rstrip("/").rsplit("/", 1)[-1]
            for x in self.fs.ls(p, detail=False)
            if x.rstrip("/") != p
        )

    def files(self, rel: str) -> set[str]:
        base = self._fresh(self.full(rel))
        if not self.fs.exists(base):
            return set()
        prefix = base.rstrip("/") + "/"
        return {
            p[len(prefix) :] if p.startswith(prefix) else p.split(rel + "/", 1)[-1]
            for p in self.fs.find(base)
        }

    def size_tree(self, rel: str = "") -> int:
        return int(self.fs.du(self.full(rel)))

    def _put_atomic(self, rel: str, data: bytes, fsync: bool) -> None:
        self.fs.makedirs(self.full(rel).rsplit("/", 1)[0], exist_ok=True)
        self.fs.pipe_file(self.full(rel), data)

    def remove(self, rel: str) -> None:
        p = self._fresh(self.full(rel))
        if self.fs.exists(p):
            self.fs.rm(p, recursive=True)

    def fsyncing(self, rel: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def lock(self, name: str) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


def open_storage(
    path: str | os.PathLike, *, read_only: bool, storage_options: dict | None = None
) -> Storage:
    """LocalStorage for a local path (or ``file://`` URL), FsspecStorage for other URLs."""
    path = str(path)
    if path.startswith("file://"):
        path = path[len("file://") :]
    cls = FsspecStorage if is_url(path) else LocalStorage
    return cls(path, read_only=read_only, storage_options=storage_options)
