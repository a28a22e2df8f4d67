"""The events domain's registration: OTP delivery and channel control."""

from __future__ import annotations

from functools import partial

from imsys.deps import Deps
from imsys.events.channels import ChannelControl
from imsys.events.control import ServiceControl, service_control
from imsys.events.otp import EmailOtp, OtpSender, WhatsAppOtp


def register(deps: Deps) -> None:
    reg = deps.engine.registry
    channels = ChannelControl.from_deps(deps)
    otp = OtpSender(deps, channels)
    # secret_fields: a dead letter keeps the job for inspection and replay, never the code.
    reg.register("events", "whatsapp_otp", WhatsAppOtp, otp.whatsapp_otp, secret_fields=("otp",))
    reg.register("events", "email_otp", EmailOtp, otp.email_otp, secret_fields=("otp",))
    reg.register(
        "events", "service_control", ServiceControl, partial(service_control, deps, channels)
    )
