"""Load balancing through the real proxy: each origin's /echo names it, so every answer
says which upstream the proxy picked.

Health-check tests poll in bounded loops (never asserting on how long a transition
took) with interval = 1 s and thresholds of 1.
"""

from __future__ import annotations

import base64
import re
import time
from collections import Counter
from email.utils import parsedate_to_datetime

import pytest

from tests.integration.conftest import Origin, Rpxy, curl
from tests.support.http import echo_json, header_values, parse_curl_include

STICKY_SECRET = base64.urlsafe_b64encode(bytes(range(32))).rstrip(b"=").decode()
STICKY_HOST = "sticky.example.com"
COOKIE_RE = re.compile(
    r"rpxy_sticky_token=([A-Za-z0-9_-]+); expires=([A-Z][a-z]{2}, \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT); "
    r"Max-Age=300; path=(/[^;]*); domain=([^;]+); HttpOnly; SameSite=Lax"
)
HEALTH = (
    '{{ type = "{kind}", path = "/health", interval = 1, timeout = 0.5, '
    "unhealthy_threshold = 1, healthy_threshold = 1 }}"
)


@pytest.fixture(scope="module")
def origins():
    started = []
    try:
        for name in ("a", "b", "c"):
            started.append(Origin(name))
        yield started
    finally:
        for origin in started:
            origin.stop()


