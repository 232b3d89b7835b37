"""Live reload through the real ``rpxy`` process (issue 8's proof).

Every test edits the config file under a running proxy and polls (with a generous
deadline, never a fixed sleep) until the new behaviour shows, then checks what must
not have changed: the process, the listeners, connections opened before the reload.
The proxy polls the file every 0.2 s on top of inotify, so either mechanism may be
the one that notices; ``--config-watch poll`` and ``--config-watch none`` (SIGHUP)
each have their own test.
"""

from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import threading
import time
from pathlib import Path

import pytest

from tests.integration.conftest import Origin, Rpxy, free_port, wait_for_port
from tests.support.http import echo_json
from tests.support.rawhttp import RawConnection, assert_no_tracebacks, request
from tests.support.tlsclient import TlsConnection, https_get, served_certificate, stdlib_context, wait_for_log
from tests.support.tlssite import Pki

FAST = ["--config-poll-interval", "0.2"]
DEADLINE = 30.0


@pytest.fixture(scope="module")
def origins():
    started = {}
    try:
        for name in ("a", "b", "c"):
            started[name] = Origin(name)
        yield started
    finally:
        for origin in started.values():
            origin.stop()


def app(name: str, server_name: str, *routes: tuple[str | None, str], extra: str = "") -> str:
    """``[apps.<name>]`` with one ``reverse_proxy`` table per ``(path, upstream location)``."""
    text = f'[apps.{name}]\nserver_name = "{server_name}"\n{extra}\n'
    for path, location in routes:
        text += f"[[apps.{name}.reverse_proxy]]\n"
        if path is not None:
            text += f'path = "{path}"\n'
        text += f'upstream = [{{ location = "{location}" }}]\n'
    return text


def top(port: int, tls_port: int | None = None) -> str:
    text = f'listen_port = {port}\nlisten_address_v4 = "127.0.0.1"\n'
    if tls_port is not None:
        text += f"listen_port_tls = {tls_port}\n"
    return text


def write_config(proxy: Rpxy, text: str, *, atomic: bool = True) -> None:
    """Replace the config as editors do (a new file renamed over the old), or in place."""
    if atomic:
        tmp = proxy.config_path.with_name(".config.toml.tmp")
        tmp.write_text(text)
        os.replace(tmp, proxy.config_path)
    else:
        proxy.config_path.write_text(text)


def reload_count(proxy: Rpxy) -> int:
    return len(re.findall(r"config reloaded \(", proxy.system_log()))


