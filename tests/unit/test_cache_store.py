"""rpxy.cache.store: memory and file entries, SHA-256 checks, LRU, Vary index, cleanup."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from rpxy.cache.store import MAX_VARIANTS, CacheStore, Entry
from rpxy.config.model import CacheConfig


def make_store(tmp_path: Path, *, entries: int = 10, memory: int = 100, size: int = 1000) -> CacheStore:
    store = CacheStore(
        CacheConfig(
            cache_dir=str(tmp_path / "cache"),
            max_cache_entry=entries,
            max_cache_each_size=size,
            max_cache_each_size_on_memory=memory,
        )
    )
    store.start()
    return store


def store_body(store: CacheStore, primary: bytes, chunks: list[bytes], *, vary=((), ())) -> Entry | None:
    writer = store.writer(None)
    assert writer is not None
    for chunk in chunks:
        if not writer.write(chunk):
            return None
    finished = writer.finish()
    if finished is None:
        return None
    body, path, size, digest = finished
    entry = Entry(
        primary=primary,
        vary_names=vary[0],
        vary_values=vary[1],
        status=200,
        headers=[],
        request_time=0.0,
        response_time=0.0,
        initial_age=0.0,
        lifetime=60.0,
        size=size,
        sha256=digest,
        body=body,
        path=path,
    )
    store.insert(entry)
    return entry


def read_all(store: CacheStore, entry: Entry) -> bytes | None:
    source = store.open_body(entry)
    if source is None:
        return None
    chunks = []
    while chunk := source.read(7):
        chunks.append(chunk)
    source.close()
    return b"".join(chunks)


def files(store: CacheStore) -> list[str]:
    return sorted(os.listdir(store.directory))


def test_small_body_in_memory(tmp_path):
    store = make_store(tmp_path)
    entry = store_body(store, b"k", [b"abc", b"def"])
    assert entry is not None and entry.body == b"abcdef" and entry.path is None
    assert files(store) == []
    assert read_all(store, entry) == b"abcdef"
    assert store.lookup(b"k", [])[0] is entry


def test_body_over_memory_limit_spills_to_a_file_as_it_streams(tmp_path):
    store = make_store(tmp_path, memory=10)
    writer = store.writer(None)
    assert writer.write(b"x" * 8)
    assert files(store) == []
    assert writer.write(b"y" * 8)  # over 10: the buffer goes to a .part file
    assert [name.rsplit(".", 1)[1] for name in files(store)] == ["part"]
    assert writer.write(b"z" * 4)
    body, path, size, _digest = writer.finish()
    assert body is None and size == 20
    assert Path(path).read_bytes() == b"x" * 8 + b"y" * 8 + b"z" * 4
    assert [name.rsplit(".", 1)[1] for name in files(store)] == ["cache"]


def test_body_over_the_size_limit_is_dropped_without_leftovers(tmp_path):
    store = make_store(tmp_path, memory=10, size=30)
    writer = store.writer(None)
    assert writer.write(b"a" * 20)
    assert not writer.write(b"b" * 20)
    assert not writer.write(b"c")
    assert writer.finish() is None
    assert files(store) == []
    assert store.writer(31) is None  # a declared length over the limit is refused at once
    assert store.writer(30) is not None


def test_memory_zero_means_every_body_in_a_file(tmp_path):
    store = make_store(tmp_path, memory=0)
    entry = store_body(store, b"k", [b"tiny"])
    assert entry.path is not None and Path(entry.path).read_bytes() == b"tiny"
    empty = store_body(store, b"e", [])
    assert empty.body == b"" and empty.size == 0


def test_corrupted_file_is_a_miss_and_deleted(tmp_path):
    store = make_store(tmp_path, memory=0)
    entry = store_body(store, b"k", [b"0123456789" * 10])
    Path(entry.path).write_bytes(b"0123456789" * 9 + b"012345678X")
    assert read_all(store, entry) is None
    assert not os.path.exists(entry.path)
    assert store.lookup(b"k", []) == (None, "uri-miss")
    assert len(store) == 0


@pytest.mark.parametrize("damage", ["truncate", "extend", "delete"])
def test_file_size_changes_and_deletion_are_misses(tmp_path, damage):
    store = make_store(tmp_path, memory=0)
    entry = store_body(store, b"k", [b"payload" * 20])
    path = Path(entry.path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "extend":
        path.write_bytes(path.read_bytes() + b"!")
    else:
        path.unlink()
    assert store.open_body(entry) is None
    assert len(store) == 0


def test_lru_eviction_deletes_files(tmp_path):
    store = make_store(tmp_path, entries=2, memory=0)
    one = store_body(store, b"1", [b"one"])
    store_body(store, b"2", [b"two"])
    assert store.lookup(b"1", [])[0] is one  # 1 is now the most recently used
    store_body(store, b"3", [b"three"])
    assert store.lookup(b"2", []) == (None, "uri-miss")
    assert store.lookup(b"1", [])[0] is one
    assert len(files(store)) == 2


def test_replacing_an_entry_deletes_the_old_file(tmp_path):
    store = make_store(tmp_path, memory=0)
    old = store_body(store, b"k", [b"old"])
    new = store_body(store, b"k", [b"new"])
    assert not os.path.exists(old.path)
    assert read_all(store, new) == b"new"
    assert len(store) == 1


def test_vary_variants_and_vary_miss(tmp_path):
    store = make_store(tmp_path)
    names = (b"accept-language",)
    en = store_body(store, b"k", [b"en"], vary=(names, (b"en",)))
    fr = store_body(store, b"k", [b"fr"], vary=(names, (b"fr",)))
    assert store.lookup(b"k", [(b"accept-language", b"en")])[0] is en
    assert store.lookup(b"k", [(b"accept-language", b"fr")])[0] is fr
    assert store.lookup(b"k", [(b"accept-language", b"de")]) == (None, "vary-miss")
    # The URI starts varying on something else: the old variants cannot be selected any more.
    other = store_body(store, b"k", [b"gz"], vary=((b"accept-encoding",), (b"gzip",)))
    assert len(store) == 1 and store.lookup(b"k", [(b"accept-encoding", b"gzip")])[0] is other


def test_variants_per_uri_are_capped(tmp_path):
    store = make_store(tmp_path, entries=1000)
    names = (b"x",)
    for i in range(MAX_VARIANTS + 5):
        store_body(store, b"k", [b"v"], vary=(names, (b"%d" % i,)))
    assert len(store) == MAX_VARIANTS
    assert store.lookup(b"k", [(b"x", b"0")]) == (None, "vary-miss")
    assert store.lookup(b"k", [(b"x", b"%d" % (MAX_VARIANTS + 4))])[0] is not None


def test_invalidate_and_clear(tmp_path):
    store = make_store(tmp_path, memory=0)
    store_body(store, b"a", [b"1"])
    store_body(store, b"b", [b"2"])
    store.invalidate(b"a")
    assert store.lookup(b"a", [])[0] is None and len(files(store)) == 1
    store.clear()
    assert len(store) == 0 and files(store) == []


def test_start_removes_only_our_files(tmp_path):
    directory = tmp_path / "cache"
    directory.mkdir()
    for name in ("0123456789abcdef-1.cache", "0123456789abcdef-2.part", "keep.txt", "0123-1.cache", "config.toml"):
        (directory / name).write_text("x")
    make_store(tmp_path)
    assert sorted(os.listdir(directory)) == ["0123-1.cache", "config.toml", "keep.txt"]


def test_two_stores_never_collide(tmp_path):
    first = make_store(tmp_path, memory=0)
    second = make_store(tmp_path, memory=0)
    a = store_body(first, b"k", [b"first"])
    b = store_body(second, b"k", [b"second"])
    assert a.path != b.path
    second.clear()
    assert read_all(first, a) == b"first"


def test_reading_a_file_entry_streams_from_one_descriptor(tmp_path):
    store = make_store(tmp_path, memory=0)
    entry = store_body(store, b"k", [b"abcdefghij" * 100])
    source = store.open_body(entry)
    os.unlink(entry.path)  # evicted while being served: the open descriptor still reads it
    data = b""
    while chunk := source.read(64):
        data += chunk
    source.close()
    assert data == b"abcdefghij" * 100


def test_closed_store_keeps_no_late_responses(tmp_path):
    store = make_store(tmp_path, memory=0)
    writer = store.writer(None)
    writer.write(b"late body")  # a response still streaming when a reload replaced the state
    store.close()
    body, path, size, digest = writer.finish()
    store.insert(Entry(b"k", (), (), 200, [], 0.0, 0.0, 0.0, 60.0, size, digest, body, path))
    assert len(store) == 0 and files(store) == []


def test_each_worker_empties_only_its_own_folder(tmp_path, monkeypatch):
    # rpxy --workers N: a restarted worker must not delete the files other workers serve.
    monkeypatch.setenv("RPXY_WORKER", "0")
    first = make_store(tmp_path, memory=0)
    assert first.directory == str(tmp_path / "cache" / "worker-0")
    entry = store_body(first, b"key-0", [b"x" * 500])
    assert entry is not None
    files_of_worker_0 = set(os.listdir(first.directory))
    assert files_of_worker_0
    monkeypatch.setenv("RPXY_WORKER", "1")
    second = make_store(tmp_path, memory=0)  # worker 1 (re)starts and empties its folder
    assert second.directory == str(tmp_path / "cache" / "worker-1")
    assert set(os.listdir(first.directory)) == files_of_worker_0
