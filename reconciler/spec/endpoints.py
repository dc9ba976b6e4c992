"""Where a metro's API lives and which credential it may receive: the token routing rule.

Spec files come from checkouts (a pull request, a colleague's branch) and are not trusted
with the cloud token; the user's environment is. So a spec file may name a metro *code*
(its API host is then ours to build: `https://api.<code>.unikraft.cloud`), but a metro *URL*
gets a token only when the environment chose it:

* `UKC_TOKEN` goes to the official hosts `https://api.<code>.unikraft.cloud` and to URLs the
  environment names: `UKC_METRO` (the user's own default metro) or `UKC_METRO_ALLOW` (a list).
* `UKC_METRO_TOKEN`, when set, is sent to those URLs instead of `UKC_TOKEN`: a metro of one's
  own (a proxy, an emulator) need never see the cloud token.
* Plain `http://` only to a loopback address, and the cloud token over it only when
  `UKC_METRO_ALLOW` lists that URL: another local user can listen on a loopback port that
  the intended server left free.

Pure: reads only the mapping it is given. The registry (`metro.py`) asks it before opening a
connection and the spec loader asks it to report a refused metro at its file, line and field.
"""

from __future__ import annotations

import ipaddress
import re
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

from reconciler._util.names import is_metro_code, official_metro_code

__all__ = [
    "ALLOW_VAR",
    "CREDENTIAL_VARS",
    "METRO_TOKEN_VAR",
    "METRO_VAR",
    "TOKEN_VAR",
    "Endpoint",
    "EndpointRefusedError",
    "official_base_url",
    "resolve",
]

TOKEN_VAR = "UKC_TOKEN"
METRO_TOKEN_VAR = "UKC_METRO_TOKEN"
ALLOW_VAR = "UKC_METRO_ALLOW"
METRO_VAR = "UKC_METRO"

#: ukc's own credentials: a spec cannot forward them into a sandbox (`secret_env`)
CREDENTIAL_VARS = frozenset({TOKEN_VAR, METRO_TOKEN_VAR, "UKC_SESSION_SECRET", "UKC_LOCAL_TOKEN"})

#: host names we accept in a URL: plain DNS labels (no percent escapes, no backslashes, no
#: unicode that another URL parser might read differently)
_HOSTNAME = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_PATH = re.compile(r"[A-Za-z0-9._~/-]*")


class EndpointRefusedError(ValueError):
    """The metro may not be used (or not with a token); `str()` gives reason and remedy."""


@dataclass(frozen=True)
class Endpoint:
    """Where the API of a metro lives and which environment variable's token it receives."""

    base_url: str
    #: the environment variable whose value is sent as the bearer token
    token_var: str


@dataclass(frozen=True)
class _Url:
    scheme: str
    host: str
    port: int | None
    path: str

    @property
    def canonical(self) -> str:
        default = 443 if self.scheme == "https" else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = "" if self.port in (None, default) else f":{self.port}"
        return f"{self.scheme}://{host}{port}{self.path}"

    @property
    def loopback(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


def _parse(url: str) -> _Url:
    """A URL reduced to the parts we rebuild it from; anything unusual is refused."""
    if re.search(r"[\s\x00-\x1f\x7f\\]", url):
        raise EndpointRefusedError(f"metro url {url!r} contains spaces, control characters or '\\'")
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        raise EndpointRefusedError(f"metro url {url!r} is not http(s)")
    if "@" in parts.netloc:
        raise EndpointRefusedError(f"metro url {url!r} must not contain credentials")
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        raise EndpointRefusedError(f"metro url {url!r} must not have a query or fragment")
    try:
        port = parts.port
    except ValueError:
        raise EndpointRefusedError(f"metro url {url!r} has an invalid port") from None
    host = (parts.hostname or "").lower()
    if not host:
        raise EndpointRefusedError(f"metro url {url!r} has no host")
    if host.startswith("[") or ":" in host or not _HOSTNAME.fullmatch(host):
        try:
            host = str(ipaddress.ip_address(host.strip("[]")))
        except ValueError:
            raise EndpointRefusedError(f"metro url {url!r} has an unusual host name") from None
    path = parts.path.rstrip("/")
    if path.endswith("/v1"):
        path = path[: -len("/v1")].rstrip("/")
    if not _PATH.fullmatch(path) or "/../" in f"{path}/" or "/./" in f"{path}/":
        raise EndpointRefusedError(f"metro url {url!r} has an unusual path")
    return _Url(scheme, host, port, path)


def _allowed(environ: Mapping[str, str]) -> set[str]:
    """Canonical URLs in `UKC_METRO_ALLOW` (comma or space separated)."""
    found: set[str] = set()
    for item in re.split(r"[,\s]+", environ.get(ALLOW_VAR, "")):
        if not item:
            continue
        try:
            found.add(_parse(item).canonical)
        except EndpointRefusedError as err:
            raise EndpointRefusedError(f"{ALLOW_VAR}: {err}") from None
    return found


def _chosen(environ: Mapping[str, str]) -> str | None:
    """The canonical URL the environment's `UKC_METRO` names, if it names a URL."""
    value = environ.get(METRO_VAR, "").strip()
    if not value.startswith(("http://", "https://")):
        return None
    try:
        return _parse(value).canonical
    except EndpointRefusedError:
        return None


def official_base_url(code: str) -> str:
    return f"https://api.{code}.unikraft.cloud"


def resolve(metro: str, environ: Mapping[str, str]) -> Endpoint:
    """The endpoint of a metro code or URL (not `local`) and the token variable it may get.

    Raises `EndpointRefusedError` (reason and remedy, never a token value) when the metro may not
    be used from here.
    """
    if is_metro_code(metro):
        return Endpoint(official_base_url(metro), TOKEN_VAR)
    url = _parse(metro)
    canonical = url.canonical
    if url.scheme == "http" and not url.loopback:
        raise EndpointRefusedError(
            f"{canonical} is plain http to another machine: the token and everything sent "
            "would cross the network in clear text; use https (plain http is only for a metro "
            "on a loopback address)"
        )
    official = official_metro_code(url.host)
    if url.scheme == "https" and official and url.port in (None, 443) and not url.path:
        return Endpoint(official_base_url(official), TOKEN_VAR)
    allowed = _allowed(environ)
    listed = canonical in allowed
    if not listed and canonical != _chosen(environ):
        raise EndpointRefusedError(
            f"{canonical} is not an official metro (https://api.<metro>.unikraft.cloud), and "
            "a spec file cannot choose where the token goes; if you trust it, name it in your "
            f"environment: {METRO_VAR}={canonical} or {ALLOW_VAR}={canonical} (and its own "
            f"token in {METRO_TOKEN_VAR})"
        )
    if environ.get(METRO_TOKEN_VAR):
        return Endpoint(canonical, METRO_TOKEN_VAR)
    if url.scheme == "http" and not listed:
        raise EndpointRefusedError(
            f"{canonical} is plain http: {TOKEN_VAR} is sent over it only if {ALLOW_VAR} "
            f"lists it (another local user could be listening on that port); set "
            f"{METRO_TOKEN_VAR} to that metro's own token, or {ALLOW_VAR}={canonical}"
        )
    return Endpoint(canonical, TOKEN_VAR)