@pytest.fixture(scope="module")
def proxy(origins, tmp_path_factory):
    ups = ", ".join(f'{{ location = "{o.location}" }}' for o in origins)
    two = ", ".join(f'{{ location = "{o.location}" }}' for o in origins[:2])
    config = f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        sticky_cookie_secret = "{STICKY_SECRET}"
        [apps.rr]
        server_name = "rr.test"
        reverse_proxy = [{{ upstream = [{ups}], load_balance = "round_robin" }}]
        [apps.random]
        server_name = "random.test"
        reverse_proxy = [{{ upstream = [{ups}], load_balance = "random" }}]
        [apps.none]
        server_name = "none.test"
        reverse_proxy = [{{ upstream = [{ups}], load_balance = "none" }}]
        [apps.default]
        server_name = "default.test"
        reverse_proxy = [{{ upstream = [{ups}] }}]
        [apps.sticky]
        server_name = "{STICKY_HOST}"
        [[apps.sticky.reverse_proxy]]
        upstream = [{two}]
        load_balance = "sticky"
        [[apps.sticky.reverse_proxy]]
        path = "/sub"
        upstream = [{two}]
        load_balance = "sticky"
    """
    proxy = Rpxy(tmp_path_factory.mktemp("lb"), config)
    yield proxy
    proxy.stop()


def origin_of(proxy: Rpxy, host: str, path: str = "/echo", *extra: str) -> str:
    result = curl("-H", f"Host: {host}", *extra, proxy.url + path)
    assert result.returncode == 0, result.stderr
    return echo_json(result.stdout)["origin"]


def test_round_robin_alternates_exactly(proxy):
    seen = [origin_of(proxy, "rr.test") for _ in range(9)]
    start = "abc".index(seen[0])
    assert seen == [("a", "b", "c")[(start + i) % 3] for i in range(9)]


def test_random_uses_every_upstream(proxy):
    counts = Counter(origin_of(proxy, "random.test") for _ in range(45))
    assert set(counts) == {"a", "b", "c"}, counts


@pytest.mark.parametrize("host", ["none.test", "default.test"])
def test_none_always_first(proxy, host):
    assert {origin_of(proxy, host) for _ in range(8)} == {"a"}


# -- sticky -------------------------------------------------------------------------------


def sticky_get(proxy: Rpxy, path: str = "/echo", *extra: str) -> tuple[dict, list[str]]:
    """One request to the sticky app by name (so curl's cookie engine applies); (echo, Set-Cookies)."""
    url = f"http://{STICKY_HOST}:{proxy.port}{path}"
    result = curl("-i", "--resolve", f"{STICKY_HOST}:{proxy.port}:127.0.0.1", *extra, url)
    assert result.returncode == 0, result.stderr
    status, headers, body = parse_curl_include(result.stdout)
    assert status == 200, result.stdout
    return echo_json(body), [value for name, value in headers if name == "set-cookie"]


def test_sticky_sessions_with_a_cookie_jar(proxy, tmp_path):
    jar = tmp_path / "jar.txt"
    cookie_args = ("-b", str(jar), "-c", str(jar))
    first, cookies = sticky_get(proxy, "/echo", *cookie_args)
    assert len(cookies) == 1, cookies
    match = COOKIE_RE.fullmatch(cookies[0])
    assert match is not None, cookies[0]
    token, expires, path, domain = match.groups()
    assert (path, domain) == ("/", STICKY_HOST)
    lifetime = parsedate_to_datetime(expires).timestamp() - time.time()
    assert 240 < lifetime <= 301, expires
    assert "Secure" not in cookies[0]
    assert jar.read_text().count("rpxy_sticky_token") == 1  # curl accepted it

    pinned = first["origin"]
    for _ in range(8):
        data, more = sticky_get(proxy, "/echo", *cookie_args)
        assert data["origin"] == pinned
        assert more == []  # a valid cookie is not re-issued
        # The sticky cookie never reaches the origin.
        assert not any("rpxy_sticky_token" in v for v in header_values(data, "cookie")), data["headers"]

    # Without the cookie the same route round-robins (so the pinning above was the cookie's doing).
    fresh = {sticky_get(proxy, "/echo")[0]["origin"] for _ in range(4)}
    assert fresh == {"a", "b"}

    # Other cookies in the same header still go upstream, without ours.
    data, more = sticky_get(proxy, "/echo", "-H", f"Cookie: x=1; rpxy_sticky_token={token}; y=2")
    assert data["origin"] == pinned and more == []
    assert header_values(data, "cookie") == ["x=1; y=2"]


def test_sticky_tampered_cookie_gets_a_new_one(proxy):
    _data, cookies = sticky_get(proxy)
    token = COOKIE_RE.fullmatch(cookies[0]).group(1)
    flipped = token[:20] + ("A" if token[20] != "A" else "B") + token[21:]
    for bad in (flipped, token[:-4], "garbage", ""):
        data, renewed = sticky_get(proxy, "/echo", "-H", f"Cookie: rpxy_sticky_token={bad}")
        assert len(renewed) == 1, (bad, renewed)
        new_token, *_ = COOKIE_RE.fullmatch(renewed[0]).groups()
        assert new_token != bad
        assert not any("rpxy_sticky_token" in v for v in header_values(data, "cookie"))


def test_sticky_cookie_is_scoped_to_its_route(proxy):
    _data, cookies = sticky_get(proxy, "/sub/echo")
    token, _expires, path, domain = COOKIE_RE.fullmatch(cookies[0]).groups()
    assert (path, domain) == ("/sub", STICKY_HOST)
    # The "/" route does not accept the "/sub" route's token (other AAD): a new cookie.
    _data, renewed = sticky_get(proxy, "/echo", "-H", f"Cookie: rpxy_sticky_token={token}")
    assert len(renewed) == 1 and COOKIE_RE.fullmatch(renewed[0]).group(3) == "/"


# -- health checks ----------------------------------------------------------------------------


def wait_until(predicate, timeout: float = 10.0, interval: float = 0.2) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def test_primary_backup_follows_http_health(origin_factory, rpxy_factory):
    primary, backup = origin_factory("primary"), origin_factory("backup")
    proxy = rpxy_factory(
        f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        [apps.pb]
        server_name = "pb.test"
        [[apps.pb.reverse_proxy]]
        upstream = [{{ location = "{primary.location}" }}, {{ location = "{backup.location}" }}]
        load_balance = "primary_backup"
        health_check = {HEALTH.format(kind="http")}
        """
    )
    assert {origin_of(proxy, "pb.test") for _ in range(5)} == {"primary"}

    assert curl(f"http://{primary.location}/sick").stdout == b"sick"
    assert wait_until(lambda: origin_of(proxy, "pb.test") == "backup"), "traffic never moved to the backup"
    assert {origin_of(proxy, "pb.test") for _ in range(5)} == {"backup"}
    assert f"upstream {primary.location} is unhealthy" in proxy.system_log()

    assert curl(f"http://{primary.location}/well").stdout == b"well"
    assert wait_until(lambda: origin_of(proxy, "pb.test") == "primary"), "traffic never came back"
    assert {origin_of(proxy, "pb.test") for _ in range(5)} == {"primary"}
    assert f"upstream {primary.location} is healthy again" in proxy.system_log()


def test_stopped_origin_marked_down_by_tcp_check(origin_factory, rpxy_factory):
    doomed, live = origin_factory("doomed"), origin_factory("live")
    pair = f'[{{ location = "{doomed.location}" }}, {{ location = "{live.location}" }}]'
    proxy = rpxy_factory(
        f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        sticky_cookie_secret = "{STICKY_SECRET}"
        [apps.t]
        server_name = "t.test"
        reverse_proxy = [{{ upstream = {pair}, load_balance = "round_robin", health_check = {HEALTH.format(kind="tcp")} }}]
        [apps.sticky]
        server_name = "{STICKY_HOST}"
        reverse_proxy = [{{ upstream = {pair}, load_balance = "sticky", health_check = {HEALTH.format(kind="tcp")} }}]
        """
    )
    assert {origin_of(proxy, "t.test") for _ in range(4)} == {"doomed", "live"}
    # A sticky client pinned to the origin about to die (round robin: at most two tries).
    for _ in range(2):
        data, cookies = sticky_get(proxy)
        if data["origin"] == "doomed":
            break
    assert data["origin"] == "doomed"
    doomed_cookie = "Cookie: rpxy_sticky_token=" + COOKIE_RE.fullmatch(cookies[0]).group(1)
    assert sticky_get(proxy, "/echo", "-H", doomed_cookie)[0]["origin"] == "doomed"

    doomed.stop()
    # Both routes check the origin; wait (bounded) until both marked it down.
    assert wait_until(lambda: proxy.system_log().count(f"upstream {doomed.location} is unhealthy") == 2)
    seen = Counter()
    for _ in range(6):
        result = curl("-w", "%{http_code}", "-o", "/dev/null", "-H", "Host: t.test", proxy.url + "/echo")
        assert result.stdout == b"200"
        seen[origin_of(proxy, "t.test")] += 1
    assert seen == {"live": 6}
    # The pinned target is unhealthy: the client is moved to the live one with a new cookie.
    data, renewed = sticky_get(proxy, "/echo", "-H", doomed_cookie)
    assert data["origin"] == "live"
    assert len(renewed) == 1 and COOKIE_RE.fullmatch(renewed[0]) is not None


def test_sticky_cookie_secure_only_when_a_trusted_proxy_says_https(origins, rpxy_factory, proxy):
    """A trusted front proxy's ``X-Forwarded-Proto: https`` makes the cookie Secure; an untrusted peer's never."""
    two = ", ".join(f'{{ location = "{o.location}" }}' for o in origins[:2])
    trusting = rpxy_factory(
        f"""
        listen_port = {{port}}
        listen_address_v4 = "127.0.0.1"
        trusted_forwarded_proxies = ["127.0.0.1/32"]
        sticky_cookie_secret = "{STICKY_SECRET}"
        [apps.sticky]
        server_name = "{STICKY_HOST}"
        reverse_proxy = [{{ upstream = [{two}], load_balance = "sticky" }}]
        """
    )
    _, cookies = sticky_get(trusting, "/echo", "-H", "X-Forwarded-Proto: https")
    assert len(cookies) == 1 and cookies[0].endswith("; Secure"), cookies
    _, cookies = sticky_get(trusting, "/echo")
    assert len(cookies) == 1 and "Secure" not in cookies[0], cookies
    # The module's proxy trusts nobody: the same header changes nothing.
    _, cookies = sticky_get(proxy, "/echo", "-H", "X-Forwarded-Proto: https")
    assert len(cookies) == 1 and "Secure" not in cookies[0], cookies
