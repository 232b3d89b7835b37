"""CertificateWatcher: new certificates without restart, broken files keep the old one."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from twisted.logger import globalLogPublisher

from rpxy.tls import CERTIFICATE_POLL_INTERVAL, CertificateWatcher, SniContextMap


from tests.support.tlsgen import Authority, TlsHarness, client_context, make_app_tls  # noqa: E402


@pytest.fixture
def events():
    captured: list[dict] = []
    globalLogPublisher.addObserver(captured.append)
    yield captured
    globalLogPublisher.removeObserver(captured.append)


@pytest.fixture
def setup(tmp_path):
    ca = Authority("reload CA")
    contexts = SniContextMap(
        [
            make_app_tls(tmp_path, ca, "alpha", "alpha.test"),
            make_app_tls(tmp_path, ca, "beta", "beta.test"),
        ]
    )
    harness = TlsHarness(contexts)
    watcher = CertificateWatcher(contexts, harness.clock, interval=5)
    watcher.startService()
    yield ca, contexts, harness, watcher, tmp_path
    watcher.stopService()


def served(harness, sni="alpha.test"):
    session = harness.connect(sni, client_context())
    assert session.established, session.client_error
    return session.server_cert()


def replace_files(ca, tmp_path, stem, *names, key_format="pkcs8"):
    leaf = ca.issue(*names)
    leaf.write(tmp_path, stem, key_format=key_format)
    return leaf


def messages(events, level_name=None):
    from twisted.logger import formatEvent

    return [formatEvent(e) for e in events if level_name is None or e.get("log_level").name == level_name]


def test_default_interval():
    assert CERTIFICATE_POLL_INTERVAL == 60.0


def test_new_certificate_served_after_the_next_poll(setup, events):
    ca, contexts, harness, watcher, tmp_path = setup
    original = served(harness)
    keep_alive = harness.connect("alpha.test", client_context())  # established before the change
    new = replace_files(ca, tmp_path, "alpha", "alpha.test", key_format="sec1")

    assert served(harness) == original  # not before the poll
    harness.clock.advance(5)
    assert served(harness) == new.cert
    assert served(harness, "beta.test") != new.cert  # the other app untouched
    assert keep_alive.request(b"old") == b"echo:old"  # established connections keep going
    assert any("reloaded the certificate of app alpha" in m for m in messages(events, "info"))


def test_unchanged_files_are_not_rebuilt(setup):
    ca, contexts, harness, watcher, tmp_path = setup
    before = contexts.get("alpha")
    harness.clock.advance(5)
    harness.clock.advance(5)
    assert contexts.get("alpha") is before
    # Rewriting identical bytes (new mtime) is detected by the content hash.
    cert = Path(before.source.cert_path)
    cert.write_bytes(cert.read_bytes())
    os.utime(cert, ns=(1, 1))
    harness.clock.advance(5)
    assert contexts.get("alpha") is before


def test_broken_certificate_keeps_the_previous_one(setup, events):
    ca, contexts, harness, watcher, tmp_path = setup
    original = served(harness)
    cert_path = Path(contexts.get("alpha").source.cert_path)
    cert_path.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64!\n-----END CERTIFICATE-----\n")
    harness.clock.advance(5)
    assert served(harness) == original
    assert "tls_cert_path" in watcher.errors["alpha"] and str(cert_path) in watcher.errors["alpha"]
    errors = messages(events, "error")
    assert len(errors) == 1 and "keeping the previous certificate of app alpha" in errors[0]

    harness.clock.advance(5)  # the same problem is not logged again
    assert len(messages(events, "error")) == 1

    fixed = replace_files(ca, tmp_path, "alpha", "alpha.test")
    harness.clock.advance(5)
    assert served(harness) == fixed.cert
    assert "alpha" not in watcher.errors


def test_key_not_matching_yet_keeps_the_old_pair(setup):
    """A deploy that writes the certificate first and the key later."""
    ca, contexts, harness, watcher, tmp_path = setup
    original = served(harness)
    new = ca.issue("alpha.test")
    (tmp_path / "alpha.crt").write_bytes(new.cert_pem())  # key still the old one
    harness.clock.advance(5)
    assert served(harness) == original
    assert "does not match" in watcher.errors["alpha"]
    new.write(tmp_path, "alpha")
    harness.clock.advance(5)
    assert served(harness) == new.cert


def test_deleted_file_keeps_the_previous_certificate(setup):
    ca, contexts, harness, watcher, tmp_path = setup
    original = served(harness)
    key_path = Path(contexts.get("alpha").source.key_path)
    saved = key_path.read_bytes()
    key_path.unlink()
    harness.clock.advance(5)
    assert served(harness) == original
    assert "cannot read" in watcher.errors["alpha"]
    key_path.write_bytes(saved)
    os.chmod(key_path, 0o600)
    harness.clock.advance(5)
    assert "alpha" not in watcher.errors
    assert served(harness) == original


def test_client_ca_change_is_picked_up(tmp_path):
    server_ca = Authority("server")
    old_clients = Authority("old clients")
    new_clients = Authority("new clients")
    contexts = SniContextMap([make_app_tls(tmp_path, server_ca, "secure", "secure.test", client_ca=old_clients)])
    harness = TlsHarness(contexts)
    watcher = CertificateWatcher(contexts, harness.clock, interval=1)
    watcher.startService()
    try:
        alice_old = old_clients.issue(client=True, common_name="alice")
        alice_new = new_clients.issue(client=True, common_name="alice")
        assert harness.connect("secure.test", client_context(cert=alice_old)).established
        assert not harness.connect("secure.test", client_context(cert=alice_new)).established

        new_clients.write_cert(Path(contexts.get("secure").source.client_ca_path))
        harness.clock.advance(1)
        assert harness.connect("secure.test", client_context(cert=alice_new)).established
        assert not harness.connect("secure.test", client_context(cert=alice_old)).established
    finally:
        watcher.stopService()


def test_renamed_into_place_is_detected(setup):
    """Atomic replacement (write elsewhere, rename over): a new inode."""
    ca, contexts, harness, watcher, tmp_path = setup
    staging = tmp_path / "staging"
    new = ca.issue("beta.test")
    cert, key = new.write(staging, "beta")
    shutil.move(str(key), str(tmp_path / "beta.key"))
    shutil.move(str(cert), str(tmp_path / "beta.crt"))
    harness.clock.advance(5)
    assert served(harness, "beta.test") == new.cert


def test_stopped_watcher_no_longer_polls(setup):
    ca, contexts, harness, watcher, tmp_path = setup
    original = served(harness)
    watcher.stopService()
    replace_files(ca, tmp_path, "alpha", "alpha.test")
    harness.clock.advance(50)
    assert served(harness) == original
    assert harness.clock.getDelayedCalls() == []


def _same_size_rewrite(ca, entry):
    """Rewrite cert and key in place with a new leaf of identical sizes, restoring the mtimes."""
    cert_path, key_path = Path(entry.source.cert_path), Path(entry.source.key_path)
    st_cert, st_key = os.stat(cert_path), os.stat(key_path)
    for _ in range(50):
        new = ca.issue("alpha.test")
        if len(new.cert_pem()) == st_cert.st_size and len(new.key_pem()) == st_key.st_size:
            break
    else:
        pytest.skip("no same-size certificate generated")
    for path, data, st in ((cert_path, new.cert_pem(), st_cert), (key_path, new.key_pem(), st_key)):
        with open(path, "r+b") as handle:  # in place: same inode
            handle.write(data)
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    return new


@pytest.mark.parametrize("first_poll_racy", [True, False])
def test_stat_shortcut_and_racy_timestamps(tmp_path, first_poll_racy):
    """A rewrite within one timestamp tick keeps mtime, size and inode.

    If the previous poll ran within 2 s of the files' mtime it could not trust
    the stat, so it hashes again and sees the change. Otherwise the stat alone
    decides (and such a rewrite would wait for the next real change).
    """
    ca = Authority("racy CA")
    contexts = SniContextMap([make_app_tls(tmp_path, ca, "alpha", "alpha.test")])
    entry = contexts.get("alpha")
    mtime = os.stat(entry.source.cert_path).st_mtime
    now = [mtime + (0.5 if first_poll_racy else 100.0)]
    harness = TlsHarness(contexts)
    watcher = CertificateWatcher(contexts, harness.clock, interval=5, wall_clock=lambda: now[0])
    watcher.startService()
    try:
        harness.clock.advance(5)  # first poll: records the stat signatures
        original = served(harness)
        new = _same_size_rewrite(ca, entry)
        now[0] = mtime + 200.0
        harness.clock.advance(5)
        assert served(harness) == (new.cert if first_poll_racy else original)
    finally:
        watcher.stopService()


def test_removed_app_is_forgotten(setup):
    ca, contexts, harness, watcher, tmp_path = setup
    harness.clock.advance(5)
    contexts.remove("beta")
    assert watcher.poll() == []
    assert "beta" not in watcher._seen
