"""Pure checks at the edge, called by the request pipeline before anything else runs.

- `check_body`: the body is valid UTF-8 and its JSON nests at most `max_depth` levels
  (msgspec checks neither until too late: a raw field is forwarded as it came).
- `BrowserGuard`: without gateway keys a web page must not drive the gateway (POSTs
  need `application/json`, a foreign `Origin` is refused, `Host` must name this
  server: DNS rebinding); `server.cors_origins` lets listed origins in, preflights
  included.
- `ClientAddress`: `X-Forwarded-For` is believed only from `server.trusted_proxies`.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .config import ConfigError, ServerSpec
from .errors import GatewayError, InvalidRequest

# ---- body ----------------------------------------------------------------------------

_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')
_ONE_BRACKET = bytes.maketrans(b"{}", b"[]")  # depth is depth, whichever the bracket


def check_body(body: bytes, max_depth: int = 64) -> None:
    """Raise InvalidRequest (400) unless `body` is UTF-8 nesting at most `max_depth` levels.

    Fast where it matters: an ASCII check or one UTF-8 decode (C speed), then the depth
    scan only when the body has more than `max_depth` opening brackets at all.
    """
    if not body.isascii():
        try:
            body.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise InvalidRequest(
                f"Request body is not valid UTF-8 (byte {exc.start}).", code="invalid_encoding"
            ) from None
    if body.count(b"[") + body.count(b"{") <= max_depth:
        return
    if json_depth_exceeds(body, max_depth):
        raise InvalidRequest(
            f"Request body is not valid JSON or nests deeper than {max_depth} levels.",
            code="invalid_json",
        )


def json_depth_exceeds(body: bytes, max_depth: int) -> bool:
    """True if the JSON text nests deeper than `max_depth` (or its brackets do not pair).

    All in C-speed bytes operations, no per-string work: escaped backslashes and quotes
    go first (so every quote left opens or closes a string), then everything but brackets
    and quotes; `""` pairs go (an empty string, or two strings with nothing structural
    between them: either way what is in a string stays in one); the few strings left
    (those holding brackets) go with one split. With `{}` mapped to `[]`, each pass removes
    exactly the innermost level, so the nesting is gone within `max_depth` passes unless
    it is deeper.
    """
    if b"\\" in body:
        body = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    reduced = body.translate(_ONE_BRACKET, _NOT_STRUCTURE).replace(b'""', b"")
    if b'"' in reduced:  # strings holding brackets: every other piece is outside strings
        reduced = b"".join(reduced.split(b'"')[::2])
    for _ in range(max_depth):
        if not reduced:
            return False
        shorter = reduced.replace(b"[]", b"")  # one scan: exactly the innermost level
        if len(shorter) == len(reduced):
            return True  # unpaired brackets (or a stray quote): not JSON
        reduced = shorter
    return bool(reduced)


# ---- browsers ------------------------------------------------------------------------


class Forbidden(GatewayError):
    status = 403
    type = "invalid_request_error"
    code = "forbidden"


class MisdirectedRequest(GatewayError):
    status = 421
    type = "invalid_request_error"
    code = "misdirected_request"


class UnsupportedMediaType(GatewayError):
    status = 415
    type = "invalid_request_error"
    code = "unsupported_media_type"


_HOSTS_REMEMBERED = 64
_LOCAL_NAMES = frozenset({"localhost", "127.0.0.1", "[::1]", "::1"})
_ALLOW_METHODS = "GET, POST, OPTIONS"
_EXPOSE = (
    "x-request-id, x-omnimind-provider, x-omnimind-model, x-omnimind-latency-ms, "
    "x-omnimind-attempts, x-omnimind-fallbacks, x-omnimind-cost-usd, retry-after"
)
_TOKEN_LIST = re.compile(r"[A-Za-z0-9!#$%&'*+.^_`|~-]+(?:\s*,\s*[A-Za-z0-9!#$%&'*+.^_`|~-]+)*")


def _host_name(host: str) -> str:
    """`host[:port]` -> host, lower-cased (IPv6 keeps its brackets)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[: host.find("]") + 1]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def _same_origin(origin: str, host: str) -> bool:
    """Whether `origin` (scheme://host[:port]) is this `Host` (host[:port]), port included."""
    scheme, sep, authority = origin.lower().partition("://")
    default = {"http": ":80", "https": ":443"}.get(scheme)
    if not sep or default is None:
        return False
    host = host.strip().lower()
    return authority.removesuffix(default) == host.removesuffix(default)


