"""RFC 9111 decisions for a shared cache, as plain functions (no I/O, no clock).

Everything here takes header lists (lower-case byte names, as :mod:`rpxy.message`) and
times in seconds passed in by the caller, so the whole policy is unit-tested with a table
of RFC cases. The rules are those of a *shared* cache (a reverse proxy serves many users):
``private`` responses are never stored, ``s-maxage`` wins over ``max-age``, and a request
with ``Authorization`` is stored only when the response explicitly allows it.

Malformed input is treated conservatively, never with an exception: an unparseable
``Cache-Control`` makes a response not storable, an invalid or repeated ``max-age``
makes it stale (RFC 9111 section 4.2.1), an invalid ``Expires`` means already expired
(section 5.3).

What this cache never does (and so needs no rules for): serve a stale response without
revalidating it, store partial (206) responses, or store responses to HEAD.
"""

from __future__ import annotations

import email.utils
from typing import Iterable

import attrs

from rpxy.message import Headers

__all__ = [
    "Directives",
    "parse_cache_control",
    "storable",
    "freshness_lifetime",
    "initial_age",
    "parse_http_date",
    "format_http_date",
    "request_allows_reuse",
    "vary_names",
    "vary_key",
    "conditional_headers",
    "merge_not_modified",
    "client_not_modified",
    "has_client_conditionals",
    "CACHEABLE_METHODS",
]

#: Methods whose responses this cache serves (GET entries also answer HEAD).
CACHEABLE_METHODS = frozenset((b"GET", b"HEAD"))

#: Status codes "heuristically cacheable" (RFC 9110 section 15.1): storable and given a
#: heuristic lifetime without explicit freshness. 206 is left out: no range support.
HEURISTIC_STATUSES = frozenset((200, 203, 204, 300, 301, 308, 404, 405, 410, 414, 501))

#: Status codes this cache understands well enough to store with explicit freshness.
UNDERSTOOD_STATUSES = HEURISTIC_STATUSES | frozenset((302, 307))

#: Cap on a heuristic lifetime (10 % of the time since Last-Modified), as common caches do.
HEURISTIC_MAX = 24 * 3600.0
HEURISTIC_FRACTION = 0.1

#: Largest delta-seconds honoured (RFC 9111 section 1.2.2 suggests 2^31).
_MAX_DELTA = 2**31

#: Header fields a 304 must not overwrite in the stored response (RFC 9111 section 3.2:
#: framing and content describe the stored body, not the empty 304).
_KEEP_ON_304 = frozenset((b"content-length", b"content-encoding", b"transfer-encoding", b"content-range"))

#: Request header fields that make a request conditional (or partial).
_CLIENT_CONDITIONALS = frozenset(
    (b"if-none-match", b"if-modified-since", b"if-match", b"if-unmodified-since", b"if-range", b"range")
)


@attrs.frozen
class Directives:
    """Parsed Cache-Control: directive name → argument (None when it has none).

    ``malformed``: something could not be parsed; callers then refuse to store.
    ``repeated``: directive names that appeared more than once (conflicting values are
    treated as stale, RFC 9111 section 4.2.1).
    """

    values: dict[str, str | None]
    malformed: bool = False
    repeated: frozenset[str] = frozenset()

    def __contains__(self, name: str) -> bool:
        return name in self.values

    def seconds(self, name: str) -> int | None:
        """A delta-seconds argument; -1 when present but invalid or repeated (= stale)."""
        if name not in self.values:
            return None
        value = self.values[name]
        if name in self.repeated or value is None or not value.isdigit() or not value.isascii():
            return -1
        return min(int(value), _MAX_DELTA)


_EMPTY = Directives({})


def _split_list(value: str) -> tuple[list[str], bool]:
    """Split a comma-separated list, respecting quoted strings; ``(items, malformed)``."""
    items: list[str] = []
    current: list[str] = []
    quoted = False
    escaped = False
    for char in value:
        if escaped:
            current.append(char)
            escaped = False
        elif quoted and char == "\\":
            current.append(char)
            escaped = True
        elif char == '"':
            quoted = not quoted
            current.append(char)
        elif char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    items.append("".join(current))
    return items, quoted


def parse_cache_control(values: Iterable[bytes]) -> Directives:
    """Parse every Cache-Control field line of a message into one :class:`Directives`."""
    result: dict[str, str | None] = {}
    repeated: set[str] = set()
    malformed = False
    for raw in values:
        try:
            text = raw.decode("ascii")
        except UnicodeDecodeError:
            malformed = True
            continue
        items, bad = _split_list(text)
        malformed |= bad
        for item in items:
            item = item.strip()
            if not item:
                continue
            name, sep, argument = item.partition("=")
            name = name.strip().lower()
            if not name or not all(c.isalnum() or c in "-_!#$%&'*+.^`|~" for c in name):
                malformed = True
                continue
            arg: str | None = None
            if sep:
                arg = argument.strip()
                if len(arg) >= 2 and arg[0] == '"' and arg[-1] == '"':
                    arg = arg[1:-1].replace("\\", "")
            if name in result:
                repeated.add(name)
            result[name] = arg
    if not result and not malformed:
        return _EMPTY
    return Directives(result, malformed, frozenset(repeated))


