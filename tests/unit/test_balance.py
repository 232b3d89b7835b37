import random

import pytest

from rpxy.config.model import UpstreamConfig
from rpxy.upstream.balance import Choice, UpstreamGroup
from rpxy.upstream.health import HealthState
from rpxy.upstream.sticky import StickyCodec, find_sticky_cookie, server_id_for

UPS = tuple(UpstreamConfig(location=f"10.0.0.{i}:80", host=f"10.0.0.{i}", port=80) for i in range(3))
SECRET = b"k" * 32
NOW = 1_700_000_000.0


def group(policy, n=3, **kw):
    kw.setdefault("rng", random.Random(1))
    return UpstreamGroup(UPS[:n], policy, **kw)


def states(*healthy):
    out = []
    for h in healthy:
        s = HealthState(unhealthy_threshold=1, healthy_threshold=1)
        s.healthy = h
        out.append(s)
    return out


def picks(g, count, **kw):
    return [g.choose(**kw).index for _ in range(count)]


def test_choice_shape():
    c = group("none").choose()
    assert c == Choice(0, UPS[0], None)
    assert c.upstream is UPS[0]


def test_none_first_healthy_and_failover():
    st = states(True, True, True)
    g = group("none", states=st)
    assert picks(g, 3) == [0, 0, 0]
    st[0].healthy = False
    assert picks(g, 2) == [1, 1]
    st[1].healthy = False
    assert picks(g, 2) == [2, 2]
    st[2].healthy = False
    assert picks(g, 2) == [0, 0]  # all unhealthy: the first
    st[0].healthy = True
    assert picks(g, 1) == [0]


def test_primary_backup():
    st = states(True, True, True)
    g = group("primary_backup", states=st)
    assert picks(g, 2) == [0, 0]
    st[0].record(False)  # threshold 1: primary down
    assert not st[0].healthy
    assert picks(g, 2) == [1, 1]
    st[1].healthy = False
    assert picks(g, 1) == [2]
    st[0].record(True)  # primary back
    assert picks(g, 2) == [0, 0]
    for s in st:
        s.healthy = False
    assert picks(g, 1) == [0]


def test_round_robin_exact_rotation():
    g = group("round_robin")
    assert picks(g, 7) == [0, 1, 2, 0, 1, 2, 0]


def test_round_robin_skips_unhealthy():
    st = states(True, True, True)
    g = group("round_robin", states=st)
    assert picks(g, 2) == [0, 1]
    st[2].healthy = False
    assert picks(g, 4) == [0, 1, 0, 1]
    st[0].healthy = False
    assert picks(g, 3) == [1, 1, 1]
    st[1].healthy = False  # none healthy: rotate among all
    assert sorted(picks(g, 3)) == [0, 1, 2]
    st[2].healthy = True
    assert picks(g, 2) == [2, 2]


def test_random_seeded():
    g = group("random", rng=random.Random(42))
    ref = random.Random(42)
    got = picks(g, 200)
    assert got == [ref.randrange(3) for _ in range(200)]
    assert set(got) == {0, 1, 2}


def test_random_only_healthy():
    st = states(True, False, True)
    g = group("random", states=st, rng=random.Random(7))
    got = picks(g, 300)
    assert set(got) == {0, 2}
    assert 100 < got.count(0) < 200
    for s in st:
        s.healthy = False
    assert set(picks(g, 100)) == {0, 1, 2}


def test_single_upstream():
    for policy in ("none", "round_robin", "random", "primary_backup"):
        g = group(policy, n=1)
        assert picks(g, 3) == [0, 0, 0]
        assert g.alternative(0) is None


def test_alternative():
    st = states(True, True, True)
    g = group("round_robin", states=st)
    assert g.alternative(0).index == 1
    assert g.alternative(2).index == 0
    st[0].healthy = False
    assert g.alternative(2).index == 1
    assert g.alternative(1).index == 2
    st[2].healthy = False
    assert g.alternative(1) is None
    assert g.alternative(0).index == 1
    assert g.alternative(0).set_cookie is None


def test_accessors():
    st = states(True, False, True)
    g = group("none", states=st)
    assert g.healthy_count == 2
    assert g.states == tuple(st)
    assert len(g) == 3
    assert g.server_ids == tuple(server_id_for(u.uri, i) for i, u in enumerate(UPS))
    assert g.index_of(server_id_for("http://10.0.0.1:80", 1)) == 1
    assert g.index_of(server_id_for("http://10.0.0.1:80", 0)) is None


def test_bad_construction():
    with pytest.raises(ValueError):
        UpstreamGroup((), "none", rng=random.Random())
    with pytest.raises(ValueError):
        group("sticky")
    with pytest.raises(ValueError):
        group("weighted")
    with pytest.raises(ValueError):
        group("none", states=states(True))


# -- sticky ----------------------------------------------------------------------


def sticky_group(st=None, **kw):
    codec = StickyCodec(SECRET)
    return group("sticky", states=st, sticky=codec, domain="example.com", cookie_path="/app", **kw), codec


