"""Routing through the real proxy: Host -> app, path -> route, 400/404/503/301.

One proxy process (module scope) serves several apps on one port; the default_app and
public_https_port variants get their own small proxies. Origins answer /echo with their
name and exactly what they received, so each test checks which route was taken and
what the upstream request looked like.
"""

from __future__ import annotations

import pytest

from tests.integration.conftest import Origin, Rpxy, curl, free_port, raw_request
from tests.support.certs import write_self_signed
from tests.support.http import echo_json, get_header, header_values, parse_curl_include, parse_response


@pytest.fixture(scope="module")
def origins():
    started = []
    try:
        for name in ("a", "b", "c"):
            started.append(Origin(name))
        yield {origin.name: origin for origin in started}
    finally:
        for origin in started:
            origin.stop()


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    return write_self_signed(tmp_path_factory.mktemp("certs"), "secure.example.com")


@pytest.fixture(scope="module")
def proxy(origins, certs, tmp_path_factory):
    a, b, c = (origins[n].location for n in "abc")
    cert, key = certs
    tls_port = free_port()
    config = f"""
        listen_port = {{port}}
        listen_port_tls = {tls_port}
        listen_address_v4 = "127.0.0.1"

        [apps.app_a]
        server_name = "a.example.com"
        [[apps.app_a.reverse_proxy]]
        upstream = [{{ location = "{a}" }}]
        [[apps.app_a.reverse_proxy]]
        path = "/foo"
        upstream = [{{ location = "{b}" }}]
        [[apps.app_a.reverse_proxy]]
        path = "/foo/bar"
        upstream = [{{ location = "{c}" }}]
        [[apps.app_a.reverse_proxy]]
        path = "/path/another"
        replace_path = "/path"
        upstream = [{{ location = "{b}" }}]
        [[apps.app_a.reverse_proxy]]
        path = "/subapp1"
        replace_path = "/"
        upstream = [{{ location = "{c}" }}]

        [apps.app_b]
        server_name = "b.example.com"
        reverse_proxy = [{{ upstream = [{{ location = "{b}" }}] }}]

        [apps.wildcard]
        server_name = "*.example.com"
        reverse_proxy = [{{ upstream = [{{ location = "{c}" }}] }}]

        [apps.nodefault]
        server_name = "nodefault.test"
        reverse_proxy = [{{ path = "/only", upstream = [{{ location = "{a}" }}] }}]

        [apps.secure]
        server_name = "secure.example.com"
        tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}" }}
        reverse_proxy = [{{ upstream = [{{ location = "{a}" }}] }}]

        [apps.noredirect]
        server_name = "noredirect.example.org"
        tls = {{ https_redirection = false, tls_cert_path = "{cert}", tls_cert_key_path = "{key}" }}
        reverse_proxy = [{{ upstream = [{{ location = "{b}" }}] }}]
    """
    proxy = Rpxy(tmp_path_factory.mktemp("routing"), config)
    proxy.tls_port = tls_port
    yield proxy
    proxy.stop()


def echo(proxy: Rpxy, host: str, path: str, *extra: str) -> dict:
    result = curl("--path-as-is", "-H", f"Host: {host}", *extra, proxy.url + path)
    assert result.returncode == 0, result.stderr
    return echo_json(result.stdout)


def status_of(proxy: Rpxy, host: str | None, path: str = "/echo") -> tuple[int, list, bytes]:
    host_line = b"" if host is None else b"Host: " + host.encode() + b"\r\n"
    raw = raw_request(proxy.port, b"GET " + path.encode() + b" HTTP/1.1\r\n" + host_line + b"Connection: close\r\n\r\n")
    return parse_response(raw)


# -- host -> app -------------------------------------------------------------------


def test_apps_selected_by_host_on_one_port(proxy):
    assert echo(proxy, "a.example.com", "/echo")["origin"] == "a"
    assert echo(proxy, "b.example.com", "/echo")["origin"] == "b"
    assert echo(proxy, "a.example.com", "/echo")["origin"] == "a"


def test_host_with_port_and_upper_case(proxy):
    data = echo(proxy, "A.Example.COM:8080", "/echo")
    assert data["origin"] == "a"
    # The client's Host goes upstream unchanged; X-Forwarded-Host carries it too.
    assert header_values(data, "host") == ["A.Example.COM:8080"]
    assert header_values(data, "x-forwarded-host") == ["A.Example.COM:8080"]
    assert echo(proxy, "B.EXAMPLE.COM.", "/echo")["origin"] == "b"


