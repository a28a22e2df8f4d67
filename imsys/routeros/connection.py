"""One API connection: connect and log in, run one command at a time, translate failures.

A connection whose command did not end with `!done` is thrown away: after a timeout, a
reset, a close, `!fatal` or anything unexpected, nobody knows where the next reply
starts (a late `!done` would answer the next command).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable, Sequence
from typing import Any, Final

import librouteros
import structlog
from librouteros.exceptions import ConnectionClosed, FatalError, ProtocolError
from librouteros.protocol import encode_sentence

from imsys.routeros.errors import (
    RouterAuthError,
    RouterInputError,
    RouterTLSError,
    RouterTrap,
    RouterUnavailable,
    trap_class,
)
from imsys.routeros.menus import SYSTEM_REBOOT
from imsys.routeros.target import RouterTarget
from imsys.routeros.tls import NO_CERTIFICATE_REMEDY, anonymous_only, peer_fingerprint
from imsys.routeros.wire import (
    WIRE_ENCODING,
    Command,
    LoginRefused,
    RawApi,
    Refused,
    Reply,
)
from imsys.routeros.wire import login as plain_login
from imsys.routeros.words import check_ascii

log = structlog.get_logger("imsys.routeros")

# Bounded, so that shutting down never waits on a peer that stopped reading.
_CLOSE_TIMEOUT: Final = 1.0


class _CertificateRefused(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def _describe(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, FatalError):
        return f"router ended the session (!fatal {exc})"
    if isinstance(exc, ConnectionClosed):
        return "connection closed by the router"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _handshake_failure(exc: BaseException) -> bool:
    """An error of the TLS handshake itself (not of reaching the port)."""
    if isinstance(exc, ssl.SSLError):
        return True
    return isinstance(exc, (ConnectionResetError, ConnectionAbortedError, ConnectionClosed))


def _check_pin(target: RouterTarget, writer: asyncio.StreamWriter) -> None:
    expected = target.tls_fingerprint
    if expected is None:
        return
    got = peer_fingerprint(writer)
    if got != expected:
        raise _CertificateRefused(
            f"TLS certificate refused: its SHA-256 is {got or 'absent'}, "
            f"tls_fingerprint expects {expected}"
        )


def _check_sentence(command: str, words: Sequence[str]) -> None:
    # The session builds checked words already; this makes "never half a sentence"
    # hold for every path that reaches the socket.
    for word in (command, *words):
        if not word.isascii():
            raise RouterInputError(f"{command}: a word is not ASCII; nothing was sent")


class Connection:
    """A logged-in API connection to one router. Not safe for concurrent commands."""

    def __init__(self, target: RouterTarget, api: RawApi) -> None:
        self.target = target
        self._api = api
        self.broken = False

    @classmethod
    async def open(cls, target: RouterTarget, ssl_context: ssl.SSLContext | None) -> Connection:
        check_ascii(target.username, f"{target.label}: user name")
        check_ascii(target.password, f"{target.label}: password")
        limit = target.login_timeout
        if ssl_context is not None and target.tls_unverified:
            log.warning("router_tls_unverified", **_fields(target))
        handshake_done = False

        async def login(api: Any, username: str, password: str) -> None:
            # Runs once TCP and TLS are up: the certificate is checked before a password
            # is sent anywhere.
            nonlocal handshake_done
            handshake_done = True
            if ssl_context is not None:
                _check_pin(target, api.protocol.transport.writer)
            await plain_login(api, username, password)

        try:
            async with asyncio.timeout(limit):
                # async_connect closes the socket itself when the login fails.
                api = await librouteros.async_connect(
                    target.host,
                    target.username,
                    target.password,
                    port=target.port,
                    timeout=limit,
                    subclass=RawApi,
                    encoding=WIRE_ENCODING,
                    ssl_wrapper=ssl_context,
                    login_method=login,
                )
        except _CertificateRefused as exc:
            log.warning("router_tls_refused", **_fields(target), error=exc.message)
            raise RouterTLSError(
                f"{target.label}: {exc.message}", router_id=target.router_id
            ) from exc
        except ssl.SSLCertVerificationError as exc:
            reason = f"TLS certificate not trusted: {exc.verify_message or exc.reason}"
            log.warning("router_tls_refused", **_fields(target), error=reason)
            raise RouterTLSError(f"{target.label}: {reason}", router_id=target.router_id) from exc
        except LoginRefused as exc:
            log.warning("router_login_failed", **_fields(target), message=exc.message)
            raise RouterAuthError(
                f"{target.label}: login refused: {exc.message}", router_id=target.router_id
            ) from exc
        except Exception as exc:
            reason = _describe(exc)
            if isinstance(exc, TimeoutError):
                reason = f"connect timed out after {limit:g}s"
            elif ssl_context is not None and not handshake_done and _handshake_failure(exc):
                if await anonymous_only(target.host, target.port, limit):
                    log.warning("router_tls_no_certificate", **_fields(target))
                    raise RouterTLSError(
                        f"{target.label}: TLS handshake failed: {NO_CERTIFICATE_REMEDY}",
                        router_id=target.router_id,
                    ) from exc
                reason = f"TLS handshake failed: {reason}"
            log.warning("router_connect_failed", **_fields(target), error=reason)
            raise RouterUnavailable(
                f"{target.label}: cannot connect: {reason}", router_id=target.router_id
            ) from exc
        # The protocol's own per-sentence guard follows the command timeout from now on.
        api.protocol.timeout = target.timeout
        log.debug("router_connected", **_fields(target), tls=ssl_context is not None)
        return cls(target, api)

    # -- state ----------------------------------------------------------------------

    def healthy(self) -> bool:
        """False once discarded, or when the peer closed, reset or sent something unasked.

        A router sends `!fatal` to every session when it throws them out; bytes waiting
        on an idle connection mean its framing is no longer ours to trust.
        """
        if self.broken:
            return False
        transport = self._api.protocol.transport
        reader: asyncio.StreamReader = transport.reader
        writer: asyncio.StreamWriter = transport.writer
        unread = getattr(reader, "_buffer", b"")
        return not (
            writer.is_closing()
            or reader.at_eof()
            or reader.exception() is not None
            or len(unread) > 0
            or self._api.sentences.pending
        )

    def discard(self, reason: str) -> None:
        """Drop the connection at once, without a goodbye: its framing is unknown."""
        if self.broken:
            return
        self.broken = True
        self._api.protocol.transport.writer.transport.abort()
        log.info("router_connection_discarded", **_fields(self.target), reason=reason)

    async def close(self) -> None:
        """Close politely (pool shutdown); falls back to an abort."""
        if self.broken:
            return
        self.broken = True
        writer: asyncio.StreamWriter = self._api.protocol.transport.writer
        writer.close()
        try:
            async with asyncio.timeout(_CLOSE_TIMEOUT):
                await writer.wait_closed()
        except (TimeoutError, OSError):
            writer.transport.abort()

    # -- commands -------------------------------------------------------------------

    async def run(
        self,
        command: str,
        words: Sequence[str],
        *,
        write: bool,
        guard: Callable[[], None] | None = None,
    ) -> Reply:
        """Send one command and read its reply; traps become RouterTrap, anything else
        that goes wrong RouterUnavailable (and the connection is discarded). ``guard``
        may refuse the command (by raising) in the same step that sends it."""
        _check_sentence(command, words)
        if self.broken:
            raise RuntimeError("command on a discarded connection")
        sent = False
        try:
            async with asyncio.timeout(self.target.timeout):
                # Set before writing: a write that fails half-way may still have reached
                # the router whole.
                sent = True
                await self._api.send(command, words, guard)
                reply = await self._api.read_reply()
        except Refused as refused:
            # The guard said no before a byte left: the connection is as good as before.
            raise refused.reason from None
        except BaseException as exc:
            self._failed(command, exc, maybe_applied=write and sent)
            raise
        if reply.traps:
            raise self._trap(command, reply.traps)
        return reply

    async def run_many(self, commands: Sequence[Command]) -> list[Reply | Exception]:
        """Send ``commands`` back to back, each with its own `.tag`, then read the replies
        as they come (RouterOS may interleave them); one result per command, in order.

        RouterOS runs tagged commands of one connection concurrently, in no promised
        order: pass only commands that do not depend on each other. A trap fails only its
        own command (RouterTrap); a command whose guard refuses it is not sent (the
        guard's exception). If the connection fails, commands already answered keep
        their result and the rest get RouterUnavailable (``maybe_applied`` for writes
        that were sent), and the connection is discarded. The time limit applies to the
        wait for each next reply, not to the whole batch.
        """
        for c in commands:
            _check_sentence(c.command, c.words)
        if self.broken:
            raise RuntimeError("command on a discarded connection")
        results: list[Reply | Exception | None] = [None] * len(commands)
        replies: dict[str, tuple[int, list[dict[str, str]], list[dict[str, str]]]] = {}
        sent: list[int] = []
        loop = asyncio.get_running_loop()
        limit = self.target.timeout
        try:
            async with asyncio.timeout(limit) as deadline:
                # One write for them all; each guard runs just before its sentence joins
                # it, in the same step as the write (nothing awaited in between).
                parts: list[bytes] = []
                encoding = self._api.protocol.encoding
                for i, c in enumerate(commands):
                    if c.guard is not None:
                        try:
                            c.guard()
                        except Exception as exc:
                            results[i] = exc
                            continue
                    tagged = (*c.words, f".tag={i}")
                    parts.append(encode_sentence(c.command, *tagged, encoding=encoding))
                    sent.append(i)
                    replies[str(i)] = (i, [], [])
                writer = self._api.protocol.transport.writer
                writer.write(b"".join(parts))
                await writer.drain()
                moved = loop.time()
                while replies:
                    i, reply = await self._read_tagged(replies)
                    # The limit runs from the last reply; moving the timer costs a timer
                    # handle, so it moves once a tenth of the limit has passed.
                    now = loop.time()
                    if now - moved > limit / 10:
                        deadline.reschedule(now + limit)
                        moved = now
                    if reply is not None:
                        traps = reply.traps
                        results[i] = self._trap(commands[i].command, traps) if traps else reply
        except BaseException as exc:
            if not isinstance(exc, Exception):
                self._failed("tagged commands", exc, maybe_applied=False)
                raise  # cancellation
            reason = _describe(exc)
            if isinstance(exc, TimeoutError):
                reason = f"no answer within {limit:g}s"
            unanswered = [i for i, _, _ in replies.values()]
            self.discard(f"{len(unanswered)} tagged command(s) unanswered: {reason}")
            log.warning(
                "router_command_failed",
                **_fields(self.target),
                command=f"{len(commands)} tagged commands",
                error=reason,
                unanswered=len(unanswered),
            )
            for i in unanswered:
                c = commands[i]
                suffix = " (the write may have been applied)" if c.write else ""
                results[i] = RouterUnavailable(
                    f"{self.target.label}: {c.command}: {reason}{suffix}",
                    router_id=self.target.router_id,
                    maybe_applied=c.write,
                )
            for i, result in enumerate(results):
                if result is None:
                    results[i] = RouterUnavailable(
                        f"{self.target.label}: {commands[i].command}: not sent: {reason}",
                        router_id=self.target.router_id,
                        maybe_applied=False,
                    )
        return [r if r is not None else RuntimeError("no result") for r in results]

    async def _read_tagged(
        self, replies: dict[str, tuple[int, list[dict[str, str]], list[dict[str, str]]]]
    ) -> tuple[int, Reply | None]:
        """Read one sentence into the reply of its tag: (command index, the whole reply
        once `!done` ended it, else None)."""
        reply_word, attributes = await self._api.readSentence()
        tag = attributes.pop(".tag", None)
        if tag not in replies:
            raise ProtocolError(f"{reply_word} for tag {tag!r}, which is not ours")
        i, rows, traps = replies[tag]
        if reply_word == "!re":
            rows.append(attributes)
        elif reply_word == "!trap":
            traps.append(attributes)
        elif reply_word == "!done":
            del replies[tag]
            return i, Reply(rows, attributes, traps)
        return i, None

    async def reboot(self) -> None:
        """A reboot answers nothing: the connection dropping is the success."""
        command = SYSTEM_REBOOT
        sent = False
        reply: Reply | None = None
        try:
            async with asyncio.timeout(self.target.timeout):
                await self._api.send(command, [])
                sent = True
                reply = await self._api.read_reply()
        except (ConnectionClosed, ConnectionError, FatalError) as exc:
            if not sent:
                self._failed(command, exc, maybe_applied=True)
                raise
        except BaseException as exc:
            self._failed(command, exc, maybe_applied=True)
            raise
        # Whatever came back, this connection is to a router going down.
        self.discard("router rebooting")
        if reply is not None and reply.traps:
            raise self._trap(command, reply.traps)
        log.info("router_reboot_sent", **_fields(self.target))

    def _failed(self, command: str, exc: BaseException, *, maybe_applied: bool) -> None:
        """Discard the connection; for an Exception, raise RouterUnavailable from it."""
        self.discard(f"{command}: {_describe(exc)}")
        if not isinstance(exc, Exception):
            return  # cancellation: the caller re-raises it as it is
        reason = _describe(exc)
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {self.target.timeout:g}s"
        log.warning(
            "router_command_failed",
            **_fields(self.target),
            command=command,
            error=reason,
            maybe_applied=maybe_applied,
        )
        suffix = " (the write may have been applied)" if maybe_applied else ""
        raise RouterUnavailable(
            f"{self.target.label}: {command}: {reason}{suffix}",
            router_id=self.target.router_id,
            maybe_applied=maybe_applied,
        ) from exc

    def _trap(self, command: str, traps: list[dict[str, str]]) -> RouterTrap:
        message = "; ".join(trap.get("message", "") for trap in traps)
        category_text = traps[0].get("category", "")
        category = int(category_text) if category_text.isdigit() else None
        log.debug("router_trap", **_fields(self.target), command=command, message=message)
        cls = trap_class(traps[0].get("message", ""))
        return cls(
            message,
            router_id=self.target.router_id,
            command=command,
            category=category,
            context=f"{self.target.label}: {command}",
        )


def _fields(target: RouterTarget) -> dict[str, Any]:
    return {"router_id": target.router_id, "host": target.host, "port": target.port}