def wait_until(check, *, timeout: float = DEADLINE, what: str = "the condition"):
    """Call ``check()`` until it returns something truthy (bounded); returns that value."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except (OSError, http.client.HTTPException) as error:
            last = error
        else:
            if last:
                return last
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


def log_line(proxy: Rpxy, pattern: str) -> re.Match:
    """The first rpxy.log match of ``pattern``, waiting for it (bounded, generously)."""
    return wait_for_log(proxy.system_log, pattern, timeout=DEADLINE)


def get(port: int, host: str, path: str = "/echo") -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", path, headers={"Host": host})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def origin_of(port: int, host: str, path: str = "/echo") -> str | None:
    status, body = get(port, host, path)
    return echo_json(body)["origin"] if status == 200 else None


def start(tmp_path: Path, config: str, *, port: int, extra_args: list[str] | None = None) -> Rpxy:
    directory = tmp_path / "proxy"
    directory.mkdir(exist_ok=True)
    return Rpxy(directory, config, port=port, extra_args=extra_args if extra_args is not None else FAST)


@pytest.fixture
def proxies():
    started: list[Rpxy] = []
    yield started
    for proxy in started:
        proxy.stop()
        assert_no_tracebacks(proxy.system_log())


# -- what a reload changes -------------------------------------------------------------------------


def test_adding_an_app_serves_it_and_keeps_connections(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port)
    proxies.append(proxy)
    assert origin_of(port, "a.test") == "a"
    assert get(port, "b.test")[0] == 503
    with RawConnection(port) as before:
        before.send(request("GET", "/echo", host="a.test"))
        assert before.read_response().status == 200

        write_config(proxy, top(port) + app("app_a", "a.test", (None, a)) + app("app_b", "b.test", (None, b)))
        wait_until(lambda: origin_of(port, "b.test") == "b", what="app_b to be served")

        # The connection opened before the reload goes on, and sees the new app.
        before.send(request("GET", "/echo", host="b.test"))
        response = before.read_response()
        assert response.status == 200 and echo_json(response.body)["origin"] == "b"
    assert origin_of(port, "a.test") == "a"
    line = log_line(proxy, r"config reloaded \(file\) in [0-9.]+ ms: apps added: app_b;.*")
    assert "listeners opened: none" in line.group(0)
    assert proxy.proc.poll() is None


def test_changing_an_upstream_moves_new_requests(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port)
    proxies.append(proxy)
    with RawConnection(port) as keep_alive:
        keep_alive.send(request("GET", "/echo", host="a.test"))
        assert echo_json(keep_alive.read_response().body)["origin"] == "a"
        write_config(proxy, top(port) + app("app_a", "a.test", (None, b)))
        wait_until(lambda: origin_of(port, "a.test") == "b", what="the new upstream")
        # The next request on the same client connection goes to the new upstream.
        keep_alive.send(request("GET", "/echo", host="a.test"))
        assert echo_json(keep_alive.read_response().body)["origin"] == "b"
    line = log_line(proxy, r"config reloaded \(file\).*apps changed: app_a.*")
    assert re.search(r"draining [1-9]", line.group(0)), line.group(0)


def test_a_request_in_flight_finishes_on_the_state_it_started_with(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port)
    proxies.append(proxy)
    with RawConnection(port, timeout=30) as slow:
        last = _count(origins["a"])
        slow.send(request("GET", "/slow/3", host="a.test"))
        # Wait until origin a has the request (its counter moves by more than our own polls).
        deadline = time.monotonic() + DEADLINE
        while (now := _count(origins["a"])) - last < 2:
            assert time.monotonic() < deadline, "the slow request never reached the origin"
            last = now
            time.sleep(0.05)
        write_config(proxy, top(port) + app("app_a", "a.test", (None, b)))
        wait_until(lambda: origin_of(port, "a.test") == "b", what="the new upstream")
        response = slow.read_response()
        assert response.status == 200
        assert response.body == b"slow"
        assert response.header("x-origin") == "a"  # the upstream of the state it started with


def _count(origin: Origin) -> int:
    """Requests origin ``origin`` has received (this one included), asked directly."""
    conn = http.client.HTTPConnection("127.0.0.1", origin.port, timeout=10)
    try:
        conn.request("GET", "/count")
        return int(conn.getresponse().read())
    finally:
        conn.close()


def test_changing_a_path(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", ("/old", a)), port=port)
    proxies.append(proxy)
    assert origin_of(port, "a.test", "/old/x") == "a"
    assert get(port, "a.test", "/new/x")[0] == 404
    write_config(proxy, top(port) + app("app_a", "a.test", ("/new", a), ("/other", b)))
    wait_until(lambda: get(port, "a.test", "/new/x")[0] == 200, what="the new path")
    assert get(port, "a.test", "/old/x")[0] == 404
    assert origin_of(port, "a.test", "/other") == "b"


def test_listen_port_change_opens_the_new_port_and_keeps_the_others(origins, tmp_path, proxies):
    port, new_port, tls_port = free_port(), free_port(), free_port()
    pki = Pki(tmp_path / "pki")
    site = pki.site("app_a", "a.test")
    tls = f'tls = {{ tls_cert_path = "{site.cert}", tls_cert_key_path = "{site.key}", https_redirection = false }}'
    apps = app("app_a", "a.test", (None, origins["a"].location), extra=tls)
    proxy = start(tmp_path, top(port, tls_port) + apps, port=port)
    proxies.append(proxy)
    wait_for_port(tls_port, proc=proxy.proc)
    ctx = stdlib_context(pki.ca_file)
    with TlsConnection(tls_port, "a.test", ctx) as tls_before:
        assert tls_before.get("/echo", host="a.test").status == 200
        write_config(proxy, top(new_port, tls_port) + apps)
        wait_until(lambda: origin_of(new_port, "a.test") == "a", what="the new port")
        wait_until(lambda: _refused(port), what="the old port to close")
        # The TLS listener was not touched: the connection made before still works.
        assert tls_before.get("/echo", host="a.test").status == 200
    assert https_get(tls_port, "a.test", ctx).status == 200
    line = log_line(proxy, r"config reloaded .*settings changed: listen_port;.*")
    assert f"listeners opened: 127.0.0.1:{new_port} (http)" in line.group(0)
    assert proxy.system_log().count(f"closing listener 127.0.0.1:{port} (http)") == 1
    assert "closing listener 127.0.0.1:%d (https)" % tls_port not in proxy.system_log()


def test_a_key_that_needs_a_restart_is_logged_and_the_rest_applied(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port)
    proxies.append(proxy)
    write_config(proxy, "tcp_listen_backlog = 64\n" + top(port) + app("app_a", "a.test", (None, b)))
    wait_until(lambda: origin_of(port, "a.test") == "b", what="the rest of the change")
    log_line(proxy, r"WARN .*config: tcp_listen_backlog changed; restart rpxy to apply it fully")


def _refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def test_swapping_a_certificate_and_adding_client_auth(origins, tmp_path, proxies):
    port, tls_port = free_port(), free_port()
    pki = Pki(tmp_path / "pki")
    first = pki.site("first", "a.test")
    second = pki.site("second", "a.test")  # other files, another certificate for the same name

    def config(site, client_ca: Path | None = None) -> str:
        ca = f', client_ca_cert_path = "{client_ca}"' if client_ca else ""
        tls = f'tls = {{ tls_cert_path = "{site.cert}", tls_cert_key_path = "{site.key}"{ca} }}'
        return top(port, tls_port) + app("app_a", "a.test", (None, origins["a"].location), extra=tls)

    proxy = start(tmp_path, config(first), port=port)
    proxies.append(proxy)
    wait_for_port(tls_port, proc=proxy.proc)
    ctx = stdlib_context(pki.ca_file)
    assert served_certificate(tls_port, "a.test", ctx).serial_number == first.leaf.cert.serial_number
    with TlsConnection(tls_port, "a.test", ctx) as before:
        write_config(proxy, config(second))
        wanted = second.leaf.cert.serial_number
        wait_until(lambda: served_certificate(tls_port, "a.test", ctx).serial_number == wanted, what="the new certificate")
        # An established connection keeps its certificate and keeps working.
        assert before.peer_certificate.serial_number == first.leaf.cert.serial_number
        assert before.get("/echo", host="a.test").status == 200
    assert https_get(tls_port, "a.test", ctx).status == 200

    # mTLS CAs are reloaded too: new handshakes must now present a client certificate.
    write_config(proxy, config(second, pki.client_ca_file))
    client = stdlib_context(pki.ca_file, client_cert=pki.client("carol", pki.client_ca))

    def refused_without_certificate() -> bool:
        try:
            response = https_get(tls_port, "a.test", ctx)
        except (OSError, ConnectionError):
            return True
        return response.status != 200

    wait_until(refused_without_certificate, what="client certificates to be required")
    assert https_get(tls_port, "a.test", client).status == 200


def _sticky(port: int, cookie: str | None = None) -> tuple[str, str | None]:
    """(origin, the rpxy_sticky_token set by this answer or None)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        headers = {"Host": "s.test"}
        if cookie is not None:
            headers["Cookie"] = f"rpxy_sticky_token={cookie}"
        conn.request("GET", "/echo", headers=headers)
        response = conn.getresponse()
        body = response.read()
        assert response.status == 200
        token = None
        for value in response.headers.get_all("set-cookie") or []:
            match = re.match(r"rpxy_sticky_token=([A-Za-z0-9_-]+);", value)
            if match:
                token = match.group(1)
        return echo_json(body)["origin"], token
    finally:
        conn.close()


