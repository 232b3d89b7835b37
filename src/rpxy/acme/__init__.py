"""Automatic certificates with ACME v2 (RFC 8555): TLS-ALPN-01 (RFC 8737) and HTTP-01.

Modules, bottom up:

``challenge``  [pure] key authorizations, the TLS-ALPN-01 challenge certificate, HTTP-01 paths
``schedule``   [pure] when to renew (a third of the lifetime left) and the backoff after failures
``registry``   the on-disk registry: account key, per-domain certificate and key, the order lock
``client``     one synchronous order with certbot's ``acme`` library (runs on a worker thread)
``manager``    :class:`AcmeService`, the Twisted service: schedules orders off the reactor,
               answers challenges, swaps certificates in for new handshakes

See docs/acme.md.
"""

from rpxy.acme.challenge import ACME_IDENTIFIER_OID, ACME_TLS_ALPN, acme_identifier_value, key_authorization
from rpxy.acme.manager import AcmeService
from rpxy.acme.schedule import backoff_delay, renewal_time

__all__ = [
    "ACME_IDENTIFIER_OID",
    "ACME_TLS_ALPN",
    "AcmeService",
    "acme_identifier_value",
    "backoff_delay",
    "key_authorization",
    "renewal_time",
]