def test_absolute_form_uri_selects_the_app(proxy):
    raw = raw_request(
        proxy.port,
        b"GET http://b.example.com/echo?q=1 HTTP/1.1\r\nHost: b.example.com\r\nConnection: close\r\n\r\n",
    )
    status, _headers, body = parse_response(raw)
    assert status == 200
    data = echo_json(body)
    assert data["origin"] == "b"
    assert data["uri"] == "/echo?q=1"  # origin-form upstream
    # Absolute form alone (the Host header names nothing else) routes by the authority.
    raw = raw_request(
        proxy.port,
        b"GET http://a.example.com:80/echo HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n",
    )
    status, _headers, body = parse_response(raw)
    assert status == 200
    assert echo_json(body)["origin"] == "a"


def test_absolute_form_authority_differs_from_host_is_400(proxy):
    raw = raw_request(
        proxy.port,
        b"GET http://b.example.com/echo HTTP/1.1\r\nHost: a.example.com\r\nConnection: close\r\n\r\n",
    )
    status, headers, body = parse_response(raw)
    assert status == 400
    assert body == b""


def test_unknown_host_without_default_app_is_503(proxy, origins):
    status, headers, body = status_of(proxy, "unknown.test")
    assert status == 503
    assert body == b""
    assert get_header(headers, "server") == ["rpxy"]
    # Wildcards cover exactly one label: neither the bare domain nor two labels.
    assert status_of(proxy, "example.com")[0] == 503
    assert status_of(proxy, "x.y.example.com")[0] == 503


def test_two_hosts_or_no_host_is_400(proxy):
    raw = raw_request(
        proxy.port,
        b"GET /echo HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(raw)[0] == 400
    # Two identical Host headers are still two.
    raw = raw_request(
        proxy.port,
        b"GET /echo HTTP/1.1\r\nHost: a.example.com\r\nHost: a.example.com\r\nConnection: close\r\n\r\n",
    )
    assert parse_response(raw)[0] == 400
    assert status_of(proxy, None)[0] == 400
    raw = raw_request(proxy.port, b"GET /echo HTTP/1.0\r\n\r\n")
    assert parse_response(raw)[0] == 400


def test_wildcard_app_versus_exact_app(proxy):
    # Exact names win over the wildcard; any other single label goes to the wildcard app.
    assert echo(proxy, "a.example.com", "/echo")["origin"] == "a"
    assert echo(proxy, "b.example.com", "/echo")["origin"] == "b"
    data = echo(proxy, "Other.Example.com", "/echo")
    assert data["origin"] == "c"
    assert header_values(data, "host") == ["Other.Example.com"]


# -- path -> route ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "origin", "upstream_uri"),
    [
        ("/echo", "a", "/echo"),  # default route
        ("/foo", "b", "/foo"),
        ("/foo/", "b", "/foo/"),
        ("/foo/x?y=1", "b", "/foo/x?y=1"),
        ("/foobar", "a", "/foobar"),  # not on a segment boundary: default route
        ("/foo/bar", "c", "/foo/bar"),  # the deeper route wins
        ("/foo/bar/baz?q", "c", "/foo/bar/baz?q"),
        ("/foo/barbaz", "b", "/foo/barbaz"),
        ("/FOO", "a", "/FOO"),  # case-sensitive
    ],
)
def test_segment_aware_longest_prefix(proxy, path, origin, upstream_uri):
    data = echo(proxy, "a.example.com", path)
    assert (data["origin"], data["uri"]) == (origin, upstream_uri)


@pytest.mark.parametrize(
    ("path", "origin", "upstream_uri"),
    [
        # The two examples of rpxy's README.
        ("/path/another/xx?query=ng", "b", "/path/xx?query=ng"),
        ("/path/to?query=ok", "a", "/path/to?query=ok"),
        ("/subapp1", "c", "/"),
        ("/subapp1/", "c", "/"),
        ("/subapp1/x/y?z=1", "c", "/x/y?z=1"),
        ("/subapp1?z=1", "c", "/?z=1"),
        ("/subapp10", "a", "/subapp10"),
    ],
)
def test_replace_path(proxy, path, origin, upstream_uri):
    data = echo(proxy, "a.example.com", path)
    assert (data["origin"], data["uri"]) == (origin, upstream_uri)
    # The client's original target is what X-Original-URI reports.
    assert header_values(data, "x-original-uri") == [path]


