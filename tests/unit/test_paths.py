"""split_path_query and replace_path rewriting."""

from __future__ import annotations

import pytest

from rpxy.policy.paths import rewrite_path, split_path_query
from rpxy.routing import PathRouter


@pytest.mark.parametrize(
    ("target", "path", "query"),
    [
        (b"/", b"/", b""),
        (b"/a/b", b"/a/b", b""),
        (b"/a?x=1", b"/a", b"?x=1"),
        (b"/a?", b"/a", b"?"),
        (b"/a?x=1?y=2", b"/a", b"?x=1?y=2"),
        (b"/?", b"/", b"?"),
        (b"", b"", b""),
    ],
)
def test_split_path_query(target: bytes, path: bytes, query: bytes) -> None:
    assert split_path_query(target) == (path, query)
    assert path + query == target


@pytest.mark.parametrize(
    ("target", "prefix", "replace", "expected"),
    [
        # replace_path None: untouched, whatever the prefix
        (b"/foo/x?q=1", b"/foo", None, b"/foo/x?q=1"),
        (b"/", b"/", None, b"/"),
        # the reference example
        (b"/path/another/xx?q=1", b"/path/another", b"/path", b"/path/xx?q=1"),
        (b"/path/another", b"/path/another", b"/path", b"/path"),
        (b"/path/another/", b"/path/another", b"/path", b"/path/"),
        (b"/path/another?q", b"/path/another", b"/path", b"/path?q"),
        # replace with "/": never '//'
        (b"/subapp1/x", b"/subapp1", b"/", b"/x"),
        (b"/subapp1", b"/subapp1", b"/", b"/"),
        (b"/subapp1/", b"/subapp1", b"/", b"/"),
        (b"/subapp1?a", b"/subapp1", b"/", b"/?a"),
        (b"/subapp1/?a", b"/subapp1", b"/", b"/?a"),
        (b"/subapp1/x/y?z", b"/subapp1", b"/", b"/x/y?z"),
        # replacement ending with a slash
        (b"/old/x", b"/old", b"/new/", b"/new/x"),
        (b"/old", b"/old", b"/new/", b"/new/"),
        (b"/old?q", b"/old", b"/new/", b"/new/?q"),
        # prefix written with a trailing slash
        (b"/foo/x", b"/foo/", b"/bar", b"/bar/x"),
        (b"/foo/", b"/foo/", b"/bar", b"/bar/"),
        (b"/foo/?q", b"/foo/", b"/bar", b"/bar/?q"),
        (b"/foo/x", b"/foo/", b"/", b"/x"),
        (b"/foo/x", b"/foo/", b"/bar/", b"/bar/x"),
        # the default route "/" with a replacement: prefix the whole path
        (b"/x", b"/", b"/app", b"/app/x"),
        (b"/", b"/", b"/app", b"/app/"),
        (b"/?q", b"/", b"/app", b"/app/?q"),
        (b"/x", b"/", b"/", b"/x"),
        # deeper replacement
        (b"/a/b", b"/a", b"/x/y/z", b"/x/y/z/b"),
        # the client's own double slash after the prefix is preserved
        (b"/subapp1//x", b"/subapp1", b"/", b"//x"),
        # empty replacement behaves as "/"
        (b"/subapp1/x", b"/subapp1", b"", b"/x"),
    ],
)
def test_rewrite_path(target: bytes, prefix: bytes, replace: bytes | None, expected: bytes) -> None:
    assert rewrite_path(target, prefix, replace) == expected


@pytest.mark.parametrize(
    ("route", "replace", "target"),
    [
        ("/a", "/", b"/a"),
        ("/a", "/", b"/a/"),
        ("/a", "/", b"/a/b/c?d"),
        ("/a/", "/", b"/a/"),
        ("/a/", "/b/", b"/a/b"),
        (None, "/", b"/"),
        (None, "/r/", b"/x"),
        ("/a", "/b", b"/a?"),
    ],
)
def test_no_double_slash_from_router_prefixes(route: str | None, replace: str, target: bytes) -> None:
    path, _ = split_path_query(target)
    match = PathRouter([(route, 1)]).lookup(path)
    assert match is not None
    out = rewrite_path(target, match[0], replace.encode())
    assert b"//" not in out
    assert out.startswith(b"/")
