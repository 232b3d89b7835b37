"""Where cached responses live: small bodies in memory, larger ones in files, one LRU.

A body up to ``max_cache_each_size_on_memory`` bytes stays in memory; a larger one (up to
``max_cache_each_size``) is written to a file under ``cache_dir``; anything larger is not
stored at all. ``max_cache_entry`` bounds the number of entries (memory and file together)
with least-recently-used eviction, so memory is bounded by
``max_cache_entry * max_cache_each_size_on_memory`` plus one in-flight buffer of at most
``max_cache_each_size_on_memory`` per response being stored.

Bodies are written *as they stream* (:class:`EntryWriter`): a buffer in memory until it
outgrows the memory limit, then a file written chunk by chunk with plain ``os.write`` on
the reactor thread. These are small writes into the page cache of a local file (each one a
chunk the upstream just delivered, at most 64 KiB or so); a thread per write would cost
more than the write. Reads of file entries are the same: the SHA-256 recorded while
writing is checked over the whole file before anything is served when the file is at most
:data:`VERIFY_FIRST` bytes (a corrupted or missing file is a miss: the entry and its file
are dropped and the event logged); a larger file is hashed while it streams and its last
bytes are held back until the digest matches (:class:`BodySource`). Either way the body is
streamed from the descriptor that was checked.

Files are named ``<store token>-<n>.cache`` (``.part`` while being written). On start only
files with that shape are removed from ``cache_dir``, never anything else, so a mistaken
``cache_dir = "."`` cannot delete a user's files; each store has its own random token so
that the store of a previous configuration (still finishing requests after a reload)
never collides with the new one.
"""

from __future__ import annotations

import hashlib
import os
import re
import secrets
from collections import OrderedDict
from typing import Callable

import attrs
from twisted.logger import Logger

from rpxy.config.model import CacheConfig
from rpxy.message import Headers

from .policy import vary_key

__all__ = ["CacheStore", "Entry", "EntryWriter", "BodySource", "CorruptBody", "VERIFY_FIRST"]

log = Logger()

CHUNK = 64 * 1024
#: File entries up to this size are verified (SHA-256) before anything is served, on the
#: reactor thread (about 1 ms per MiB): a corrupted one is a plain miss. Larger ones are
#: verified while they stream, and a mismatch aborts the response before its last bytes.
VERIFY_FIRST = 1024 * 1024
#: Stored responses kept per URI (Vary variants); more evict the URI's oldest.
MAX_VARIANTS = 32
_OUR_FILE = re.compile(r"^[0-9a-f]{16}-\d+\.(cache|part)$")

PrimaryKey = bytes
VaryKey = tuple[bytes, ...]


@attrs.define(eq=False, slots=True)
class Entry:
    """One stored response: its head, timing facts and where its body is."""

    primary: PrimaryKey
    vary_names: tuple[bytes, ...]
    vary_values: VaryKey
    status: int
    #: The response fields as sent to the client, without Age, Cache-Status, Content-Length.
    headers: Headers
    request_time: float
    response_time: float
    initial_age: float
    lifetime: float
    size: int
    sha256: bytes
    body: bytes | None = None
    path: str | None = None

    def age(self, now: float) -> float:
        return self.initial_age + max(0.0, now - self.response_time)

    def has_validator(self) -> bool:
        return any(name in (b"etag", b"last-modified") for name, _ in self.headers)


class CorruptBody(OSError):
    """A file entry's bytes did not match the SHA-256 recorded when it was written."""


class BodySource:
    """Reads a stored body in chunks (from memory, or from a file).

    A file is held as an unbuffered file object, so that a source dropped without
    ``close()`` (a connection torn down mid-body) still releases its descriptor.

    ``expected``: ``(size, sha256, on_corrupt)`` for a file too large to verify before
    serving: it is hashed as it is read, and the read that would return its last bytes
    raises :class:`CorruptBody` instead (after calling ``on_corrupt``) when the digest
    does not match, so a corrupted body never reaches a client complete.
    """

    __slots__ = ("data", "offset", "file", "expected", "digest")

    def __init__(
        self,
        data: bytes | None = None,
        fd: int | None = None,
        expected: tuple[int, bytes, Callable[[], None]] | None = None,
    ) -> None:
        self.data = data
        self.offset = 0
        self.file = os.fdopen(fd, "rb", buffering=0) if fd is not None else None
        self.expected = expected
        self.digest = hashlib.sha256() if expected is not None else None

    def read(self, size: int = CHUNK) -> bytes:
        if self.data is not None:
            chunk = self.data[self.offset : self.offset + size]
            self.offset += len(chunk)
            return chunk
        if self.file is None:
            return b""
        try:
            chunk = self.file.read(size) or b""
        except OSError as error:
            log.warn("cache file read failed: {error}", error=error)
            raise
        self.offset += len(chunk)
        expected = self.expected
        if expected is not None and self.digest is not None:
            self.digest.update(chunk)
            total, sha256, on_corrupt = expected
            if self.offset >= total or not chunk:
                self.expected = None
                if self.offset != total or self.digest.digest() != sha256:
                    on_corrupt()
                    raise CorruptBody("SHA-256 or size mismatch")
        return chunk

    def close(self) -> None:
        file, self.file = self.file, None
        if file is not None:
            file.close()