def test_no_matching_path_without_default_route_is_404(proxy):
    status, headers, body = status_of(proxy, "nodefault.test", "/other")
    assert (status, body) == (404, b"")
    assert status_of(proxy, "nodefault.test", "/onlyx")[0] == 404
    assert status_of(proxy, "nodefault.test", "/")[0] == 404
    data = echo(proxy, "nodefault.test", "/only/echo")
    assert (data["origin"], data["uri"]) == ("a", "/only/echo")


# -- https redirection ------------------------------------------------------------------


def _curl_head(proxy: Rpxy, host: str, path: str) -> tuple[int, list, bytes]:
    result = curl("-i", "--path-as-is", "-H", f"Host: {host}", proxy.url + path)
    assert result.returncode == 0, result.stderr
    return parse_curl_include(result.stdout)


def test_https_redirect_to_listen_port_tls(proxy):
    status, headers, body = _curl_head(proxy, "Secure.Example.com:1234", "/some/path?a=1&b=2")
    assert status == 301
    assert get_header(headers, "location") == [f"https://secure.example.com:{proxy.tls_port}/some/path?a=1&b=2"]
    assert body == b""
    status, headers, _ = _curl_head(proxy, "secure.example.com", "/")
    assert (status, get_header(headers, "location")) == (301, [f"https://secure.example.com:{proxy.tls_port}/"])


def test_https_redirection_false_proxies_cleartext(proxy):
    data = echo(proxy, "noredirect.example.org", "/echo?x=1")
    assert (data["origin"], data["uri"]) == ("b", "/echo?x=1")


@pytest.fixture(scope="module")
def fallback_proxy(origins, certs, tmp_path_factory):
    """default_app set, public_https_port = 443."""
    cert, key = certs
    config = f"""
        listen_port = {{port}}
        listen_port_tls = {free_port()}
        public_https_port = 443
        listen_address_v4 = "127.0.0.1"
        default_app = "FallBack"

        [apps.fallback]
        server_name = "fallback.example.org"
        reverse_proxy = [{{ upstream = [{{ location = "{origins['b'].location}" }}] }}]

        [apps.secure]
        server_name = "secure.example.com"
        tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}" }}
        reverse_proxy = [{{ upstream = [{{ location = "{origins['a'].location}" }}] }}]
    """
    proxy = Rpxy(tmp_path_factory.mktemp("fallback"), config)
    yield proxy
    proxy.stop()


def test_unknown_host_goes_to_default_app_with_its_server_name(fallback_proxy):
    data = echo(fallback_proxy, "Unknown.test:81", "/echo?x=1")
    assert (data["origin"], data["uri"]) == ("b", "/echo?x=1")
    assert header_values(data, "host") == ["fallback.example.org"]
    assert header_values(data, "x-forwarded-host") == ["Unknown.test:81"]
    # A known host still goes to its own app.
    status, headers, _ = _curl_head(fallback_proxy, "secure.example.com", "/x")
    assert status == 301
    assert get_header(headers, "location") == ["https://secure.example.com/x"]  # port 443 omitted


def test_https_redirection_port_alias(origins, certs, tmp_path):
    cert, key = certs
    config = f"""
        listen_port = {{port}}
        listen_port_tls = {free_port()}
        https_redirection_port = 8443
        listen_address_v4 = "127.0.0.1"
        [apps.secure]
        server_name = "secure.example.com"
        tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}" }}
        reverse_proxy = [{{ upstream = [{{ location = "{origins['a'].location}" }}] }}]
    """
    proxy = Rpxy(tmp_path, config)
    try:
        status, headers, _ = _curl_head(proxy, "secure.example.com", "/p?q=1")
        assert status == 301
        assert get_header(headers, "location") == ["https://secure.example.com:8443/p?q=1"]
        assert "https_redirection_port is deprecated" in proxy.system_log()
    finally:
        proxy.stop()


def test_options_asterisk_goes_to_the_default_route_unchanged(rpxy_factory, origin):
    """``OPTIONS * HTTP/1.1`` addresses the server, not a path: it takes the app's default route."""
    proxy = rpxy_factory(
        f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        [apps.a]
        server_name = "a.test"
        reverse_proxy = [{{ upstream = [{{ location = "{origin.location}" }}] }}]
        """
    )
    answer = raw_request(proxy.port, b"OPTIONS * HTTP/1.1\r\nHost: a.test\r\nConnection: close\r\n\r\n")
    # twisted.web answers OPTIONS * itself with an empty 200; rpxy alone would have said 404.
    assert answer.startswith(b"HTTP/1.1 200 ")
    assert any(" OPTIONS * HTTP/1.1 -- 200 OK -- " in line for line in proxy.access_lines())
