"""Certificate files and config snippets for integration tests of the TLS port.

:class:`Pki` owns three authorities (the servers' CA, the CA trusted for client
certificates, and a foreign CA nobody trusts) and writes, per app, a leaf certificate
chain and its key in the format asked for (PKCS#8, PKCS#1 RSA, SEC1 EC).
:func:`tls_app` renders one ``[apps.<name>]`` table with a ``tls`` inline table.
"""

from __future__ import annotations

from pathlib import Path

import attrs

from tests.support.tlsgen import Authority, KeyFormat, KeyKind, Leaf


@attrs.define
class Site:
    app: str  # the [apps.<key>] name
    server_name: str
    cert: Path
    key: Path
    leaf: Leaf


class Pki:
    def __init__(self, directory: Path) -> None:
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.ca = Authority("rpxy it server CA")
        self.ca_file = self.ca.write_cert(directory / "server-ca.pem")
        self.client_ca = Authority("rpxy it client CA")
        self.client_ca_file = self.client_ca.write_cert(directory / "client-ca.pem")
        self.foreign_ca = Authority("rpxy it foreign CA")

    def site(
        self,
        app: str,
        server_name: str,
        *,
        names: tuple[str, ...] | None = None,
        kind: KeyKind = "ec",
        key_format: KeyFormat = "pkcs8",
        key_mode: int = 0o600,
    ) -> Site:
        """Issue and write ``<app>.crt`` / ``<app>.key`` for ``server_name`` (or ``names``)."""
        leaf = self.ca.issue(*(names or (server_name,)), kind=kind)
        cert, key = leaf.write(self.dir, app, key_format=key_format, key_mode=key_mode)
        return Site(app=app, server_name=server_name, cert=cert, key=key, leaf=leaf)

    def reissue(self, site: Site, *, kind: KeyKind = "ec") -> Leaf:
        """A new certificate and key (new serial) for ``site``, written over its files."""
        leaf = self.ca.issue(site.server_name, kind=kind)
        # The key first: a poll between the two writes sees a mismatch and keeps the old pair.
        site.key.write_bytes(leaf.key_pem())
        site.cert.write_bytes(leaf.cert_pem())
        site.leaf = leaf
        return leaf

    def client(self, stem: str, authority: Authority) -> tuple[Path, Path]:
        """A client certificate (clientAuth) from ``authority``, written as ``<stem>.crt/.key``."""
        leaf = authority.issue(client=True, common_name=stem)
        return leaf.write(self.dir / "clients", stem)


def tls_app(
    site: Site,
    *upstreams: str,
    client_ca: Path | None = None,
    https_redirection: bool | None = None,
    routes: str = "",
    route_options: str = "",
) -> str:
    """``[apps.<app>]`` with TLS and a default route to ``upstreams`` (``host:port``).

    ``route_options``: more ``key = value`` lines for the default route; ``routes``: more
    ``[[apps.<app>.reverse_proxy]]`` tables, verbatim.
    """
    tls = [f'tls_cert_path = "{site.cert}"', f'tls_cert_key_path = "{site.key}"']
    if client_ca is not None:
        tls.append(f'client_ca_cert_path = "{client_ca}"')
    if https_redirection is not None:
        tls.append(f"https_redirection = {'true' if https_redirection else 'false'}")
    ups = ", ".join(f'{{ location = "{u}" }}' for u in upstreams)
    return (
        f"[apps.{site.app}]\n"
        f'server_name = "{site.server_name}"\n'
        f"tls = {{ {', '.join(tls)} }}\n"
        f"[[apps.{site.app}.reverse_proxy]]\n"
        f"upstream = [{ups}]\n"
        f"{route_options}\n"
        f"{routes}\n"
    )