class CacheStore:
    """The LRU of entries, their files, and the per-URI Vary index."""

    def __init__(self, config: CacheConfig) -> None:
        directory = os.path.abspath(config.cache_dir)
        worker = os.environ.get("RPXY_WORKER")  # rpxy.workers.ENV_WORKER
        if worker is not None and worker.isdigit():
            # Under ``rpxy --workers N`` each worker keeps (and empties at start) its own folder,
            # so a starting worker never deletes the entries another one is serving.
            directory = os.path.join(directory, f"worker-{int(worker)}")
        self.directory = directory
        self.max_entries = config.max_cache_entry
        self.max_size = config.max_cache_each_size
        self.max_memory_size = config.max_cache_each_size_on_memory
        self.token = secrets.token_hex(8)
        self.counter = 0
        self.lru: OrderedDict[tuple[PrimaryKey, VaryKey], Entry] = OrderedDict()
        #: primary key -> the Vary field names of its latest stored response
        self.vary: dict[PrimaryKey, tuple[bytes, ...]] = {}
        self.variants: dict[PrimaryKey, int] = {}
        #: Retired (its state was replaced): responses still finishing are not kept.
        self.closed = False

    # -- life cycle -------------------------------------------------------------

    def start(self) -> None:
        """Create ``cache_dir`` and remove cache files left by earlier runs (ours only)."""
        os.makedirs(self.directory, mode=0o700, exist_ok=True)
        try:
            names = os.listdir(self.directory)
        except OSError as error:
            log.warn("cache_dir {dir} unreadable: {error}", dir=self.directory, error=error)
            return
        for name in names:
            if _OUR_FILE.match(name):
                _unlink(os.path.join(self.directory, name))

    def clear(self) -> None:
        """Drop every entry and its file (a reload or shutdown)."""
        for entry in self.lru.values():
            if entry.path is not None:
                _unlink(entry.path)
        self.lru.clear()
        self.vary.clear()
        self.variants.clear()

    def close(self) -> None:
        """Empty the store for good: bodies still being written when it closes are dropped."""
        self.closed = True
        self.clear()

    def __len__(self) -> int:
        return len(self.lru)

    # -- lookup -----------------------------------------------------------------

    def lookup(self, primary: PrimaryKey, request_headers: Headers) -> tuple[Entry | None, str]:
        """The entry selected by this request, or ``(None, "uri-miss" | "vary-miss")``."""
        names = self.vary.get(primary)
        if names is None:
            return None, "uri-miss"
        entry = self.lru.get((primary, vary_key(names, request_headers)))
        if entry is None:
            return None, "vary-miss"
        self.lru.move_to_end((primary, entry.vary_values))
        return entry, ""

    def open_body(self, entry: Entry) -> BodySource | None:
        """A reader of the entry's body; None (entry dropped, event logged) when corrupted."""
        if entry.body is not None:
            return BodySource(entry.body)
        assert entry.path is not None
        try:
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as error:
            log.warn("cache file {path} unreadable ({error}): entry dropped", path=entry.path, error=error)
            self.remove(entry)
            return None
        if entry.size > VERIFY_FIRST:
            return self._open_large(entry, fd)
        try:
            digest = hashlib.sha256()
            size = 0
            while True:
                chunk = os.read(fd, CHUNK)
                if not chunk:
                    break
                size += len(chunk)
                if size > entry.size:
                    break
                digest.update(chunk)
            if size != entry.size or digest.digest() != entry.sha256:
                log.warn(
                    "cache file {path} corrupted (SHA-256 or size mismatch): entry dropped and file deleted",
                    path=entry.path,
                )
                os.close(fd)
                self.remove(entry)
                return None
            os.lseek(fd, 0, os.SEEK_SET)
        except OSError as error:
            os.close(fd)
            log.warn("cache file {path} unreadable ({error}): entry dropped", path=entry.path, error=error)
            self.remove(entry)
            return None
        return BodySource(fd=fd)

    def _open_large(self, entry: Entry, fd: int) -> BodySource | None:
        """A file over VERIFY_FIRST: its size is checked now, its SHA-256 while it streams."""
        try:
            size = os.fstat(fd).st_size
        except OSError:
            size = -1
        if size != entry.size:
            os.close(fd)
            log.warn("cache file {path} corrupted (size mismatch): entry dropped and file deleted", path=entry.path)
            self.remove(entry)
            return None

        def corrupt() -> None:
            log.warn(
                "cache file {path} corrupted (SHA-256 mismatch, seen while serving): response aborted, "
                "entry dropped and file deleted",
                path=entry.path,
            )
            self.remove(entry)

        return BodySource(fd=fd, expected=(entry.size, entry.sha256, corrupt))

    # -- changes ----------------------------------------------------------------

    def remove(self, entry: Entry) -> None:
        key = (entry.primary, entry.vary_values)
        if self.lru.get(key) is entry:
            del self.lru[key]
            left = self.variants.get(entry.primary, 1) - 1
            if left <= 0:
                self.variants.pop(entry.primary, None)
                self.vary.pop(entry.primary, None)
            else:
                self.variants[entry.primary] = left
        if entry.path is not None:
            _unlink(entry.path)

    def invalidate(self, primary: PrimaryKey) -> None:
        """Drop every stored response for a URI (an unsafe method went through it)."""
        if primary not in self.vary:
            return
        for key in [key for key in self.lru if key[0] == primary]:
            self.remove(self.lru[key])

    def writer(self, content_length: int | None) -> EntryWriter | None:
        """A writer for a body of (maybe) ``content_length`` bytes; None if it cannot fit."""
        if content_length is not None and content_length > self.max_size:
            return None
        return EntryWriter(self)

    def insert(self, entry: Entry) -> None:
        """Make ``entry`` the most recent one, replacing what it supersedes, then evict."""
        if self.closed:
            if entry.path is not None:
                _unlink(entry.path)
            return
        primary = entry.primary
        if self.vary.get(primary) != entry.vary_names:
            # The URI now varies on other fields: its old variants can no longer be selected.
            self.invalidate(primary)
        old = self.lru.get((primary, entry.vary_values))
        if old is not None:
            self.remove(old)
        elif self.variants.get(primary, 0) >= MAX_VARIANTS:
            oldest = next(key for key in self.lru if key[0] == primary)
            self.remove(self.lru[oldest])
        self.vary[primary] = entry.vary_names
        self.variants[primary] = self.variants.get(primary, 0) + 1
        self.lru[(primary, entry.vary_values)] = entry
        while len(self.lru) > self.max_entries:
            _, evicted = next(iter(self.lru.items()))
            self.remove(evicted)

    def _new_path(self) -> str:
        self.counter += 1
        return os.path.join(self.directory, f"{self.token}-{self.counter}")


