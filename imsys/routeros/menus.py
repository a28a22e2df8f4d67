"""The RouterOS menus imsys reads and writes, each named once.

The adapter, sync and the demo take their paths from here. The simulator (``imsys/sim/``)
keeps its own model of RouterOS on purpose: it stands for the router, so a mistake here
must not be mirrored there.
"""

from __future__ import annotations

from typing import Final

PPP_SECRET: Final = "/ppp/secret"  # noqa: S105 - a menu path, not a password
PPP_ACTIVE: Final = "/ppp/active"
PPP_PROFILE: Final = "/ppp/profile"
HOTSPOT_USER: Final = "/ip/hotspot/user"
HOTSPOT_ACTIVE: Final = "/ip/hotspot/active"
HOTSPOT_USER_PROFILE: Final = "/ip/hotspot/user/profile"
SYSTEM_RESOURCE: Final = "/system/resource"
# Stations associated with the router's radios: the legacy `wireless` package (RouterOS 6,
# and 7 where installed) and the `wifi` menu (RouterOS 7.13+, wifi-qcom / wifi-qcom-ac).
# A router without the package answers "no such command or directory".
WIRELESS_REGISTRATION: Final = "/interface/wireless/registration-table"
WIFI_REGISTRATION: Final = "/interface/wifi/registration-table"
SYSTEM_REBOOT: Final = "/system/reboot"

# Where a subscriber's login lives, by service (PPPoE secret or hotspot user).
LOGIN_BY_SERVICE: Final = {"pppoe": PPP_SECRET, "hotspot": HOTSPOT_USER}
# Where a package's rate lives for that login, by service (a profile named like the package's).
PROFILE_BY_SERVICE: Final = {"pppoe": PPP_PROFILE, "hotspot": HOTSPOT_USER_PROFILE}
# Built into every router, never created, changed or removed by imsys.
BUILTIN_PROFILE: Final = "default"