def test_sticky_cookie_secret_is_reloaded(origins, tmp_path, proxies):
    import base64

    port = free_port()
    a, b = origins["a"].location, origins["b"].location

    def config(secret: bytes, path: str) -> str:
        encoded = base64.urlsafe_b64encode(secret).rstrip(b"=").decode()
        route = f'[[apps.s.reverse_proxy]]\nupstream = [{{ location = "{a}" }}, {{ location = "{b}" }}]\nload_balance = "sticky"\n'
        return (
            top(port)
            + f'sticky_cookie_secret = "{encoded}"\n[apps.s]\nserver_name = "s.test"\n{route}'
            + f'[[apps.s.reverse_proxy]]\npath = "{path}"\nupstream = [{{ location = "{a}" }}]\n'
        )

    proxy = start(tmp_path, config(bytes(32), "/one"), port=port)
    proxies.append(proxy)
    pinned, token = _sticky(port)
    assert token is not None
    assert _sticky(port, token) == (pinned, None)  # honoured, not re-issued

    # Another change, same secret: the cookie is still honoured by the new state.
    write_config(proxy, config(bytes(32), "/two"))
    wait_until(lambda: get(port, "s.test", "/two")[0] == 200, what="the reload")
    for _ in range(4):
        assert _sticky(port, token) == (pinned, None)

    # A new secret: the old cookie no longer decrypts, so a new one is issued.
    write_config(proxy, config(bytes(range(32)), "/two"))
    wait_until(lambda: _sticky(port, token)[1] is not None, what="the new secret")


