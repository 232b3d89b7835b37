"""Choosing an upstream for one request: rpxy's five ``load_balance`` policies.

Sans-IO. Health comes from shared :class:`~rpxy.upstream.health.HealthState`
objects that a health checker mutates; a group only reads ``.healthy`` when it
chooses. Randomness (``rng``) and time (``now``) are parameters.

Policies (every "among healthy" falls back to "among all" when none is healthy):

* ``none``: the first healthy upstream in configured order.
* ``primary_backup``: the same rule; the first upstream is the primary, the rest
  backups in order.
* ``round_robin``: rotate through the healthy upstreams.
* ``random``: uniform among the healthy upstreams (``rng.randrange``).
* ``sticky``: a valid ``rpxy_sticky_token`` naming a healthy upstream of this group
  wins, with no new cookie unless it has at most ``STICKY_REISSUE_BEFORE`` seconds
  left (then the same upstream with a fresh cookie); otherwise round robin plus a
  new cookie (``Choice.set_cookie`` = the ``Set-Cookie`` header value).
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence

import attrs

from rpxy.config.model import LoadBalance, UpstreamConfig
from rpxy.upstream.health import HealthState
from rpxy.upstream.sticky import (
    STICKY_LIFETIME,
    STICKY_REISSUE_BEFORE,
    StickyCodec,
    iter_sticky_cookies,
    server_id_for,
    set_cookie_header,
)

__all__ = ["Choice", "UpstreamGroup"]


@attrs.frozen
class Choice:
    """The upstream picked for one request (``index`` into the route's upstream list).

    ``set_cookie`` is the ``Set-Cookie`` header value to add to the response, or None.
    """

    index: int
    upstream: UpstreamConfig
    set_cookie: bytes | None


class UpstreamGroup:
    """The upstreams of one route and the policy that picks among them."""

    __slots__ = (
        "_choices",
        "_cookie_path",
        "_domain",
        "_index_by_id",
        "_n",
        "_pick",
        "_rng",
        "_rr",
        "_states",
        "_sticky",
        "policy",
        "server_ids",
        "upstreams",
    )

    def __init__(
        self,
        upstreams: Sequence[UpstreamConfig],
        policy: LoadBalance,
        *,
        rng: random.Random,
        states: Sequence[HealthState] | None = None,
        sticky: StickyCodec | None = None,
        domain: str = "",
        cookie_path: str = "/",
    ) -> None:
        if not upstreams:
            raise ValueError("an upstream group needs at least one upstream")
        if states is None:
            states = [HealthState() for _ in upstreams]
        if len(states) != len(upstreams):
            raise ValueError("one HealthState per upstream")
        if policy == "sticky" and sticky is None:
            raise ValueError("load_balance = 'sticky' needs a StickyCodec (sticky_cookie_secret)")
        self.upstreams: tuple[UpstreamConfig, ...] = tuple(upstreams)
        self.policy = policy
        self._n = len(self.upstreams)
        self._states: tuple[HealthState, ...] = tuple(states)
        self._rng = rng
        self._sticky = sticky
        self._domain = domain
        self._cookie_path = cookie_path
        self._rr = 0
        self._choices = tuple(Choice(i, u, None) for i, u in enumerate(self.upstreams))
        self.server_ids: tuple[str, ...] = tuple(
            server_id_for(u.uri, i) for i, u in enumerate(self.upstreams)
        )
        self._index_by_id = {sid: i for i, sid in enumerate(self.server_ids)}
        try:
            self._pick = {
                "none": self._first_healthy,
                "primary_backup": self._first_healthy,
                "round_robin": self._round_robin,
                "random": self._random,
                "sticky": self._round_robin,
            }[policy]
        except KeyError:
            raise ValueError(f"unknown load_balance policy {policy!r}") from None

    # -- accessors -------------------------------------------------------------

    @property
    def states(self) -> tuple[HealthState, ...]:
        return self._states

    @property
    def healthy_count(self) -> int:
        return sum(1 for s in self._states if s.healthy)

    def __len__(self) -> int:
        return self._n

    def index_of(self, server_id: str) -> int | None:
        """The index whose sticky ``server_id`` this is, or None."""
        return self._index_by_id.get(server_id)

    # -- choosing --------------------------------------------------------------

    def choose(
        self,
        *,
        cookie_values: Iterable[bytes] = (),
        now: float = 0.0,
        secure: bool = False,
    ) -> Choice:
        """Pick the upstream for one request.

        ``cookie_values``: the request's ``Cookie`` header values (only read by
        ``sticky``); ``now``: unix seconds (cookie expiry); ``secure``: the client
        connection is https (adds ``Secure`` to a new cookie).
        """
        if self.policy != "sticky":
            return self._choices[self._pick()]
        return self._choose_sticky(cookie_values, now, secure)

    def alternative(
        self, failed_index: int, *, now: float | None = None, secure: bool = False
    ) -> Choice | None:
        """The next healthy upstream after ``failed_index`` (wrapping), never that one.

        For retrying a request whose upstream connect failed. None when there is no
        other healthy upstream. For a sticky group, passing ``now`` also re-points
        the client with a new cookie (``set_cookie``); without it ``set_cookie`` is None.
        """
        n = self._n
        states = self._states
        for step in range(1, n):
            j = (failed_index + step) % n
            if states[j].healthy:
                if now is not None and self.policy == "sticky":
                    return self._with_cookie(j, now, secure)
                return self._choices[j]
        return None

    # -- policies ------------------------------------------------------------------

    def _first_healthy(self) -> int:
        for i, state in enumerate(self._states):
            if state.healthy:
                return i
        return 0

    def _round_robin(self) -> int:
        n = self._n
        start = self._rr
        states = self._states
        for step in range(n):
            i = (start + step) % n
            if states[i].healthy:
                self._rr = (i + 1) % n
                return i
        # None healthy: rotate among all.
        self._rr = (start + 1) % n
        return start

    def _random(self) -> int:
        states = self._states
        healthy = 0
        for state in states:
            if state.healthy:
                healthy += 1
        if healthy == self._n or healthy == 0:
            return self._rng.randrange(self._n)
        r = self._rng.randrange(healthy)
        for i, state in enumerate(states):
            if state.healthy:
                if r == 0:
                    return i
                r -= 1
        raise AssertionError("unreachable")  # pragma: no cover

    def _choose_sticky(self, cookie_values: Iterable[bytes], now: float, secure: bool) -> Choice:
        codec = self._sticky
        assert codec is not None
        if cookie_values:
            for value in iter_sticky_cookies(cookie_values):
                token = codec.open(value, domain=self._domain, path=self._cookie_path, now=now)
                if token is None:
                    continue
                i = self._index_by_id.get(token.server_id)
                if i is None or not self._states[i].healthy:
                    continue
                if token.expiry - now > STICKY_REISSUE_BEFORE:
                    return self._choices[i]
                return self._with_cookie(i, now, secure)
        return self._with_cookie(self._round_robin(), now, secure)

    def _with_cookie(self, index: int, now: float, secure: bool) -> Choice:
        codec = self._sticky
        assert codec is not None
        expiry = int(now) + STICKY_LIFETIME
        value = codec.encode(
            self.server_ids[index], expiry, domain=self._domain, path=self._cookie_path
        )
        header = set_cookie_header(
            value, expiry=expiry, domain=self._domain, path=self._cookie_path, secure=secure
        )
        return Choice(index, self.upstreams[index], header)