class EntryWriter:
    """Collects one body as it streams: memory first, a file once it outgrows the memory limit.

    ``write`` returns False once the body is over ``max_cache_each_size`` (or the file
    cannot be written): the partial entry is dropped and the caller stops feeding it.
    """

    __slots__ = ("store", "buffer", "size", "digest", "fd", "path", "part", "failed")

    def __init__(self, store: CacheStore) -> None:
        self.store = store
        self.buffer: list[bytes] | None = []
        self.size = 0
        self.digest = hashlib.sha256()
        self.fd: int | None = None
        self.path: str | None = None
        self.part: str | None = None
        self.failed = False

    def write(self, data: bytes) -> bool:
        if self.failed:
            return False
        store = self.store
        self.size += len(data)
        if self.size > store.max_size:
            self.discard()
            return False
        self.digest.update(data)
        if self.fd is None:
            assert self.buffer is not None
            self.buffer.append(data)
            if self.size > store.max_memory_size:
                return self._spill()
            return True
        return self._write_file(data)

    def _spill(self) -> bool:
        base = self.store._new_path()
        part = base + ".part"
        try:
            self.fd = os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        except OSError as error:
            log.warn("cache file {path} not created: {error}", path=part, error=error)
            self.discard()
            return False
        self.path = base + ".cache"
        self.part = part
        buffer, self.buffer = self.buffer, None
        return self._write_file(b"".join(buffer or ()))

    def _write_file(self, data: bytes) -> bool:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)  # type: ignore[arg-type]
                view = view[written:]
        except OSError as error:
            log.warn("cache file {path} write failed: {error}", path=self.path, error=error)
            self.discard()
            return False
        return True

    def discard(self) -> None:
        """Drop the partial entry (too large, upstream failed, client went away)."""
        self.failed = True
        self.buffer = None
        fd, self.fd = self.fd, None
        if fd is not None:
            os.close(fd)
            _unlink(self.part)  # type: ignore[arg-type]

    def finish(self) -> tuple[bytes | None, str | None, int, bytes] | None:
        """``(memory body, file path, size, sha256)`` of the complete body; None if dropped."""
        if self.failed:
            return None
        if self.fd is None and self.size > 0 and self.store.max_memory_size == 0:
            # max_cache_each_size_on_memory = 0: every body goes to a file.
            if not self._spill():
                return None
        self.failed = True  # finish once
        fd, self.fd = self.fd, None
        if fd is None:
            body = b"".join(self.buffer or ())
            self.buffer = None
            return body, None, self.size, self.digest.digest()
        os.close(fd)
        path, part = self.path, self.part
        assert path is not None and part is not None
        try:
            os.rename(part, path)
        except OSError as error:
            # e.g. a newer store emptied cache_dir after a reload
            log.info("cache file {path} not kept: {error}", path=path, error=error)
            _unlink(part)
            return None
        return None, path, self.size, self.digest.digest()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as error:
        log.warn("cache file {path} not removed: {error}", path=path, error=error)
