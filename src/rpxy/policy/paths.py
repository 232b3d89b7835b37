"""Request-target helpers: split off the query, apply a route's ``replace_path``."""

from __future__ import annotations

__all__ = ["rewrite_path", "split_path_query"]


def split_path_query(path: bytes) -> tuple[bytes, bytes]:
    """``/p?q`` -> ``(b"/p", b"?q")``; the query keeps its ``?`` (b"" when there is none).

    Keeping the ``?`` lets callers re-join with a plain concatenation and keeps a
    present-but-empty query (``/p?``) distinguishable from no query.
    """
    mark = path.find(b"?")
    if mark < 0:
        return path, b""
    return path[:mark], path[mark:]


def rewrite_path(path_and_query: bytes, matched_prefix: bytes, replace_path: bytes | None) -> bytes:
    """Replace the route prefix ``matched_prefix`` at the start of ``path_and_query``.

    ``matched_prefix`` is what :meth:`rpxy.routing.PathRouter.lookup` returned, so
    the path is known to start with it on a segment boundary. Like rpxy the prefix
    is swapped for ``replace_path`` and the rest (sub-path and query) kept, but the
    join never doubles or drops the slash between them::

        /path/another/xx?q=1  (prefix /path/another, replace /path) -> /path/xx?q=1
        /subapp1/x            (prefix /subapp1, replace /)          -> /x
        /subapp1              (prefix /subapp1, replace /)          -> /
        /subapp1?a            (prefix /subapp1, replace /)          -> /?a
        /x                    (prefix /, replace /app)              -> /app/x

    (rpxy concatenates blindly and would send ``//x`` and ``/appx`` for the last
    two shapes.) With ``replace_path`` None the input is returned unchanged.
    """
    if replace_path is None:
        return path_and_query
    size = len(matched_prefix)
    if matched_prefix.endswith(b"/"):
        # The prefix owns the slash that separates it from the rest: give it back
        # to the rest so that the rest always starts with '/' or '?' or is empty.
        size -= 1
    rest = path_and_query[size:]
    if not replace_path:
        replace_path = b"/"
    if rest[:1] == b"/":
        if replace_path.endswith(b"/"):
            return replace_path[:-1] + rest
        return replace_path + rest
    # rest is b"" or a query.
    return replace_path + rest
