"""The events domain's registration: OTP delivery and channel control."""

from __future__ import annotations

from functools import partial

from imsys.deps import Deps
from imsys.events.context import EventsContext
from imsys.events.control import SERVICE_CONTROL, service_control
from imsys.events.otp import EMAIL_OTP, WHATSAPP_OTP, email_otp, whatsapp_otp


def register(deps: Deps) -> None:
    ctx = EventsContext.from_deps(deps)
    reg = deps.engine.registry
    reg.add(WHATSAPP_OTP, partial(whatsapp_otp, ctx))
    reg.add(EMAIL_OTP, partial(email_otp, ctx))
    reg.add(SERVICE_CONTROL, partial(service_control, ctx))
