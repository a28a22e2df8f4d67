"""Provider clients per messaging account: the global one and each tenant's own.

A tenant names an account (``tenant_messaging.account``, a key of
``[messaging.accounts]``); a channel that account leaves out uses the global client.
Credentials stay in the configuration (environment or file): the database holds only
the name, and nothing here ever returns a credential.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from imsys.provider_settings import SmsConfig, SmtpConfig, WhatsAppConfig
from imsys.providers.email import SmtpClient
from imsys.providers.errors import ProviderAuthError
from imsys.providers.sms import SmsClient
from imsys.providers.whatsapp import WhatsAppClient

__all__ = ["AccountConfig", "Accounts", "Clients"]


class AccountConfig(Protocol):
    @property
    def sms(self) -> SmsConfig | None: ...
    @property
    def whatsapp(self) -> WhatsAppConfig | None: ...
    @property
    def smtp(self) -> SmtpConfig | None: ...


@dataclass(frozen=True, slots=True)
class Clients:
    """The clients one message goes through; ``account`` None is the global account."""

    account: str | None
    sms: SmsClient
    whatsapp: WhatsAppClient
    smtp: SmtpClient


class Accounts:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        sms: SmsConfig,
        whatsapp: WhatsAppConfig,
        smtp: SmtpConfig,
        accounts: Mapping[str, AccountConfig],
    ) -> None:
        self._session = session
        self._configs = accounts
        self.default = Clients(None, SmsClient(session, sms), WhatsAppClient(session, whatsapp),
                               SmtpClient(smtp))
        self._built: dict[str, Clients] = {}
        self.sms_configs = [sms, *(a.sms for a in accounts.values() if a.sms)]
        self.whatsapp_configs = [whatsapp, *(a.whatsapp for a in accounts.values() if a.whatsapp)]

    def get(self, account: str | None) -> Clients:
        """The clients of ``account`` (None or "" for the global account)."""
        if not account:
            return self.default
        if account in self._built:
            return self._built[account]
        cfg = self._configs.get(account)
        if cfg is None:
            # Permanent: a tenant pointing at a name the configuration does not have.
            raise ProviderAuthError("accounts", "no such messaging account",
                                    detail=f"{account!r} is not under [messaging.accounts]")
        d = self.default
        clients = Clients(
            account,
            SmsClient(self._session, cfg.sms) if cfg.sms else d.sms,
            WhatsAppClient(self._session, cfg.whatsapp) if cfg.whatsapp else d.whatsapp,
            SmtpClient(cfg.smtp) if cfg.smtp else d.smtp,
        )
        self._built[account] = clients
        return clients