@dataclass(frozen=True, slots=True)
class BrowserGuard:
    """Per-request browser checks; `keyless` is true when the gateway has no api_keys."""

    keyless: bool
    cors_origins: frozenset[str] = frozenset()
    allowed_hosts: frozenset[str] = frozenset()
    _hosts_seen: dict[tuple[str, str | None], None] = field(
        default_factory=dict, compare=False, repr=False
    )  # Host headers already accepted (with the address they came to)

    @classmethod
    def from_server(cls, server: ServerSpec, keyless: bool) -> BrowserGuard:
        origins = frozenset(o.rstrip("/").lower() for o in server.cors_origins)
        hosts = frozenset(_host_name(h) for h in server.allowed_hosts)
        return cls(keyless, origins, hosts)

    def allows_origin(self, origin: str) -> bool:
        return "*" in self.cors_origins or origin.rstrip("/").lower() in self.cors_origins

    def check(self, method: str, headers: Mapping[str, str], bound: str | None) -> None:
        """Raise 421/403/415 for a request a web page may have made. `headers` by lower-case
        name; `bound` is the server's own address (ASGI `scope["server"][0]`)."""
        if not self.keyless:
            return
        host = headers.get("host", "")
        if host and (host, bound) not in self._hosts_seen:
            host_name = _host_name(host)
            if not self._own_host(host_name, bound):
                raise MisdirectedRequest(
                    f"Host '{host_name[:100]}' is not this gateway's; without api_keys only "
                    "localhost, the bound address and server.allowed_hosts are served."
                )
            if len(self._hosts_seen) < _HOSTS_REMEMBERED:  # accepted ones only: few
                self._hosts_seen[host, bound] = None
        origin = headers.get("origin")
        if origin is not None and not self.allows_origin(origin):
            if origin == "null" or not _same_origin(origin, host):
                raise Forbidden(
                    f"Origin '{origin[:100]}' is not allowed; list it in server.cors_origins."
                )
        if method == "POST":
            media = headers.get("content-type", "")
            if media != "application/json":
                media = media.partition(";")[0].strip().lower()
            if media != "application/json":
                raise UnsupportedMediaType(
                    "POST bodies must be sent with 'Content-Type: application/json'."
                )

    def _own_host(self, host: str, bound: str | None) -> bool:
        if host in _LOCAL_NAMES or host in self.allowed_hosts:
            return True
        if bound and bound not in ("0.0.0.0", "::"):
            return host.strip("[]") == bound.lower()
        return False

    def cors_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Headers to add to an actual (not preflight) response for an allowed origin."""
        origin = headers.get("origin") if self.cors_origins else None
        if origin is None or not self.allows_origin(origin):
            return {}
        return {
            "access-control-allow-origin": origin,
            "access-control-expose-headers": _EXPOSE,
            "vary": "origin",
        }

    def preflight(self, headers: Mapping[str, str]) -> tuple[int, dict[str, str]]:
        """The answer to `OPTIONS /v1/...`: 204 with CORS headers for a listed origin,
        403 for any other cross-origin preflight, 204 with `allow` for a plain OPTIONS."""
        origin = headers.get("origin")
        if origin is None:
            return 204, {"allow": _ALLOW_METHODS}
        if not self.allows_origin(origin):
            return 403, {"vary": "origin"}
        answer = {
            "access-control-allow-origin": origin,
            "access-control-allow-methods": _ALLOW_METHODS,
            "access-control-max-age": "600",
            "vary": "origin",
        }
        requested = headers.get("access-control-request-headers", "").strip()
        if requested and len(requested) <= 1024 and _TOKEN_LIST.fullmatch(requested):
            answer["access-control-allow-headers"] = requested
        return 204, answer


# ---- client address ------------------------------------------------------------------

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(cidrs: Iterable[str], where: str = "server.trusted_proxies") -> list[Network]:
    networks = []
    for i, cidr in enumerate(cidrs):
        try:
            networks.append(ipaddress.ip_network(cidr.strip(), strict=False))
        except ValueError as exc:
            raise ConfigError(f"at {where}[{i}]: {exc}") from None
    return networks


@dataclass(frozen=True, slots=True)
class ClientAddress:
    """The client's address for rate limits and logs: the peer, or with trusted proxies the
    right-most `X-Forwarded-For` entry that is not itself a trusted proxy."""

    trusted: tuple[Network, ...] = ()

    @classmethod
    def from_server(cls, server: ServerSpec) -> ClientAddress:
        return cls(tuple(parse_networks(server.trusted_proxies)))

    def _is_trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted)

    def of(self, peer: str, headers: Mapping[str, str]) -> str:
        """`headers` by lower-case name (repeated ones joined with ", ")."""
        if not self.trusted or not self._is_trusted(peer):
            return peer
        forwarded = headers.get("x-forwarded-for")
        hops = forwarded.split(",") if forwarded else []
        client = peer
        for hop in reversed(hops):
            hop = hop.strip()
            try:
                ipaddress.ip_address(hop)
            except ValueError:
                break  # garbage: stop at the last hop we could trust
            client = hop
            if not self._is_trusted(hop):
                break
        return client