def test_tls_sessions_of_unchanged_apps_resume_across_a_reload(origins, tmp_path, proxies):
    from OpenSSL import SSL

    from tests.support.tlsclient import pyopenssl_context, pyopenssl_handshake

    port, tls_port = free_port(), free_port()
    pki = Pki(tmp_path / "pki")
    site = pki.site("app_a", "a.test")
    tls = f'tls = {{ tls_cert_path = "{site.cert}", tls_cert_key_path = "{site.key}", https_redirection = false }}'

    def config(path: str) -> str:
        return top(port, tls_port) + app("app_a", "a.test", (None, origins["a"].location), (path, origins["b"].location), extra=tls)

    proxy = start(tmp_path, config("/one"), port=port)
    proxies.append(proxy)
    wait_for_port(tls_port, proc=proxy.proc)
    ctx = pyopenssl_context(ca=pki.ca.cert, max_version=SSL.TLS1_2_VERSION)  # sessions usable at once
    first = pyopenssl_handshake(tls_port, "a.test", ctx)
    assert first.ok, first.error
    write_config(proxy, config("/two"))  # the app changes, its certificate does not
    wait_until(lambda: origin_of(port, "a.test", "/two") == "b", what="the reload")
    again = pyopenssl_handshake(tls_port, "a.test", ctx, session=first.session)
    assert again.ok and again.resumed


