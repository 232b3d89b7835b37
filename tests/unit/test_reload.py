"""Live reload without a real reactor: config diffs, carry-over of pools and health
checkers, the file watcher's debounce on a ``Clock``, and a whole service reloading
on a ``MemoryReactorClock`` (listeners kept or replaced, checkers adopted, hooks).
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock

from rpxy.config.load import parse_config
from rpxy.config.model import Config
from rpxy.reload import ConfigWatcher, ReloadEvent, diff_configs, listener_keys
from rpxy.service import make_service
from rpxy.state import build_state, retired
from tests.support.tlsgen import Authority


def config_text(*apps: str, top: str = "listen_port = 8080\nlisten_address_v4 = \"127.0.0.1\"") -> str:
    return top + "\n" + "\n".join(apps)


def app(name: str, *routes: str, server_name: str | None = None) -> str:
    """``[apps.<name>]`` with one route per snippet (each snippet: the route's lines)."""
    text = f'[apps.{name}]\nserver_name = "{server_name or name + ".test"}"\n'
    for route in routes:
        text += f"[[apps.{name}.reverse_proxy]]\n{route}\n"
    return text


def up(*locations: str, extra: str = "") -> str:
    ups = ", ".join(f'{{ location = "{location}" }}' for location in locations)
    return f"upstream = [{ups}]\n{extra}"


def config(*apps: str, **kwargs) -> Config:
    return parse_config(tomllib.loads(config_text(*apps, **kwargs))).config


HC = 'health_check = { type = "tcp", interval = 5, timeout = 1 }'


# -- diff_configs ---------------------------------------------------------------------------------


def test_diff_names_apps_added_removed_and_changed():
    old = config(app("a", up("127.0.0.1:1")), app("b", up("127.0.0.1:2")), app("c", up("127.0.0.1:3")))
    new = config(app("a", up("127.0.0.1:1")), app("b", up("127.0.0.1:9")), app("d", up("127.0.0.1:4")))
    diff = diff_configs(old, new)
    assert (diff.apps_added, diff.apps_removed, diff.apps_changed) == (("d",), ("c",), ("b",))
    assert diff.settings_changed == () and diff.restart_needed == ()
    assert not diff.empty


def test_diff_of_equal_configs_is_empty():
    text = app("a", up("127.0.0.1:1"))
    assert diff_configs(config(text), config(text)).empty


def test_diff_names_settings_and_what_needs_a_restart():
    old = config(app("a", up("127.0.0.1:1")))
    new = config(
        app("a", up("127.0.0.1:1")),
        top='listen_port = 8081\nlisten_address_v4 = "127.0.0.1"\ntcp_listen_backlog = 10\n'
        "[experimental]\nignore_sni_consistency = true",
    )
    diff = diff_configs(old, new)
    assert set(diff.settings_changed) == {"listen_port", "tcp_listen_backlog", "experimental.ignore_sni_consistency"}
    assert diff.restart_needed == ("tcp_listen_backlog",)
    assert diff.apps_changed == ()


def test_listener_keys_follow_ports_and_interfaces():
    cfg = config(
        app("a", up("127.0.0.1:1")),
        top='listen_port = 80\nlisten_port_tls = 443\nlisten_address_v4 = ["127.0.0.1", "127.0.0.2"]',
    )
    assert list(listener_keys(cfg)) == [
        ("http", "127.0.0.1", 80),
        ("http", "127.0.0.2", 80),
        ("https", "127.0.0.1", 443),
        ("https", "127.0.0.2", 443),
    ]


# -- carry-over of pools and health checkers ---------------------------------------------------------


def test_unchanged_upstreams_keep_their_pools_and_removed_ones_are_retired():
    clock = MemoryReactorClock()
    old = build_state(config(app("a", up("127.0.0.1:1")), app("b", up("127.0.0.1:2"))), clock)
    new = build_state(config(app("a", up("127.0.0.1:1")), app("c", up("127.0.0.1:3"))), clock, previous=old)
    old_a, new_a = old.apps.lookup("a.test").paths.lookup(b"/")[1], new.apps.lookup("a.test").paths.lookup(b"/")[1]
    assert new_a.pools[0] is old_a.pools[0]
    assert new_a.h2_pools[0] is old_a.h2_pools[0]
    left = retired(old, new)
    old_b = old.apps.lookup("b.test").paths.lookup(b"/")[1]
    assert set(map(id, left.pools)) == {id(old_b.pools[0]), id(old_b.h2_pools[0])}
    assert left.kept_pools == 2
    new_c = new.apps.lookup("c.test").paths.lookup(b"/")[1]
    assert all(pool is not p for pool in new_c.pools for p in old.pools)


def test_routes_to_the_same_upstream_share_one_pool():
    clock = MemoryReactorClock()
    state = build_state(
        config(app("a", up("127.0.0.1:1"), 'path = "/x"\n' + up("127.0.0.1:1")), app("b", up("127.0.0.1:1"))), clock
    )
    pools = {id(route.pools[0]) for app_ in ("a.test", "b.test") for route in _routes(state, app_)}
    assert len(pools) == 1
    assert len(state.pools) == 2  # one HTTP/1.1 and one HTTP/2 pool


def _routes(state, host):
    app_ = state.apps.lookup(host)
    return [app_.paths.lookup(path)[1] for path in (b"/", b"/x") if app_.paths.lookup(path) is not None]


def test_connection_options_make_a_new_pool():
    clock = MemoryReactorClock()
    old = build_state(config(app("a", up("127.0.0.1:1"))), clock)
    new = build_state(
        config(app("a", up("127.0.0.1:1")), top='listen_port = 8080\nupstream_connect_timeout = 3'), clock, previous=old
    )
    assert not set(map(id, new.pools)) & set(map(id, old.pools))
    assert len(retired(old, new).pools) == 2


def test_new_ca_file_content_makes_a_new_pool(tmp_path: Path):
    ca = tmp_path / "ca.pem"
    Authority("one").write_cert(ca)
    text = app("a", 'upstream = [{ location = "example.test:443", tls = true, ca_cert_path = "%s" }]' % ca)
    clock = MemoryReactorClock()
    old = build_state(config(text), clock)
    same = build_state(config(text), clock, previous=old)
    assert [id(p) for p in same.pools] == [id(p) for p in old.pools]
    Authority("two").write_cert(ca)
    new = build_state(config(text), clock, previous=same)
    assert not set(map(id, new.pools)) & set(map(id, same.pools))


def test_health_checker_and_its_knowledge_are_kept_while_unchanged():
    clock = MemoryReactorClock()
    route = up("127.0.0.1:1", "127.0.0.1:2", extra=f'load_balance = "round_robin"\n{HC}')
    old = build_state(config(app("a", route)), clock)
    (checker,) = old.health_checkers
    checker.states[0].healthy = False
    new = build_state(config(app("a", route), app("b", up("127.0.0.1:5"))), clock, previous=old)
    assert new.health_checkers == (checker,)
    assert retired(old, new).checkers == ()
    group = new.apps.lookup("a.test").paths.lookup(b"/")[1].group
    assert group.states[0] is checker.states[0]  # the new route balances on the kept health states

    changed = up("127.0.0.1:1", "127.0.0.1:2", extra='load_balance = "round_robin"\nhealth_check = { type = "tcp", interval = 7, timeout = 1 }')
    newer = build_state(config(app("a", changed)), clock, previous=new)
    assert newer.health_checkers[0] is not checker
    assert retired(new, newer).checkers == (checker,)


def test_previous_state_is_not_modified():
    clock = MemoryReactorClock()
    old = build_state(config(app("a", up("127.0.0.1:1"))), clock)
    pools, index = old.pools, dict(old.pool_index)
    build_state(config(app("b", up("127.0.0.1:2"))), clock, previous=old)
    assert old.pools == pools and old.pool_index == index


# -- ConfigWatcher --------------------------------------------------------------------------------------


class _Wall:
    """A wall clock far from the file's mtime (nothing racy) unless told otherwise."""

    def __init__(self) -> None:
        self.offset = 100.0

    def __call__(self) -> float:
        import time

        return time.time() + self.offset


def _watcher(path: Path, calls: list, wall=None) -> tuple[ConfigWatcher, Clock]:
    clock = MemoryReactorClock()
    watcher = ConfigWatcher(
        str(path), clock, lambda: calls.append(clock.seconds()), poll_interval=1.0, debounce=0.2,
        use_inotify=False, wall_clock=wall or _Wall(),
    )
    watcher.startService()
    return watcher, clock


def _rewrite(path: Path, text: str) -> None:
    path.write_text(text)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a visible mtime change


def test_watcher_polls_and_debounces(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("a")
    calls: list = []
    watcher, clock = _watcher(path, calls)
    assert watcher.mode == "poll"
    clock.advance(1.0)
    clock.advance(0.2)
    assert calls == []  # nothing changed
    _rewrite(path, "bb")
    clock.advance(1.0)  # the poll notices
    assert calls == []
    clock.advance(0.2)  # the debounce passes
    assert calls == [pytest.approx(2.4)]
    for _ in range(3):
        clock.advance(1.0)
    assert len(calls) == 1
    watcher.stopService()


def test_a_burst_of_events_is_one_reload(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("a")
    calls: list = []
    watcher, clock = _watcher(path, calls)
    for _ in range(5):
        watcher.changed()
        clock.advance(0.1)
    assert calls == []
    clock.advance(0.2)
    assert len(calls) == 1
    # A never-ending burst still reloads within MAX_DEBOUNCE.
    for _ in range(40):
        watcher.changed()
        clock.advance(0.1)
    assert len(calls) >= 2
    watcher.stopService()


def test_removed_and_recreated_file_is_noticed(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("a")
    calls: list = []
    watcher, clock = _watcher(path, calls)
    path.unlink()
    clock.advance(1.0)
    clock.advance(0.2)
    assert len(calls) == 1
    path.write_text("b")
    clock.advance(1.0)
    clock.advance(0.2)
    assert len(calls) == 2
    watcher.stopService()


def test_racy_mtime_rechecks_the_content_without_delaying(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("a")
    wall = _Wall()
    wall.offset = 0.0  # the file was just written: its signature cannot be trusted yet
    calls: list = []
    watcher, clock = _watcher(path, calls, wall)
    clock.advance(1.0)
    clock.advance(0.2)
    assert len(calls) == 1  # a content check, even though the signature did not change
    wall.offset = 100.0
    clock.advance(1.0)
    clock.advance(0.2)
    clock.advance(1.0)
    clock.advance(1.0)
    assert len(calls) <= 2  # at most the one check already underway when it settled
    watcher.stopService()


def test_stopped_watcher_leaves_nothing_scheduled(tmp_path: Path):
    path = tmp_path / "config.toml"
    path.write_text("a")
    calls: list = []
    watcher, clock = _watcher(path, calls)
    watcher.changed()
    watcher.stopService()
    assert clock.getDelayedCalls() == []


# -- a whole service reloading on a memory reactor ---------------------------------------------------


def _service(tmp_path: Path, text: str):
    path = tmp_path / "config.toml"
    path.write_text(text)
    reactor = MemoryReactorClock()
    service = make_service(str(path), reactor=reactor, log_dir=str(tmp_path / "logs"), config_watch="none")
    service.startService()
    return service, reactor, path


def _reload(service, path: Path, text: str):
    path.write_text(text)
    result = []
    service.reload(force=False, reason="test").addBoth(result.append)
    return result


def test_service_reload_swaps_the_state_and_keeps_listeners(tmp_path: Path):
    top = 'listen_port = 8080\nlisten_address_v4 = ["127.0.0.1", "127.0.0.2"]'
    service, reactor, path = _service(tmp_path, config_text(app("a", up("127.0.0.1:1")), top=top))
    listeners = dict(service.listeners)
    assert len(reactor.tcpServers) == 2
    events: list[ReloadEvent] = []
    service.on_reload.append(events.append)
    old = service.holder.current

    _reload(service, path, config_text(app("a", up("127.0.0.1:1")), app("b", up("127.0.0.1:2")), top=top))
    assert service.holder.current is not old
    assert service.holder.current.apps.lookup("b.test") is not None
    assert service.listeners == listeners  # the very same listener services
    assert all(listener.running for listener in listeners.values())
    assert len(reactor.tcpServers) == 2  # nothing re-bound
    (event,) = events
    assert event.old is old and event.diff.apps_added == ("b",) and event.reason == "test"
    service.stopService()


def test_service_reload_opens_and_closes_only_changed_listeners(tmp_path: Path):
    two = 'listen_port = 8080\nlisten_address_v4 = ["127.0.0.1", "127.0.0.2"]'
    service, reactor, path = _service(tmp_path, config_text(app("a", up("127.0.0.1:1")), top=two))
    kept = service.listeners[("http", "127.0.0.1", 8080)]
    dropped = service.listeners[("http", "127.0.0.2", 8080)]
    _reload(service, path, config_text(app("a", up("127.0.0.1:1")), top='listen_port = 8080\nlisten_address_v4 = ["127.0.0.1", "127.0.0.3"]'))
    assert service.listeners[("http", "127.0.0.1", 8080)] is kept and kept.running
    assert ("http", "127.0.0.2", 8080) not in service.listeners
    assert not dropped.running and dropped.parent is None
    assert reactor.tcpServers[-1][3] == "127.0.0.3"
    # The shared factory: counts of clients survive.
    assert service.listeners[("http", "127.0.0.3", 8080)].factory is kept.factory
    service.stopService()


def test_service_reload_adopts_health_checkers(tmp_path: Path):
    route = up("127.0.0.1:1", "127.0.0.1:2", extra=f'load_balance = "round_robin"\n{HC}')
    service, _reactor, path = _service(tmp_path, config_text(app("a", route)))
    (checker,) = service.holder.current.health_checkers
    assert checker.parent is service and checker.running
    _reload(service, path, config_text(app("a", route), app("b", up("127.0.0.1:3", extra=HC))))
    kept, added = service.holder.current.health_checkers
    assert kept is checker and checker.running
    assert added.parent is service and added.running
    _reload(service, path, config_text(app("b", up("127.0.0.1:3", extra=HC))))
    assert service.holder.current.health_checkers == (added,)
    assert checker.parent is None and not checker.running
    service.stopService()


def test_invalid_or_missing_file_keeps_the_state(tmp_path: Path):
    service, _reactor, path = _service(tmp_path, config_text(app("a", up("127.0.0.1:1"))))
    state = service.holder.current
    _reload(service, path, "listen_port = [")
    assert service.holder.current is state
    assert service.reloader.failures == 1
    _reload(service, path, config_text(app("a", up("127.0.0.1:99999"))))
    assert service.holder.current is state
    assert service.reloader.failures == 2
    path.unlink()
    service.reload(force=True)
    assert service.holder.current is state and service.reloader.missing
    _reload(service, path, config_text(app("a", up("127.0.0.1:2"))))
    assert service.holder.current is not state and not service.reloader.missing
    service.stopService()


def test_unchanged_content_is_not_reloaded_unless_forced(tmp_path: Path):
    text = config_text(app("a", up("127.0.0.1:1")))
    service, _reactor, path = _service(tmp_path, text)
    state = service.holder.current
    _reload(service, path, text + "\n# a comment\n")
    assert service.holder.current is state  # same config: nothing to do
    service.reload(force=True, reason="SIGHUP")
    assert service.holder.current is not state  # forced: rebuilt (certificates re-read)
    assert service.holder.current.pools == state.pools  # ...with the same pools
    assert service.reloader.reloads == 1
    service.stopService()


def test_a_failing_hook_does_not_undo_the_reload(tmp_path: Path):
    service, _reactor, path = _service(tmp_path, config_text(app("a", up("127.0.0.1:1"))))
    seen = []

    def broken(event):
        raise RuntimeError("boom")

    service.on_reload.extend([broken, seen.append])
    _reload(service, path, config_text(app("a", up("127.0.0.1:2"))))
    assert len(seen) == 1
    assert service.reloader.reloads == 1
    service.stopService()


def test_retired_pools_are_closed(tmp_path: Path):
    service, _reactor, path = _service(tmp_path, config_text(app("a", up("127.0.0.1:1"))))
    old_pools = service.holder.current.pools
    _reload(service, path, config_text(app("a", up("127.0.0.1:2"))))
    assert all(pool._closed for pool in old_pools)
    assert not any(pool._closed for pool in service.holder.current.pools)
    service.stopService()


def test_tls_port_added_by_a_reload_gets_a_listener_and_a_certificate_watcher(tmp_path: Path):
    authority = Authority("ca")
    cert, key = authority.issue("a.test").write(tmp_path, "a")
    tls_app = app("a", up("127.0.0.1:1")) .replace(
        'server_name = "a.test"\n', f'server_name = "a.test"\ntls = {{ tls_cert_path = "{cert}", tls_cert_key_path = "{key}" }}\n'
    )
    service, reactor, path = _service(tmp_path, config_text(tls_app))
    assert service.certificate_watcher is None
    _reload(service, path, config_text(tls_app, top='listen_port = 8080\nlisten_port_tls = 8443\nlisten_address_v4 = "127.0.0.1"'))
    assert ("https", "127.0.0.1", 8443) in service.listeners
    assert service.certificate_watcher is not None and service.certificate_watcher.running
    assert service.holder.current.tls_contexts is not None
    _reload(service, path, config_text(tls_app))
    assert ("https", "127.0.0.1", 8443) not in service.listeners
    assert service.certificate_watcher is None
    service.stopService()


def test_a_port_that_cannot_be_opened_is_skipped_and_retried_by_the_next_reload(tmp_path: Path):
    from twisted.internet.error import CannotListenError

    service, reactor, path = _service(tmp_path, config_text(app("a", up("127.0.0.1:1"))))
    real = reactor.listenTCP

    def busy(port, factory, backlog=50, interface=""):
        raise CannotListenError(interface, port, OSError(98, "Address already in use"))

    reactor.listenTCP = busy
    _reload(service, path, config_text(app("a", up("127.0.0.1:1")), top='listen_port = 9090\nlisten_address_v4 = "127.0.0.1"'))
    assert service.holder.current.config.listen_port == 9090  # the rest of the reload stands
    assert ("http", "127.0.0.1", 9090) not in service.listeners
    assert all(child.running for child in service)  # no half-started listener left behind
    reactor.listenTCP = real
    service.reload(force=True)  # SIGHUP: tries again
    assert service.listeners[("http", "127.0.0.1", 9090)].running
    service.stopService()


def test_a_retired_http2_pool_still_serves_a_late_request_then_closes():
    """An exchange of the old state may ask a retired pool for a stream (a retry): it
    gets one on a new connection, which closes when the stream ends (no connect loop)."""
    from twisted.internet import defer
    from twisted.internet.testing import StringTransport

    from rpxy.config.model import UpstreamConfig
    from rpxy.upstream.h2client import H2UpstreamPool, H2UpstreamStream

    class Endpoint:
        connects = 0

        def connect(self, factory):
            self.connects += 1
            protocol = factory.buildProtocol(None)
            protocol.makeConnection(StringTransport())
            return defer.succeed(protocol)

    endpoint = Endpoint()
    upstream = UpstreamConfig(location="up.test:80", host="up.test", port=80)
    pool = H2UpstreamPool(upstream, Clock(), endpoint=endpoint)
    pool.close()
    got: list = []
    pool.acquire(got.append, got.append)
    assert endpoint.connects == 1
    assert len(got) == 1 and isinstance(got[0], H2UpstreamStream)
    stream = got[0]
    assert not stream.connection.closing and pool.connections == []
    stream.close()
    assert stream.connection.closing


def _tls_config(tmp_path: Path, *names: str, server_names: dict | None = None) -> Config:
    apps = []
    for name in names:
        server_name = (server_names or {}).get(name, f"{name}.test")
        apps.append(
            f'[apps.{name}]\nserver_name = "{server_name}"\n'
            f'tls = {{ tls_cert_path = "{tmp_path / name}.crt", tls_cert_key_path = "{tmp_path / name}.key" }}\n'
            f'[[apps.{name}.reverse_proxy]]\nupstream = [{{ location = "127.0.0.1:1" }}]\n'
        )
    return config(*apps, top='listen_port = 8080\nlisten_port_tls = 8443\nlisten_address_v4 = "127.0.0.1"')


def test_unchanged_tls_apps_keep_their_context_and_changed_ones_are_rebuilt(tmp_path: Path):
    authority = Authority("ca")
    for name in ("a", "b"):
        authority.issue(f"{name}.test", "x.test").write(tmp_path, name)
    clock = MemoryReactorClock()
    old = build_state(_tls_config(tmp_path, "a", "b"), clock)
    authority.issue("b.test").write(tmp_path, "b")  # b's files change
    new = build_state(_tls_config(tmp_path, "a", "b"), clock, previous=old)
    assert new.tls_contexts.get("a") is old.tls_contexts.get("a")  # sessions stay resumable
    assert new.tls_contexts.get("b") is not old.tls_contexts.get("b")
    renamed = build_state(_tls_config(tmp_path, "a", "b", server_names={"a": "x.test"}), clock, previous=new)
    assert renamed.tls_contexts.get("a") is not new.tls_contexts.get("a")  # another server name
    assert renamed.tls_contexts.lookup("x.test").app_name == "a"


def test_a_bad_certificate_in_a_reload_names_the_key(tmp_path: Path):
    from rpxy.config.load import ConfigError

    authority = Authority("ca")
    authority.issue("a.test").write(tmp_path, "a")
    clock = MemoryReactorClock()
    old = build_state(_tls_config(tmp_path, "a"), clock)
    (tmp_path / "a.crt").write_text("not a certificate")
    with pytest.raises(ConfigError) as caught:
        build_state(_tls_config(tmp_path, "a"), clock, previous=old)
    assert caught.value.errors[0].startswith("apps.a.tls.tls_cert_path: ")


def test_moving_the_tls_port_with_http3_on_needs_no_restart():
    # The HTTP/3 listeners follow reloads (rpxy.front.h3.H3Listeners) like the TCP ones.
    h3_top = 'listen_port = 8080\nlisten_port_tls = {}\nlisten_address_v4 = "127.0.0.1"\n[experimental.h3]'
    a = app("a", up("127.0.0.1:1"))
    diff = diff_configs(config(a, top=h3_top.format(8443)), config(a, top=h3_top.format(9443)))
    assert diff.restart_needed == () and "listen_port_tls" in diff.settings_changed


def test_reloads_never_overlap(tmp_path: Path):
    """A reload waiting for listeners to close holds back the next one, which then runs."""
    from twisted.internet import defer

    two = 'listen_port = 8080\nlisten_address_v4 = ["127.0.0.1", "127.0.0.2"]'
    service, _reactor, path = _service(tmp_path, config_text(app("a", up("127.0.0.1:1")), top=two))
    gate: defer.Deferred = defer.Deferred()
    service.close_listeners = lambda config: gate  # a listener slow to close
    path.write_text(config_text(app("a", up("127.0.0.1:2")), top=two))
    first = service.reload(force=False, reason="test")
    path.write_text(config_text(app("a", up("127.0.0.1:3")), top=two))
    done = []
    service.reload(force=False, reason="test").addCallback(done.append)
    service.reload(force=False, reason="test")
    assert service.reloader.reloads == 0 and done == []
    service.close_listeners = lambda config: defer.succeed(None)
    gate.callback(None)
    assert first.called and done == [None]
    assert service.reloader.reloads == 2  # the first, then the two queued as one
    route = service.holder.current.apps.lookup("a.test").paths.lookup(b"/")[1]
    assert route.upstream_uris == ("http://127.0.0.1:3",)
    service.stopService()


def test_a_context_added_at_run_time_for_an_app_without_files_survives_a_reload(tmp_path: Path):
    """ACME puts contexts built from memory into the map; a reload keeps them while the
    app (same server name) is still configured."""
    from rpxy.tls import app_tls_from_material, certified_key_from_pem

    authority = Authority("ca")
    authority.issue("a.test").write(tmp_path, "a")
    leaf = authority.issue("m.test")
    memory_app = (
        '[apps.m]\nserver_name = "m.test"\ntls = { acme = true, https_redirection = false }\n'
        '[[apps.m.reverse_proxy]]\nupstream = [{ location = "127.0.0.1:1" }]\n'
    )
    top = 'listen_port = 8080\nlisten_port_tls = 8443\nlisten_address_v4 = "127.0.0.1"'
    acme = '[experimental.acme]\nemail = "admin@example.com"\n'
    a_app = config_text(_tls_app_text(tmp_path, "a"), top=top)

    def load(text: str) -> Config:
        return parse_config(tomllib.loads(text)).config

    clock = MemoryReactorClock()
    old = build_state(load(a_app + memory_app + acme), clock)
    assert old.tls_contexts.get("m") is None  # nothing until ACME adds it
    entry = app_tls_from_material("m", "m.test", certified_key_from_pem(leaf.cert_pem(), leaf.key_pem()))
    old.tls_contexts.replace(entry)
    new = build_state(load(a_app + memory_app + acme), clock, previous=old)
    assert new.tls_contexts.get("m") is entry
    gone = build_state(load(a_app + acme), clock, previous=new)
    assert gone.tls_contexts.get("m") is None


def _tls_app_text(tmp_path: Path, name: str) -> str:
    return (
        f'[apps.{name}]\nserver_name = "{name}.test"\n'
        f'tls = {{ tls_cert_path = "{tmp_path / name}.crt", tls_cert_key_path = "{tmp_path / name}.key" }}\n'
        f'[[apps.{name}.reverse_proxy]]\nupstream = [{{ location = "127.0.0.1:1" }}]\n'
    )