def cookie_value(set_cookie: bytes) -> bytes:
    return set_cookie.split(b";", 1)[0]


def test_sticky_new_cookie_then_honoured():
    g, codec = sticky_group()
    first = g.choose(now=NOW)
    assert first.index == 0
    assert first.set_cookie is not None
    parts = first.set_cookie.split(b"; ")
    assert parts[0].startswith(b"rpxy_sticky_token=")
    assert parts[1:] == [
        b"expires=Tue, 14 Nov 2023 22:18:20 GMT",
        b"Max-Age=300",
        b"path=/app",
        b"domain=example.com",
        b"HttpOnly",
        b"SameSite=Lax",
    ]
    token = find_sticky_cookie([cookie_value(first.set_cookie)])
    assert codec.decode(token, domain="example.com", path="/app", now=NOW) == g.server_ids[0]

    cookies = [b"other=1; " + cookie_value(first.set_cookie)]
    for _ in range(5):  # stays on 0 although round robin would move on
        c = g.choose(cookie_values=cookies, now=NOW + 10)
        assert (c.index, c.set_cookie) == (0, None)
    # a client without cookie gets the next upstream in rotation
    second = g.choose(now=NOW)
    assert second.index == 1 and second.set_cookie is not None


def test_sticky_secure_flag():
    g, _ = sticky_group()
    assert g.choose(now=NOW, secure=True).set_cookie.endswith(b"; SameSite=Lax; Secure")
    assert g.choose(now=NOW, secure=False).set_cookie.endswith(b"; SameSite=Lax")


def test_sticky_target_unhealthy_replaced():
    st = states(True, True, True)
    g, codec = sticky_group(st)
    value = codec.encode(g.server_ids[1], int(NOW) + 300, domain="example.com", path="/app")
    cookies = [f"rpxy_sticky_token={value}".encode()]
    assert g.choose(cookie_values=cookies, now=NOW).index == 1
    st[1].healthy = False
    c = g.choose(cookie_values=cookies, now=NOW)
    assert c.index != 1 and c.set_cookie is not None
    new = find_sticky_cookie([cookie_value(c.set_cookie)])
    assert codec.decode(new, domain="example.com", path="/app", now=NOW) == g.server_ids[c.index]


@pytest.mark.parametrize(
    "make",
    [
        lambda codec, sids: "garbage",
        lambda codec, sids: codec.encode(sids[1], int(NOW) - 1, domain="example.com", path="/app"),  # expired
        lambda codec, sids: codec.encode(sids[1], int(NOW) + 300, domain="other.com", path="/app"),
        lambda codec, sids: codec.encode(sids[1], int(NOW) + 300, domain="example.com", path="/"),
        lambda codec, sids: codec.encode("not-a-member", int(NOW) + 300, domain="example.com", path="/app"),
        lambda codec, sids: StickyCodec(b"z" * 32).encode(sids[1], int(NOW) + 300, domain="example.com", path="/app"),
    ],
)
def test_sticky_invalid_cookie_replaced(make):
    g, codec = sticky_group()
    value = make(codec, g.server_ids)
    c = g.choose(cookie_values=[f"rpxy_sticky_token={value}".encode()], now=NOW)
    assert c.index == 0  # round robin start, not the cookie's 1
    assert c.set_cookie is not None


def test_sticky_second_cookie_used_when_first_invalid():
    g, codec = sticky_group()
    good = codec.encode(g.server_ids[2], int(NOW) + 300, domain="example.com", path="/app")
    c = g.choose(cookie_values=[b"rpxy_sticky_token=bad", f"rpxy_sticky_token={good}".encode()], now=NOW)
    assert (c.index, c.set_cookie) == (2, None)


def test_sticky_reissued_near_expiry_same_upstream():
    g, codec = sticky_group()
    value = codec.encode(g.server_ids[2], int(NOW) + 100, domain="example.com", path="/app")
    c = g.choose(cookie_values=[f"rpxy_sticky_token={value}".encode()], now=NOW)
    assert c.index == 2 and c.set_cookie is not None
    token = codec.open(find_sticky_cookie([cookie_value(c.set_cookie)]), domain="example.com", path="/app", now=NOW)
    assert token.server_id == g.server_ids[2] and token.expiry == int(NOW) + 300


def test_sticky_all_unhealthy_still_answers():
    st = states(False, False, False)
    g, _ = sticky_group(st)
    assert sorted(g.choose(now=NOW).index for _ in range(3)) == [0, 1, 2]


def test_sticky_alternative_repoints_cookie():
    g, codec = sticky_group()
    alt = g.alternative(0, now=NOW, secure=True)
    assert alt.index == 1 and alt.set_cookie.endswith(b"; Secure")
    token = find_sticky_cookie([cookie_value(alt.set_cookie)])
    assert codec.decode(token, domain="example.com", path="/app", now=NOW) == g.server_ids[1]
    assert g.alternative(0).set_cookie is None
