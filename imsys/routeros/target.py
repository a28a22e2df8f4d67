"""Which router to talk to, and how."""

from __future__ import annotations

from dataclasses import dataclass, field

from imsys.routeros.tls import normalize_fingerprint


@dataclass(frozen=True)
class RouterTarget:
    """One router's API endpoint and account. The password never shows in repr or logs."""

    router_id: int
    host: str
    port: int
    username: str
    password: str = field(repr=False)
    use_tls: bool = False
    # How to trust the router's certificate (with use_tls; see routeros/tls.py): its
    # SHA-256 pinned, a CA (PEM, no host name check), or nothing (tls_verify False; a pin
    # or a CA, when given, still applies: checking more is never less safe).
    tls_fingerprint: str | None = None
    tls_ca: str | None = field(default=None, repr=False)
    tls_verify: bool = True
    # At most this many API connections to this router from one process.
    max_concurrency: int = 5
    # Seconds allowed for each command (and for connect + login unless connect_timeout).
    timeout: float = 10.0
    connect_timeout: float | None = None

    def __post_init__(self) -> None:
        if self.max_concurrency < 1:
            raise ValueError("max_concurrency must be at least 1")
        if self.timeout <= 0 or (self.connect_timeout is not None and self.connect_timeout <= 0):
            raise ValueError("timeouts must be positive")
        if not 0 < self.port < 65536:
            raise ValueError(f"port {self.port} is out of range")
        if self.tls_fingerprint is not None:
            object.__setattr__(self, "tls_fingerprint", normalize_fingerprint(self.tls_fingerprint))

    @property
    def tls_unverified(self) -> bool:
        """TLS with nothing checked: no pin, no CA, and verification turned off."""
        return (
            self.use_tls
            and not self.tls_verify
            and self.tls_fingerprint is None
            and self.tls_ca is None
        )

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def label(self) -> str:
        """How messages name the router: `router 7 (10.0.0.1:8728)`."""
        return f"router {self.router_id} ({self.address})"

    @property
    def login_timeout(self) -> float:
        return self.timeout if self.connect_timeout is None else self.connect_timeout