def test_invalid_config_keeps_serving_and_names_the_key(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    good = top(port) + app("app_a", "a.test", (None, a))
    proxy = start(tmp_path, good, port=port)
    proxies.append(proxy)

    write_config(proxy, good + "[apps.broken\n")  # a TOML syntax error
    log_line(proxy, r"ERROR .*config reload \(file\) failed; still serving the previous config: .*invalid TOML")
    assert origin_of(port, "a.test") == "a"

    # In place (truncate + write), with a bad value: the error names the key.
    write_config(proxy, top(port) + app("app_a", "a.test", (None, "127.0.0.1:99999")), atomic=False)
    log_line(proxy, r"failed; still serving the previous config: apps\.app_a\.reverse_proxy\[0\]\.upstream\[0\]\.location: port")
    assert origin_of(port, "a.test") == "a"

    # Fixed: applied.
    write_config(proxy, top(port) + app("app_a", "a.test", (None, b)))
    wait_until(lambda: origin_of(port, "a.test") == "b", what="the fixed config")
    assert proxy.proc.poll() is None


def test_bad_certificate_in_a_reload_keeps_the_previous_config(origins, tmp_path, proxies):
    port, tls_port = free_port(), free_port()
    pki = Pki(tmp_path / "pki")
    site = pki.site("app_a", "a.test")

    def config(cert: Path) -> str:
        tls = f'tls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{site.key}", https_redirection = false }}'
        return top(port, tls_port) + app("app_a", "a.test", (None, origins["a"].location), extra=tls)

    proxy = start(tmp_path, config(site.cert), port=port)
    proxies.append(proxy)
    wait_for_port(tls_port, proc=proxy.proc)
    write_config(proxy, config(tmp_path / "missing.crt"))
    log_line(proxy, r"ERROR .*config reload \(file\) failed; .*apps\.app_a\.tls\.tls_cert_path")
    assert https_get(tls_port, "a.test", stdlib_context(pki.ca_file)).status == 200


def test_deleted_file_keeps_the_last_config(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port)
    proxies.append(proxy)
    proxy.config_path.unlink()
    log_line(proxy, r"WARN .*config file .* was removed; still serving the last config")
    assert origin_of(port, "a.test") == "a"
    # It comes back (changed): applied.
    write_config(proxy, top(port) + app("app_a", "a.test", (None, b)))
    wait_until(lambda: origin_of(port, "a.test") == "b", what="the restored config")


def test_sighup_reloads_when_watching_is_off(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port, extra_args=["--config-watch", "none"])
    proxies.append(proxy)
    write_config(proxy, top(port) + app("app_a", "a.test", (None, b)))
    for _ in range(5):
        assert origin_of(port, "a.test") == "a"  # nobody watches the file
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: origin_of(port, "a.test") == "b", what="the SIGHUP reload")
    log_line(proxy, r"config reloaded \(SIGHUP\)")
    # SIGHUP without a change still rebuilds (certificates re-read) and logs it.
    proxy.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: proxy.system_log().count("config reloaded (SIGHUP)") == 2, what="the second SIGHUP")
    assert proxy.proc.poll() is None


def test_sighup_through_the_twist_plugin(origins, tmp_path):
    """``twist rpxy`` installs the same SIGHUP handler (and takes --config-watch)."""
    from tests.integration.test_cli import BIN, Server

    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    config = tmp_path / "config.toml"
    config.write_text(top(port) + app("app_a", "a.test", (None, a)))
    server = Server([BIN / "twist", "rpxy", "--config", config, "--config-watch", "none"], cwd=tmp_path, port=port)
    try:
        config.write_text(top(port) + app("app_a", "a.test", (None, b)))
        assert origin_of(port, "a.test") == "a"
        server.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: origin_of(port, "a.test") == "b", what="the SIGHUP reload under twist")
    finally:
        server.terminate()
    assert "config reloaded" in server.output()


def test_polling_alone_notices_a_change(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(
        tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port, extra_args=["--config-watch", "poll", *FAST]
    )
    proxies.append(proxy)
    log_line(proxy, r"watching .*config\.toml for changes \(poll\)")
    write_config(proxy, top(port) + app("app_a", "a.test", (None, b)), atomic=False)
    wait_until(lambda: origin_of(port, "a.test") == "b", what="the polled change")


def test_inotify_notices_a_rename_without_polling(origins, tmp_path, proxies):
    port = free_port()
    a, b = origins["a"].location, origins["b"].location
    proxy = start(
        tmp_path, top(port) + app("app_a", "a.test", (None, a)), port=port, extra_args=["--config-poll-interval", "3600"]
    )
    proxies.append(proxy)
    line = log_line(proxy, r"watching .*config\.toml for changes \((inotify\+poll|poll)\)")
    if "(poll)" in line.group(0):
        pytest.skip("no inotify here")
    write_config(proxy, top(port) + app("app_a", "a.test", (None, b)))  # a new file renamed over the old
    wait_until(lambda: origin_of(port, "a.test") == "b", what="the change seen by inotify")
    write_config(proxy, top(port) + app("app_a", "a.test", (None, a)), atomic=False)  # and in place
    wait_until(lambda: origin_of(port, "a.test") == "a", what="the in-place change seen by inotify")


# -- steady load through 20 reloads ----------------------------------------------------------------


class _Client(threading.Thread):
    """Requests in a loop until told to stop (bounded), counting every failure.

    ``keep_alive``: one connection for every request (re-opened only if the proxy closed
    it cleanly between requests, which counts as a failure too); otherwise a new
    connection per request, so that a listener closed even briefly shows as refused.
    """

    def __init__(self, port: int, host: str, *, keep_alive: bool, stop: threading.Event, limit: int = 20000) -> None:
        super().__init__(daemon=True)
        self.port, self.host, self.keep_alive, self.stop, self.limit = port, host, keep_alive, stop, limit
        self.ok = 0
        self.failures: list[str] = []
        self.refused = 0
        self.origins: set[str] = set()

    def run(self) -> None:
        conn = None
        while not self.stop.is_set() and self.ok + len(self.failures) < self.limit:
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=15)
                conn.request("GET", "/echo", headers={"Host": self.host})
                response = conn.getresponse()
                body = response.read()
                if response.status != 200:
                    self.failures.append(f"status {response.status}")
                else:
                    self.ok += 1
                    self.origins.add(echo_json(body)["origin"])
                if not self.keep_alive or response.will_close:
                    if self.keep_alive:
                        self.failures.append("connection closed by the proxy")
                    conn.close()
                    conn = None
            except ConnectionRefusedError:
                self.refused += 1
                conn = None
            except (OSError, http.client.HTTPException) as error:
                self.failures.append(repr(error))
                if conn is not None:
                    conn.close()
                conn = None
        if conn is not None:
            conn.close()


