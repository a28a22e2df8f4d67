"""The network model: tenants, routers, packages, subscribers.

Below the domains: sync, billing and the admin API use it; it imports no domain and no
queue. A change that a router must follow is announced through the caller's hook (see
`imsys.network.service`).
"""