def _values(headers: Headers, name: bytes) -> list[bytes]:
    return [value for key, value in headers if key == name]


def _first(headers: Headers, name: bytes) -> bytes | None:
    for key, value in headers:
        if key == name:
            return value
    return None


def response_directives(headers: Headers) -> Directives:
    return parse_cache_control(_values(headers, b"cache-control"))


def parse_http_date(value: bytes | None) -> float | None:
    """Seconds since the epoch of an HTTP-date (all three RFC 9110 formats), else None."""
    if value is None:
        return None
    try:
        parsed = email.utils.parsedate_tz(value.decode("latin-1"))
        if parsed is None:
            return None
        return float(email.utils.mktime_tz(parsed))
    except (ValueError, OverflowError, TypeError, IndexError):
        return None


def format_http_date(seconds: float) -> bytes:
    return email.utils.formatdate(seconds, usegmt=True).encode("ascii")


def storable(
    method: bytes,
    status: int,
    request_headers: Headers,
    response_headers: Headers,
    now: float,
    *,
    client_certificate: bool = False,
) -> tuple[bool, str]:
    """May a shared cache store this response (RFC 9111 section 3)? ``(yes, why not)``.

    ``client_certificate``: the request was authenticated by a TLS client certificate (an
    mTLS app); it is treated like a request with ``Authorization`` (section 3.5).

    Beyond the RFC minimum, a response that could never be reused without a round trip
    to the origin (no freshness left, e.g. an ``Age`` beyond its ``max-age``, and no
    validator) is not stored: it would only evict useful entries.
    """
    if method != b"GET":
        return False, "method"  # HEAD responses never carry the body a GET entry needs
    if status not in UNDERSTOOD_STATUSES:
        return False, "status"
    request_cc = parse_cache_control(_values(request_headers, b"cache-control"))
    if "no-store" in request_cc:
        return False, "request no-store"
    cc = response_directives(response_headers)
    if cc.malformed:
        return False, "malformed cache-control"
    if "no-store" in cc:
        return False, "no-store"
    if "private" in cc:
        return False, "private"  # qualified private="field" too: the conservative reading
    for value in _values(response_headers, b"vary"):
        if b"*" in value:
            return False, "vary *"
    explicit = "public" in cc or "s-maxage" in cc
    authenticated = client_certificate or _first(request_headers, b"authorization") is not None
    if authenticated and not (explicit or "must-revalidate" in cc):
        return False, "authorization"
    if _first(response_headers, b"set-cookie") is not None and not explicit:
        return False, "set-cookie"
    has_freshness = "s-maxage" in cc or "max-age" in cc or _first(response_headers, b"expires") is not None
    if not has_freshness and status not in HEURISTIC_STATUSES and "public" not in cc:
        return False, "no explicit freshness"
    if (
        freshness_lifetime(status, response_headers, now) <= initial_age(response_headers, now, now)
        and _first(response_headers, b"etag") is None
        and _first(response_headers, b"last-modified") is None
    ):
        return False, "never reusable"
    return True, ""


def freshness_lifetime(status: int, headers: Headers, response_time: float) -> float:
    """Seconds the response stays fresh (RFC 9111 section 4.2.1), for a shared cache.

    s-maxage, then max-age, then Expires - Date, then a heuristic (only for heuristically
    cacheable statuses without explicit freshness and with Last-Modified; ``public`` also
    allows it). ``no-cache`` means 0: stored, but revalidated before every reuse.
    """
    cc = response_directives(headers)
    if cc.malformed or "no-cache" in cc:
        return 0.0
    for name in ("s-maxage", "max-age"):
        seconds = cc.seconds(name)
        if seconds is not None:
            return float(max(seconds, 0))
    expires_values = _values(headers, b"expires")
    if expires_values:
        if len(expires_values) > 1:
            return 0.0
        expires = parse_http_date(expires_values[0])
        if expires is None:
            return 0.0  # invalid Expires (e.g. "0"): already expired
        date = parse_http_date(_first(headers, b"date"))
        if date is None:
            date = response_time
        return max(0.0, expires - date)
    if status in HEURISTIC_STATUSES or "public" in cc:
        last_modified = parse_http_date(_first(headers, b"last-modified"))
        if last_modified is not None:
            date = parse_http_date(_first(headers, b"date"))
            if date is None:
                date = response_time
            if date > last_modified:
                return min(HEURISTIC_MAX, (date - last_modified) * HEURISTIC_FRACTION)
    return 0.0


def initial_age(headers: Headers, request_time: float, response_time: float) -> float:
    """``corrected_initial_age`` of RFC 9111 section 4.2.3 (Age and Date of the response).

    The current age is then ``initial_age + (now - response_time)``.
    """
    age_value = 0
    age = _first(headers, b"age")
    if age is not None:
        text = age.strip()
        if text.isdigit():
            age_value = min(int(text), _MAX_DELTA)
        # an invalid Age is ignored (RFC 9111 section 5.1)
    date = parse_http_date(_first(headers, b"date"))
    apparent_age = max(0.0, response_time - date) if date is not None else 0.0
    response_delay = max(0.0, response_time - request_time)
    return max(apparent_age, age_value + response_delay)


