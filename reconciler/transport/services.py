"""The public ports a session's instance declares, by how `ukc` runs its commands.

Every session gets SSH on 2222 (`tls`): the only authenticated way in. Port 443 (`tls` +
`http` → 8080) carries the image's `/exec` API, which authenticates nobody, so only a session
that asked for it (`exec: http`) publishes it.

The service group is fixed at creation, so the instance records what it was made for in the
tag `ukc.exec=<mode>`; an instance without that tag was made by an older `ukc`, which gave
every instance both ports.
"""

from __future__ import annotations

from reconciler.cloud.model import Service

__all__ = ["session_services"]

_SSH = Service(2222, 2222, ("tls",))
_EXEC_API = Service(443, 8080, ("tls", "http"))


def session_services(exec_mode: str) -> tuple[Service, ...]:
    """SSH for every session; the unauthenticated exec API only for `exec: http`."""
    return (_SSH, _EXEC_API) if exec_mode == "http" else (_SSH,)