def test_steady_load_through_twenty_reloads(origins, tmp_path, proxies):
    """Three clients (two keep-alive, one connecting per request) while the config
    changes 20 times: upstream, paths, an app added and removed, a setting, and the TLS
    listener opened and closed next to the untouched cleartext one."""
    port, tls_port = free_port(), free_port()
    a, b, c = (origins[n].location for n in "abc")
    pki = Pki(tmp_path / "pki")
    site = pki.site("app_a", "a.test")
    tls = f'tls = {{ tls_cert_path = "{site.cert}", tls_cert_key_path = "{site.key}", https_redirection = false }}'
    proxy = start(tmp_path, top(port) + app("app_a", "a.test", (None, a), extra=tls), port=port)
    proxies.append(proxy)
    stop = threading.Event()
    clients = [
        _Client(port, "a.test", keep_alive=True, stop=stop),
        _Client(port, "a.test", keep_alive=True, stop=stop),
        _Client(port, "a.test", keep_alive=False, stop=stop),
    ]
    for client in clients:
        client.start()
    started = time.monotonic()
    try:
        for number in range(1, 21):
            # Alternate what changes: the upstream, a path, an app added and removed, a setting.
            upstream = (a, b, c)[number % 3]
            with_tls = (number // 4) % 2 == 1  # on for 4..7, 12..15: opened and closed twice
            text = top(port, tls_port if with_tls else None)
            text += app("app_a", "a.test", (None, upstream), (f"/p{number}", a), extra=tls)
            if number % 2:
                text += app("extra", f"extra{number}.test", (None, b))
            if number % 4 == 0:
                text = f"request_max_body_size = {1000 + number}\n" + text
            before = reload_count(proxy)
            write_config(proxy, text, atomic=number % 5 != 0)
            wait_until(lambda: reload_count(proxy) > before, what=f"reload {number}")
            if number % 3 == 0:
                wait_until(lambda: origin_of(port, "a.test") == "a", what=f"upstream of reload {number}")
            if with_tls:
                ctx = stdlib_context(pki.ca_file)
                wait_until(lambda: https_get(tls_port, "a.test", ctx).status == 200, what="the TLS listener")
    finally:
        stop.set()
        for client in clients:
            client.join(60)
    elapsed = time.monotonic() - started
    assert reload_count(proxy) >= 20
    for client in clients:
        assert not client.is_alive()
        assert client.failures == [], client.failures[:5]
        assert client.refused == 0
        assert client.ok > 0
    assert set().union(*(client.origins for client in clients)) >= {"a"}
    assert proxy.proc.poll() is None
    log = proxy.system_log()
    assert log.count(f"closing listener 127.0.0.1:{tls_port} (https)") == 2
    assert "closing listener 127.0.0.1:%d (http)" % port not in log
    print(f"{sum(c.ok for c in clients)} requests through 20 reloads in {elapsed:.1f} s")