def request_allows_reuse(request_headers: Headers, age: float, lifetime: float) -> tuple[bool, str]:
    """May a stored response of this ``age`` and ``lifetime`` answer this request unvalidated?

    ``(yes, fwd reason)``: the reason is the RFC 9211 ``fwd`` value when not (``request``
    when the client asked to bypass, ``stale`` when the entry is too old). Stale responses
    are never served (``max-stale`` is not honoured), so ``must-revalidate`` always holds.
    """
    lines = _values(request_headers, b"cache-control")
    if not lines:
        # HTTP/1.0 clients (RFC 9111 section 5.4): Pragma counts only without Cache-Control.
        pragma = _first(request_headers, b"pragma")
        if pragma is not None and b"no-cache" in pragma.lower():
            return False, "request"
    cc = parse_cache_control(lines)
    if "no-cache" in cc:
        return False, "request"
    max_age = cc.seconds("max-age")
    if max_age is not None and (max_age <= 0 or age > max_age):
        return False, "request" if max_age <= 0 else "stale"
    remaining = lifetime - age
    min_fresh = cc.seconds("min-fresh")
    if min_fresh is not None and min_fresh > 0:
        remaining -= min_fresh
    if remaining <= 0:
        return False, "stale"
    return True, ""


def only_if_cached(request_headers: Headers) -> bool:
    return "only-if-cached" in parse_cache_control(_values(request_headers, b"cache-control"))


def vary_names(response_headers: Headers) -> tuple[bytes, ...] | None:
    """The request fields a response varies on, lower-case and sorted; None for ``Vary: *``."""
    names: set[bytes] = set()
    for value in _values(response_headers, b"vary"):
        for item in value.split(b","):
            item = item.strip().lower()
            if item == b"*":
                return None
            if item:
                names.add(item)
    return tuple(sorted(names))


def vary_key(names: tuple[bytes, ...], request_headers: Headers) -> tuple[bytes, ...]:
    """The request's values of the Vary'd fields, normalised (lines joined, spaces collapsed).

    Two requests select the same stored response only when these are equal (RFC 9111
    section 4.1); an absent field and an empty one are different.
    """
    if not names:
        return ()
    key = []
    for name in names:
        values = [b" ".join(value.split()) for key_name, value in request_headers if key_name == name]
        key.append(b", ".join(values) if values else b"\x00absent")
    return tuple(key)


def conditional_headers(stored_headers: Headers) -> Headers:
    """Request fields revalidating a stored response (RFC 9111 section 4.3.1)."""
    out: Headers = []
    etag = _first(stored_headers, b"etag")
    if etag is not None:
        out.append((b"if-none-match", etag))
    last_modified = _first(stored_headers, b"last-modified")
    if last_modified is not None:
        out.append((b"if-modified-since", last_modified))
    return out


def has_client_conditionals(request_headers: Headers) -> bool:
    """The client made its own conditional or range request (the cache then adds none)."""
    return any(name in _CLIENT_CONDITIONALS for name, _ in request_headers)


def merge_not_modified(stored_headers: Headers, new_headers: Headers) -> Headers:
    """Freshen stored header fields with those of a 304 (RFC 9111 section 3.2 and 4.3.4).

    Every field the 304 carries replaces all stored lines of that name, except the
    fields that describe the stored body's framing.
    """
    replace = {name for name, _ in new_headers if name not in _KEEP_ON_304}
    merged = [item for item in stored_headers if item[0] not in replace]
    merged.extend(item for item in new_headers if item[0] in replace)
    return merged


def _etags(value: bytes) -> list[bytes]:
    return [tag.strip().removeprefix(b"W/") for tag in value.split(b",") if tag.strip()]


def client_not_modified(request_headers: Headers, stored_headers: Headers) -> bool:
    """Would the origin answer this client's conditional GET with 304 (RFC 9110 13.2.2)?

    If-None-Match (weak comparison) wins over If-Modified-Since.
    """
    if_none_match = _values(request_headers, b"if-none-match")
    if if_none_match:
        etag = _first(stored_headers, b"etag")
        wanted = [tag for value in if_none_match for tag in _etags(value)]
        if b"*" in wanted:
            return True
        return etag is not None and etag.strip().removeprefix(b"W/") in wanted
    since = parse_http_date(_first(request_headers, b"if-modified-since"))
    if since is not None:
        last_modified = parse_http_date(_first(stored_headers, b"last-modified"))
        return last_modified is not None and last_modified <= since
    return False


#: Header fields of a 304 built from a stored response (RFC 9110 section 15.4.5).
NOT_MODIFIED_FIELDS = frozenset(
    (b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary", b"last-modified", b"server")
)


def invalidates(method: bytes) -> bool:
    """An unsafe request invalidates the stored responses for its URI (RFC 9111 section 4.4)."""
    return method not in (b"GET", b"HEAD", b"OPTIONS", b"TRACE")
