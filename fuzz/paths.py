"""Routing by path prefix and ``replace_path``, against a plain reference.

Properties: both lookup strategies of PathRouter (linear for few routes, the slash
walk for many) return what the definition says (the longest prefix on a segment
boundary); rewrite_path keeps the request's remainder and never doubles or drops the
slash at the join.
"""

from __future__ import annotations

import atheris

with atheris.instrument_imports(include=["rpxy"]):
    from rpxy import routing
    from rpxy.policy.paths import rewrite_path, split_path_query
    from rpxy.routing import PathRouter

from fuzz.runner import run

ALPHABET = b"/ab.%?"


def _path(fdp: atheris.FuzzedDataProvider, size: int) -> bytes:
    raw = fdp.ConsumeBytes(size)
    return b"/" + bytes(ALPHABET[byte % len(ALPHABET)] for byte in raw)


def reference(prefixes: list[bytes], path: bytes) -> bytes | None:
    best = None
    for prefix in prefixes:
        if path.startswith(prefix) and (prefix.endswith(b"/") or len(path) == len(prefix) or path[len(prefix)] == 0x2F):
            if best is None or len(prefix) > len(best):
                best = prefix
    return best


def test_one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    count = fdp.ConsumeIntInRange(1, 12)
    prefixes = sorted({_path(fdp, fdp.ConsumeIntInRange(0, 6)).split(b"?")[0] for _ in range(count)})
    path = _path(fdp, fdp.ConsumeIntInRange(0, 12)).split(b"?")[0]
    query = b"?" + fdp.ConsumeBytes(4) if fdp.ConsumeBool() else b""
    entries = [(p.decode("latin-1"), p) for p in prefixes]
    expected = reference(prefixes, path)
    linear_limit = routing._LINEAR_LIMIT
    for limit in (10**6, 0):  # the linear strategy, then the walk
        routing._LINEAR_LIMIT = limit
        try:
            router = PathRouter(entries)
        finally:
            routing._LINEAR_LIMIT = linear_limit
        found = router.lookup(path)
        got = found[0] if found else None
        if got != expected:
            raise AssertionError(f"lookup({path!r}) in {prefixes!r}: {got!r}, expected {expected!r} (limit {limit})")
    if expected is None:
        return
    replace = _path(fdp, fdp.ConsumeIntInRange(0, 5)).split(b"?")[0] if fdp.ConsumeBool() else b"/"
    rewritten = rewrite_path(path + query, expected, replace)
    new_path, new_query = split_path_query(rewritten)
    if new_query != query:
        raise AssertionError(f"query changed: {query!r} -> {new_query!r}")
    if not new_path.startswith(b"/"):
        raise AssertionError(f"rewrite {path!r} ({expected!r} -> {replace!r}) = {rewritten!r}: not absolute")
    if b"//" in new_path and b"//" not in path and b"//" not in replace:
        raise AssertionError(f"rewrite {path!r} ({expected!r} -> {replace!r}) = {rewritten!r}: doubled slash")
    if not new_path.endswith(path[len(expected) :]):
        raise AssertionError(f"rewrite {path!r} ({expected!r} -> {replace!r}) = {rewritten!r}: remainder lost")

if __name__ == "__main__":
    run(test_one_input)
