"""API-SSL the way MikroTik routers do it: self-signed certificates addressed by IP.

A router's TLS settings pick one of three ways to trust it:
- ``tls_fingerprint`` (the usual case): the SHA-256 of its certificate, pinned. Chain
  and host name are not checked; the certificate must be exactly that one. The pin is
  compared after the handshake and before the login, so a password never reaches
  another peer.
- ``tls_ca``: the certificate must chain to this PEM; no host name check (routers are
  addressed by IP, their certificates rarely name it).
- ``tls_verify = False``: anything is accepted; logged as a warning at every connect.
With none of them, the system's CAs and a host name check apply.

A router whose api-ssl service has no certificate offers only anonymous
Diffie-Hellman ciphers, which no context here accepts; ``anonymous_only`` tells that
case apart so the error can name the remedy.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import ssl
from typing import TYPE_CHECKING, Final

from imsys.routeros.errors import RouterTLSError

if TYPE_CHECKING:
    from imsys.routeros.target import RouterTarget

_HEX_PAIRS: Final = re.compile(r"^[0-9a-f]{64}$")

NO_CERTIFICATE_REMEDY: Final = (
    "the router's api-ssl service has no certificate, so it offers only anonymous "
    "Diffie-Hellman ciphers, which imsys refuses; give it a certificate (/certificate "
    "add name=api common-name=<router IP>, /certificate sign api, then /ip service set "
    "api-ssl certificate=api) and pin its SHA-256 as tls_fingerprint"
)


def normalize_fingerprint(text: str) -> str:
    """``AB:CD:…`` or ``abcd…`` (64 hex digits, any case, colons or spaces) → lower hex."""
    cleaned = re.sub(r"[\s:]", "", text).lower()
    if not _HEX_PAIRS.match(cleaned):
        raise ValueError("tls_fingerprint must be a SHA-256: 64 hex digits (colons allowed)")
    return cleaned


def fingerprint(der: bytes) -> str:
    """SHA-256 of a DER certificate, lower-case hex without separators."""
    return hashlib.sha256(der).hexdigest()


def client_context(
    target: RouterTarget, default: ssl.SSLContext | None = None
) -> ssl.SSLContext | None:
    """The SSL context for ``target`` (None for plain API).

    ``default`` serves targets with no TLS setting of their own (the system CAs
    otherwise).
    """
    if not target.use_tls:
        return None
    if target.tls_ca is not None:
        try:
            context = ssl.create_default_context(cadata=target.tls_ca)
        except (ssl.SSLError, ValueError):
            raise RouterTLSError(
                f"{target.label}: tls_ca is not a usable PEM certificate",
                router_id=target.router_id,
            ) from None
        context.check_hostname = False
        return context
    if target.tls_fingerprint is not None or not target.tls_verify:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return default if default is not None else ssl.create_default_context()


def peer_fingerprint(writer: asyncio.StreamWriter) -> str | None:
    """SHA-256 of the certificate the peer presented on this TLS stream."""
    ssl_object = writer.get_extra_info("ssl_object")
    der = None if ssl_object is None else ssl_object.getpeercert(binary_form=True)
    return None if der is None else fingerprint(der)


async def anonymous_only(host: str, port: int, limit: float) -> bool:
    """True when the peer completes a TLS handshake with an anonymous cipher only.

    A probe after a failed handshake: it offers nothing but anonymous ciphers, sends no
    byte of the API and closes at once.
    """
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.maximum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.set_ciphers("aNULL:@SECLEVEL=0")
        async with asyncio.timeout(limit):
            _reader, writer = await asyncio.open_connection(host, port, ssl=context)
    except (OSError, TimeoutError, ssl.SSLError):
        return False
    try:
        cipher = writer.get_extra_info("cipher")
        return cipher is not None and ("ADH" in cipher[0] or "AECDH" in cipher[0])
    finally:
        writer.transport.abort()
