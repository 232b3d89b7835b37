"""Host and path routing tables."""

from __future__ import annotations

import pytest

from rpxy.routing import HostRouter, PathRouter

# ------------------------------------------------------------------ HostRouter

HOSTS = HostRouter(
    [
        ("example.com", "apex"),
        ("*.example.com", "wild"),
        ("www.example.com", "www"),
        ("192.0.2.1", "ipv4"),
        ("*.b.example.org", "deep-wild"),
    ]
)


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("example.com", "apex"),
        ("www.example.com", "www"),  # exact beats wildcard
        ("a.example.com", "wild"),
        ("xn--bcher-kva.example.com", "wild"),
        ("a.b.example.com", None),  # wildcard covers exactly one label
        ("example.org", None),
        ("b.example.org", None),  # *.b.example.org does not cover b.example.org itself
        ("x.b.example.org", "deep-wild"),
        ("y.x.b.example.org", None),
        ("192.0.2.1", "ipv4"),
        ("192.0.2.2", None),
        ("", None),
        (".example.com", None),  # empty first label
        ("::1", None),
        ("notexample.com", None),
        ("com", None),
    ],
)
def test_host_lookup(host: str, expected: str | None) -> None:
    assert HOSTS.lookup(host) == expected


def test_host_lookup_without_wildcards_is_exact_only() -> None:
    router = HostRouter([("example.com", 1)])
    assert router.lookup("example.com") == 1
    assert router.lookup("a.example.com") is None
    assert len(router) == 1


@pytest.mark.parametrize(
    "entries",
    [
        [("example.com", 1), ("example.com", 2)],
        [("*.example.com", 1), ("*.example.com", 2)],
        [("*.", 1)],
        [("a.*.example.com", 1)],
        [("*.*.example.com", 1)],
    ],
)
def test_host_router_rejects_bad_tables(entries: list[tuple[str, int]]) -> None:
    with pytest.raises(ValueError):
        HostRouter(entries)


# ------------------------------------------------------------------ PathRouter

ROUTES: list[tuple[str | None, str]] = [
    (None, "default"),
    ("/foo", "foo"),
    ("/foo/bar", "foobar"),
    ("/api/", "api-slash"),
    ("/path/another", "another"),
    ("/CaSe", "case"),
]

# (path, expected matched prefix or None, expected value)
PATH_CASES = [
    (b"/", b"/", "default"),
    (b"/index.html", b"/", "default"),
    (b"/foo", b"/foo", "foo"),
    (b"/foo/", b"/foo", "foo"),
    (b"/foo/x", b"/foo", "foo"),
    (b"/foo/x/y", b"/foo", "foo"),
    (b"/foobar", b"/", "default"),  # not on a segment boundary
    (b"/foo.html", b"/", "default"),
    (b"/foo/bar", b"/foo/bar", "foobar"),
    (b"/foo/bar/", b"/foo/bar", "foobar"),
    (b"/foo/bar/baz", b"/foo/bar", "foobar"),
    (b"/foo/barbaz", b"/foo", "foo"),
    (b"/foo//bar", b"/foo", "foo"),
    (b"/api/", b"/api/", "api-slash"),
    (b"/api/v1", b"/api/", "api-slash"),
    (b"/api", b"/", "default"),  # trailing-slash prefix does not match without it
    (b"/apix", b"/", "default"),
    (b"/path/another", b"/path/another", "another"),
    (b"/path/another/xx", b"/path/another", "another"),
    (b"/path", b"/", "default"),
    (b"/CaSe/x", b"/CaSe", "case"),
    (b"/case/x", b"/", "default"),  # case-sensitive
    (b"/FOO", b"/", "default"),
    (b"/%66oo", b"/", "default"),  # no percent-decoding
]


def _padded(routes: list[tuple[str | None, str]]) -> list[tuple[str | None, str]]:
    # Enough unrelated routes to switch the router to its segment-walk strategy.
    return routes + [(f"/zz{i}", f"zz{i}") for i in range(12)]


@pytest.fixture(params=["linear", "walk"])
def router(request: pytest.FixtureRequest) -> PathRouter[str]:
    if request.param == "linear":
        return PathRouter(ROUTES)
    return PathRouter(_padded(ROUTES))


@pytest.mark.parametrize(("path", "prefix", "value"), PATH_CASES)
def test_path_lookup(router: PathRouter[str], path: bytes, prefix: bytes, value: str) -> None:
    assert router.lookup(path) == (prefix, value)


@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        (b"/foo", (b"/foo", "foo")),
        (b"/foo/x", (b"/foo", "foo")),
        (b"/foobar", None),
        (b"/", None),
        (b"", None),
        (b"*", None),
        (b"/bar/foo", None),
        (b"/sub/", (b"/sub/", "sub")),
        (b"/sub/a", (b"/sub/", "sub")),
        (b"/sub", None),
    ],
)
def test_path_lookup_without_default_route(padded: bool, path: bytes, expected: object) -> None:
    routes: list[tuple[str | None, str]] = [("/foo", "foo"), ("/sub/", "sub")]
    router = PathRouter(_padded(routes) if padded else routes)
    assert router.lookup(path) == expected


@pytest.mark.parametrize("padded", [False, True])
def test_path_slash_and_no_slash_prefixes_coexist(padded: bool) -> None:
    routes: list[tuple[str | None, str]] = [("/foo", "bare"), ("/foo/", "slash")]
    router = PathRouter(_padded(routes) if padded else routes)
    assert router.lookup(b"/foo") == (b"/foo", "bare")
    assert router.lookup(b"/foo/") == (b"/foo/", "slash")
    assert router.lookup(b"/foo/x") == (b"/foo/", "slash")


def test_explicit_root_route_equals_default() -> None:
    router = PathRouter([("/", "root")])
    assert router.lookup(b"/anything/at/all") == (b"/", "root")
    assert len(router) == 1


def test_falsy_values_are_returned() -> None:
    router = PathRouter([(None, 0)])
    assert router.lookup(b"/x") == (b"/", 0)
    walk = PathRouter([(None, 0)] + [(f"/zz{i}", i + 1) for i in range(12)])
    assert walk.lookup(b"/x") == (b"/", 0)


@pytest.mark.parametrize(
    "entries",
    [
        [(None, 1), ("/", 2)],  # two default routes
        [("/a", 1), ("/a", 2)],
        [("relative", 1)],
    ],
)
def test_path_router_rejects_bad_tables(entries: list[tuple[str | None, int]]) -> None:
    with pytest.raises(ValueError):
        PathRouter(entries)
