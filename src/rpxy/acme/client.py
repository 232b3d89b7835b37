"""One ACME order, synchronously, with certbot's ``acme`` library (5.x) and josepy.

Everything here blocks (HTTP requests, polling with ``time.sleep``): it runs on the
ACME service's own worker thread, never on the reactor. The challenge responder lives
on the reactor; :func:`order_certificate` reaches it only through the ``install`` /
``uninstall`` callables, which the service makes thread-safe.

``acme`` 5.x no longer knows TLS-ALPN-01 (certbot dropped it with pyOpenSSL), so that
challenge arrives as ``UnrecognizedChallenge`` and is answered with an empty JSON
object, as RFC 8737 section 3 prescribes.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Callable

import attrs
import josepy as jose
from acme import challenges, client, crypto_util, errors, messages
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from rpxy.acme.challenge import key_authorization, private_key_pem
from rpxy.acme.registry import Registry

__all__ = ["OrderFailed", "OrderResult", "describe_error", "order_certificate"]

USER_AGENT = "rpxy-twisted"
#: How long one order may take from the first request to the downloaded chain.
ORDER_DEADLINE = datetime.timedelta(seconds=120)

CHALLENGE_TYPES = ("tls-alpn-01", "http-01")


class _EmptyResponse(challenges.ChallengeResponse):
    """``{}``: the payload that tells the CA "validate now" for TLS-ALPN-01 and HTTP-01."""

    typ = "empty"

    def to_partial_json(self) -> dict:
        return {}

    def __bool__(self) -> bool:
        # ClientNetwork sends an empty payload (a POST-as-GET, which does not start the
        # validation) for a falsy object, and a josepy object without fields is falsy.
        return True


class OrderFailed(Exception):
    """An order that did not produce a certificate; ``document`` is the CA's error, as JSON."""

    def __init__(self, message: str, document: str | None = None) -> None:
        super().__init__(message)
        self.document = document


@attrs.frozen
class OrderResult:
    cert_pem: bytes  # full chain, leaf first
    key_pem: bytes


# install(domain, challenge_type, token, key_authorization); uninstall(domain, token)
Install = Callable[[str, str, str, str], None]
Uninstall = Callable[[str, str], None]


def _error_json(error: messages.Error | None) -> str | None:
    if error is None:
        return None
    try:
        return json.dumps(error.to_partial_json(), sort_keys=True, default=str)
    except Exception:
        return str(error)


def describe_error(exc: BaseException) -> OrderFailed:
    """Turn whatever the ``acme`` library raised into an :class:`OrderFailed` with the
    CA's problem document (RFC 8555 section 6.7) when there is one."""
    if isinstance(exc, OrderFailed):
        return exc
    if isinstance(exc, messages.Error):
        return OrderFailed(f"the CA refused: {exc}", _error_json(exc))
    if isinstance(exc, errors.ValidationError):
        documents = []
        for authzr in exc.failed_authzrs:
            for challb in authzr.body.challenges:
                if challb.error is not None:
                    documents.append(
                        {"identifier": authzr.body.identifier.value, "challenge": challb.chall.to_partial_json().get("type"),
                         "error": json.loads(_error_json(challb.error) or "null")}
                    )
        return OrderFailed("challenge validation failed", json.dumps(documents, sort_keys=True, default=str))
    if isinstance(exc, errors.IssuanceError):
        return OrderFailed("the CA refused to issue", _error_json(exc.error))
    if isinstance(exc, errors.TimeoutError):
        return OrderFailed("the order timed out")
    return OrderFailed(f"{type(exc).__name__}: {exc}")


def _account(registry: Registry, dir_url: str, email: str, verify: bool | str) -> tuple[client.ClientV2, jose.JWK]:
    key_pem = registry.account_key_pem()
    private = serialization.load_pem_private_key(key_pem, password=None)
    if not isinstance(private, ec.EllipticCurvePrivateKey):
        raise OrderFailed(f'"{registry.account_key_path}" is not an EC P-256 key')
    jwk = jose.JWKEC(key=private)
    net = client.ClientNetwork(jwk, alg=jose.ES256, user_agent=USER_AGENT, verify_ssl=verify)  # type: ignore[arg-type]
    directory = client.ClientV2.get_directory(dir_url, net)
    acme = client.ClientV2(directory, net)
    registration = messages.NewRegistration.from_data(email=email, terms_of_service_agreed=True)
    try:
        acme.new_account(registration)
    except errors.ConflictError as existing:  # the key is already registered: use that account
        regr = messages.RegistrationResource(uri=existing.location, body=messages.Registration())
        net.account = regr
        net.account = acme.query_registration(regr)
    return acme, jwk


def order_certificate(
    registry: Registry,
    *,
    dir_url: str,
    email: str,
    domain: str,
    challenge_type: str,
    install: Install,
    uninstall: Uninstall,
    verify: bool | str = True,
) -> OrderResult:
    """Register (or find) the account, order a certificate for ``domain``, answer its
    challenge through ``install``, finalize with a CSR for a new P-256 key and return
    the chain and key. Raises :class:`OrderFailed` (with the CA's error document)."""
    if challenge_type not in CHALLENGE_TYPES:
        raise OrderFailed(f"unsupported challenge type {challenge_type!r}")
    installed: list[str] = []
    try:
        acme, jwk = _account(registry, dir_url, email, verify)
        thumbprint = jose.b64encode(jwk.thumbprint()).decode("ascii")
        cert_key = ec.generate_private_key(ec.SECP256R1())
        key_pem = private_key_pem(cert_key)
        csr_pem = crypto_util.make_csr(key_pem, [domain])
        order = acme.new_order(csr_pem)
        for authzr in order.authorizations:
            if authzr.body.status == messages.STATUS_VALID:
                continue  # validated recently by this account: nothing to prove
            wanted = [c for c in authzr.body.challenges if c.chall.to_partial_json().get("type") == challenge_type]
            if not wanted:
                offered = sorted({c.chall.to_partial_json().get("type") for c in authzr.body.challenges})
                raise OrderFailed(f"the CA did not offer {challenge_type} (it offered {', '.join(offered)})")
            challb = wanted[0]
            token = challb.chall.to_partial_json()["token"]
            install(domain, challenge_type, token, key_authorization(token, thumbprint))
            installed.append(token)
            try:
                acme.answer_challenge(challb, _EmptyResponse())
            except errors.ClientError as error:
                # The POST succeeded (errors raise messages.Error first); some servers,
                # Debian's pebble 2.4 among them, send no "up" link with the answer.
                if '"up" Link header missing' not in str(error):
                    raise
        deadline = datetime.datetime.now() + ORDER_DEADLINE
        order = acme.poll_and_finalize(order, deadline=deadline)
        return OrderResult(cert_pem=order.fullchain_pem.encode("ascii"), key_pem=key_pem)
    except BaseException as exc:  # noqa: BLE001 - every failure becomes an OrderFailed
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise describe_error(exc) from exc
    finally:
        for token in installed:
            try:
                uninstall(domain, token)
            except Exception:
                pass
