"""SniContextMap lookups and maintenance, without handshakes."""

from __future__ import annotations


import pytest

from rpxy.config.model import AppConfig, TlsConfig
from rpxy.tls import SniContextMap
from rpxy.tls.names import display_name, matches_server_name, normalize_server_name


from tests.support.tlsgen import Authority, app_config, make_app_tls  # noqa: E402


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    d = tmp_path_factory.mktemp("sni")
    ca = Authority("sni CA")
    entries = {
        "exact": make_app_tls(d, ca, "exact", "www.example.com"),
        "wild": make_app_tls(d, ca, "wild", "*.example.com", names=("*.example.com",)),
        "apex": make_app_tls(d, ca, "apex", "example.com"),
        "deep": make_app_tls(d, ca, "deep", "*.eu.example.com", names=("*.eu.example.com",)),
    }
    return ca, d, entries


@pytest.fixture
def contexts(built) -> SniContextMap:
    return SniContextMap(built[2].values())


@pytest.mark.parametrize(
    ("name", "app"),
    [
        (b"www.example.com", "exact"),
        ("WWW.Example.COM.", "exact"),
        (b"shop.example.com", "wild"),
        (b"example.com", "apex"),
        (b"x.eu.example.com", "deep"),  # the longer wildcard is a different suffix
        (b"eu.example.com", "wild"),
        (b"a.b.example.com", None),  # one label only
        (b".example.com", None),
        (b"example.org", None),
        (b"", None),
        (None, None),
        ("bücher.example.com".encode(), None),
    ],
)
def test_lookup(contexts, name, app):
    entry = contexts.lookup(name)
    assert (entry.app_name if entry else None) == app


def test_replace_and_remove(contexts, built):
    ca, d, entries = built
    new_wild = make_app_tls(d / "again", ca, "wild", "*.example.com", names=("*.example.com",))
    assert contexts.replace(new_wild) is entries["wild"]
    assert contexts.lookup(b"a.example.com") is new_wild
    assert contexts.get("wild") is new_wild
    assert contexts.remove("wild") is new_wild
    assert contexts.lookup(b"a.example.com") is None
    assert "wild" not in contexts and len(contexts) == 3


def test_replace_with_a_new_server_name(contexts, built):
    ca, d, _ = built
    renamed = make_app_tls(d / "renamed", ca, "apex", "example.net")
    contexts.replace(renamed)
    assert contexts.lookup(b"example.com") is None
    assert contexts.lookup(b"example.net") is renamed


def test_duplicates_refused(contexts, built):
    ca, d, entries = built
    with pytest.raises(ValueError, match="already has"):
        contexts.add(entries["exact"])
    other = make_app_tls(d / "dup", ca, "other", "www.example.com")
    with pytest.raises(ValueError, match="duplicate"):
        contexts.add(other)


def test_from_apps_skips_apps_without_files(built):
    ca, d, _ = built
    cert, key = ca.issue("site.test").write(d, "site")
    apps = [
        app_config("site", "site.test", cert, key),
        AppConfig(name="plain", server_name="plain.test", reverse_proxy=()),
        AppConfig(name="acme", server_name="acme.test", reverse_proxy=(), tls=TlsConfig(acme=True)),
    ]
    contexts = SniContextMap.from_apps(apps)
    assert [e.app_name for e in contexts] == ["site"]
    assert contexts.get("site").source.cert_path == str(cert)


def test_names_helpers():
    assert normalize_server_name(b"A.Example.") == "a.example"
    assert normalize_server_name(".") is None
    assert normalize_server_name("ü.test") is None
    assert matches_server_name("*.a.test", "x.a.test")
    assert not matches_server_name("*.a.test", "a.test")
    assert display_name(b"a\\b\x00") == "a\\x5cb\\x00"
    assert display_name(b"x" * 300).endswith("...")
