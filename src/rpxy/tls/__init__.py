"""TLS termination: per-app contexts chosen by SNI, mTLS, post-quantum groups, reload.

Modules, bottom up:

``keys``        PEM chains, keys (PKCS#8, PKCS#1 RSA, SEC1 EC), client CA bundles
``groups``      key exchange groups (X25519MLKEM768 first) through OpenSSL's group list
``names``       SNI normalisation and one-label wildcard matching
``contexts``    hardened per-app ``SSL.Context`` objects (:class:`AppTls`)
``sni``         :class:`SniContextMap`: server name -> app context
``hello``       sans-IO ClientHello reader (SNI before OpenSSL is involved)
``failures``    :class:`HandshakeFailure` records and error categories
``connections`` per-connection facts for the application layer (:func:`tls_info`)
``server``      :class:`TlsServerFactory` / :class:`SniConnectionCreator` for Twisted
``reload``      :class:`CertificateWatcher`, the certificate-file poller

See :mod:`rpxy.tls.server` for how to wire a listener.
"""

from rpxy.tls.connections import TlsInfo, connection_sni, tls_info
from rpxy.tls.contexts import (
    DEFAULT_ALPN,
    TLS12_CIPHERS,
    TLS13_CIPHERSUITES,
    AppTls,
    TlsOptions,
    TlsSource,
    app_tls_from_material,
    build_app_tls,
)
from rpxy.tls.failures import CATEGORIES, HandshakeFailure, categorize_error, categorize_failure
from rpxy.tls.groups import GROUPS, PQ_GROUP
from rpxy.tls.keys import CertifiedKey, Problem, TlsMaterialError, certified_key_from_pem, load_certified_key
from rpxy.tls.reload import CERTIFICATE_POLL_INTERVAL, CertificateWatcher
from rpxy.tls.server import HANDSHAKE_TIMEOUT, SniConnectionCreator, TlsServerFactory
from rpxy.tls.sni import SniContextMap

__all__ = [
    "AppTls",
    "CATEGORIES",
    "CERTIFICATE_POLL_INTERVAL",
    "CertificateWatcher",
    "CertifiedKey",
    "DEFAULT_ALPN",
    "GROUPS",
    "HANDSHAKE_TIMEOUT",
    "HandshakeFailure",
    "PQ_GROUP",
    "Problem",
    "SniConnectionCreator",
    "SniContextMap",
    "TLS12_CIPHERS",
    "TLS13_CIPHERSUITES",
    "TlsInfo",
    "TlsMaterialError",
    "TlsOptions",
    "TlsServerFactory",
    "TlsSource",
    "app_tls_from_material",
    "build_app_tls",
    "categorize_error",
    "categorize_failure",
    "certified_key_from_pem",
    "connection_sni",
    "load_certified_key",
    "tls_info",
]
