"""API-SSL for the simulator, as a MikroTik router serves it.

A router's api-ssl service carries a self-signed certificate (made with `/certificate
add` and `sign`) and is addressed by IP; clients pin its SHA-256. Without a
certificate, api-ssl offers only anonymous Diffie-Hellman ciphers.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import ssl
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path


@dataclass(frozen=True)
class SelfSigned:
    """A fresh self-signed certificate, its key loaded in a server context."""

    context: ssl.SSLContext = field(repr=False)
    pem: str = field(repr=False)
    # SHA-256 of the DER certificate, lower-case hex: what a client pins.
    fingerprint: str


def self_signed(host: str = "127.0.0.1", common_name: str = "router") -> SelfSigned:
    """Generate a self-signed certificate for ``host`` (an IP or a name) with `openssl`."""
    openssl = shutil.which("openssl")
    if openssl is None:
        raise RuntimeError("serving API-SSL needs the openssl command")
    try:
        ipaddress.ip_address(host)
        alt = f"IP:{host}"
    except ValueError:
        alt = f"DNS:{host}"
    with tempfile.TemporaryDirectory(prefix="imsys-sim-tls-") as directory:
        cert, key = Path(directory) / "cert.pem", Path(directory) / "key.pem"
        subprocess.run(  # noqa: S603  # a fixed argv, no shell; host from our own caller
            [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
             "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "3650",
             "-subj", f"/CN={common_name}", "-addext", f"subjectAltName={alt}"],
            check=True, capture_output=True,
        )  # fmt: skip
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        pem = cert.read_text()
    der = ssl.PEM_cert_to_DER_cert(pem)
    return SelfSigned(context, pem, hashlib.sha256(der).hexdigest())


def no_certificate() -> ssl.SSLContext:
    """api-ssl without a certificate: anonymous (EC)DH ciphers only, TLS 1.2 at most."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers("aNULL:@SECLEVEL=0")
    return context
