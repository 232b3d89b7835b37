"""The on-disk ACME registry under ``[experimental.acme] registry_path``.

Layout (one folder per ACME directory URL, so a staging and a production CA never
mix accounts or certificates)::

    <registry_path>/                       0700
      <ca-host>-<sha256(dir_url)[:12]>/    0700
        account.key                        0600  account key (PKCS#8 PEM, P-256)
        lock                               0600  flock()ed while an instance orders
        <domain>/                          0700
          cert.pem                         0644  full chain, leaf first
          key.pem                          0600  the certificate's private key

Files are written to a temporary name in the same folder and renamed, so a reader
(this instance after a restart, or another instance sharing the registry) never
sees half a file; the key is renamed before the certificate, so a new certificate
is never paired with an old key.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import tempfile
from urllib.parse import urlsplit

import attrs
from cryptography.hazmat.primitives.asymmetric import ec

from rpxy.acme.challenge import private_key_pem

__all__ = ["DomainFiles", "OrderLock", "Registry"]

_DIR_MODE = 0o700
_KEY_MODE = 0o600
_CERT_MODE = 0o644


def directory_id(dir_url: str) -> str:
    host = urlsplit(dir_url).hostname or "ca"
    safe = "".join(c if c.isalnum() or c in "-." else "_" for c in host)
    return f"{safe}-{hashlib.sha256(dir_url.encode()).hexdigest()[:12]}"


def _write_atomic(path: str, data: bytes, mode: int) -> None:
    folder = os.path.dirname(path)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=folder)
    try:
        os.fchmod(fd, mode)  # before any byte of a key is written
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@attrs.frozen
class DomainFiles:
    """A stored certificate: the PEM bytes and a signature to notice changes cheaply."""

    cert_pem: bytes
    key_pem: bytes
    signature: tuple[int, int, int]


class OrderLock:
    """An exclusive ``flock`` on ``<ca folder>/lock``: one ordering instance at a time.

    ``flock`` is released by the kernel when the process dies, so a crashed instance
    never blocks the others. The file names the holder (host and pid) for humans.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self) -> bool:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, _KEY_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(fd)
            if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                return False
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"{socket.gethostname()} {os.getpid()}\n".encode())
        self._fd = fd
        return True

    def holder(self) -> str:
        try:
            with open(self.path, encoding="utf-8", errors="replace") as handle:
                return handle.read().strip() or "unknown"
        except OSError:
            return "unknown"

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)


class Registry:
    """Account key, certificates and the order lock of one ACME directory."""

    def __init__(self, registry_path: str, dir_url: str) -> None:
        self.root = os.path.abspath(registry_path)
        self.path = os.path.join(self.root, directory_id(dir_url))

    def ensure(self) -> None:
        """Create the folders (0700); tighten them if they exist with looser modes."""
        for folder in (self.root, self.path):
            os.makedirs(folder, mode=_DIR_MODE, exist_ok=True)
            os.chmod(folder, _DIR_MODE)

    # -- account -------------------------------------------------------------------

    @property
    def account_key_path(self) -> str:
        return os.path.join(self.path, "account.key")

    def account_key_pem(self) -> bytes:
        """The account key, created (P-256, mode 0600) on first use."""
        self.ensure()
        try:
            with open(self.account_key_path, "rb") as handle:
                return handle.read()
        except FileNotFoundError:
            pem = private_key_pem(ec.generate_private_key(ec.SECP256R1()))
            _write_atomic(self.account_key_path, pem, _KEY_MODE)
            return pem

    # -- certificates --------------------------------------------------------------

    def domain_path(self, domain: str) -> str:
        if not domain or "/" in domain or domain.startswith("."):
            raise ValueError(f"unsafe domain name {domain!r}")
        return os.path.join(self.path, domain.lower())

    def cert_path(self, domain: str) -> str:
        return os.path.join(self.domain_path(domain), "cert.pem")

    def key_path(self, domain: str) -> str:
        return os.path.join(self.domain_path(domain), "key.pem")

    def signature(self, domain: str) -> tuple[int, int, int] | None:
        """(mtime_ns, size, inode) of the certificate file, or None when absent."""
        try:
            st = os.stat(self.cert_path(domain))
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def load(self, domain: str) -> DomainFiles | None:
        """The stored certificate and key of ``domain``, or None when either is missing."""
        try:
            sig = self.signature(domain)
            with open(self.key_path(domain), "rb") as handle:
                key_pem = handle.read()
            with open(self.cert_path(domain), "rb") as handle:
                cert_pem = handle.read()
        except OSError:
            return None
        if sig is None:
            return None
        return DomainFiles(cert_pem=cert_pem, key_pem=key_pem, signature=sig)

    def store(self, domain: str, cert_pem: bytes, key_pem: bytes) -> None:
        """Persist a new certificate: the key (0600) first, then the chain."""
        self.ensure()
        folder = self.domain_path(domain)
        os.makedirs(folder, mode=_DIR_MODE, exist_ok=True)
        os.chmod(folder, _DIR_MODE)
        _write_atomic(self.key_path(domain), key_pem, _KEY_MODE)
        _write_atomic(self.cert_path(domain), cert_pem, _CERT_MODE)

    def lock(self) -> OrderLock:
        self.ensure()
        return OrderLock(os.path.join(self.path, "lock"))
