"""Every Redis key imsys uses, in one place, all under the configured prefix.

For Redis Cluster, set the prefix to a hash tag such as ``{imsys}``: every key then
lands in one slot and the multi-key scripts keep working unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

GROUP = "imsys"


@dataclass(frozen=True, slots=True)
class Keys:
    prefix: str

    def stream(self, name: str) -> str:
        return f"{self.prefix}:{name}"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def backend_events(self) -> str:
        return f"{self.prefix}:backend-events"

    @property
    def history(self) -> str:
        return f"{self.prefix}:history"

    def throughput(self, stream: str, minute: int) -> str:
        """Jobs of ``stream`` acknowledged in one minute (minutes since the epoch): the
        dashboard's processed/s chart, the same figure for every process."""
        return f"{self.prefix}:throughput:{stream}:{minute}"

    @property
    def processes(self) -> str:
        return f"{self.prefix}:processes"

    @property
    def paused(self) -> str:
        """The paused streams: stream name -> when it was paused (epoch ms)."""
        return f"{self.prefix}:paused"

    def delayed(self, stream: str) -> str:
        return f"{self.prefix}:delayed:{stream}"

    def stats(self, stream: str) -> str:
        return f"{self.prefix}:stats:{stream}"

    def dedupe_prefix(self, stream: str) -> str:
        return f"{self.prefix}:dedupe:{stream}:"

    def dedupe(self, stream: str, job_id: str) -> str:
        return f"{self.dedupe_prefix(stream)}{job_id}"

    def progress(self, stream: str) -> str:
        return f"{self.prefix}:progress:{stream}"

    def timer(self, name: str, slot: int) -> str:
        return f"{self.prefix}:timer:{name}:{slot}"

    def limit(self, key: str) -> str:
        return f"{self.prefix}:limit:{key}"

    def flag(self, name: str) -> str:
        return f"{self.prefix}:flag:{name}"

    def router_circuit(self, router_id: int) -> str:
        """A router's circuit breaker (sync): failures and open-until."""
        return f"{self.prefix}:router:{router_id}:circuit"

    def router_probe(self, router_id: int) -> str:
        """The one probe let through a router's closing circuit (sync)."""
        return f"{self.prefix}:router:{router_id}:probe"

    def channel(self, channel: str) -> str:
        """A delivery channel's state (events: ``service_control``)."""
        return f"{self.prefix}:service:{channel}"

    def otp_sent(self, stream: str, entry_id: str) -> str:
        """The mark of an OTP entry whose code went out (events)."""
        return f"{self.prefix}:otp:sent:{stream}:{entry_id}"

    def republished(self, stream: str, job_id: str) -> str:
        """An intent the recovery sweep re-published lately (its cooldown)."""
        return f"{self.prefix}:republished:{stream}:{job_id}"
