"""Where a `callback_url` may point: never inside (docs/security.md, "Callbacks").

The gateway checks an audit's `callback_url` at submission and the worker checks it again just
before it connects (workers/execution/callbacks.py), then connects to the very address it
checked, so a
DNS answer that changes in between (rebinding) cannot steer the POST inside. Refused unless the
operator's allow-list (`TIGHTROPE_CALLBACK_ALLOW`) names the destination: loopback, link-local,
private, shared (CGNAT), multicast, unspecified and reserved addresses, IPv4 and IPv6, however
they are spelt (`0x7f000001`, `2130706433`, `017700000001`, `127.1`, `::ffff:127.0.0.1`, `[::1]`,
`0.0.0.0`), `localhost` and its subdomains, and any name that resolves to such an address.

Standard library only (no torch, no service imports): both the gateway and the workers use it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from dataclasses import dataclass
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

DEFAULT_PORTS = {"http": 80, "https": 443}
# What inet_aton accepts as an IPv4 address: one to four parts, each decimal, octal (leading 0)
# or hex (0x); checked first because glibc's inet_aton ignores anything after a space.
_INET_ATON_FORM = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)(?:\.(?:0x[0-9a-f]*|[0-9]+)){0,3}", re.I)
# Special-purpose IPv6 prefixes that carry an IPv4 address: NAT64 (RFC 6052).
# IPv6 forms that carry an IPv4 address inside them; each is judged by the address it carries.
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")  # local-use NAT64 (RFC 8215)
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated IPv4-compatible (RFC 4291)
_ISATAP_IDS = (0x00005EFE, 0x02005EFE)  # interface identifiers ::0:5efe:a.b.c.d (RFC 5214)


class CallbackTargetRefused(ValueError):
    """The callback destination is not allowed (or not valid); the message says why."""


class CallbackHostUnresolved(CallbackTargetRefused):
    """The callback host did not resolve (or not in time): possibly transient."""


@dataclass(frozen=True)
class AllowList:
    """Parsed `TIGHTROPE_CALLBACK_ALLOW`: host names (port or any), IPs with a port, networks."""

    names: frozenset[tuple[str, int | None]] = frozenset()
    ip_ports: frozenset[tuple[IPAddress, int]] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    def allows_name(self, host: str, port: int) -> bool:
        return (host, None) in self.names or (host, port) in self.names

    def allows_address(self, address: IPAddress, port: int) -> bool:
        return (address, port) in self.ip_ports or any(address in net for net in self.networks)


@dataclass(frozen=True)
class Target:
    """A checked callback destination: connect to one of `addresses`, never re-resolve."""

    scheme: str
    host: str  # normalised: lower case, no brackets, no trailing dot
    port: int
    addresses: tuple[IPAddress, ...]


def _port(text: str, entry: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"callback allow-list entry {entry!r}: bad port {text!r}")
    return int(text)


def parse_allow_list(text: str) -> AllowList:
    """Comma-separated `host`, `host:port`, `[v6]:port`, IP address or CIDR network entries."""
    names: set[tuple[str, int | None]] = set()
    ip_ports: set[tuple[IPAddress, int]] = set()
    networks: list[IPNetwork] = []
    for raw in text.split(","):
        entry = raw.strip()
        if not entry:
            continue
        try:  # an address or a network (an address alone is a /32 or /128): any port
            networks.append(ipaddress.ip_network(entry, strict=False))
            continue
        except ValueError:
            pass
        host, port = entry, None
        if entry.startswith("["):
            inside, sep, rest = entry[1:].partition("]")
            if not sep or (rest and not rest.startswith(":")):
                raise ValueError(f"callback allow-list entry {entry!r} is not host[:port]")
            host, port = inside, (_port(rest[1:], entry) if rest else None)
        elif entry.count(":") == 1:
            host, port_text = entry.split(":")
            port = _port(port_text, entry)
        address = normalise_host(host)
        if isinstance(address, str):
            if not address or any(c in address for c in "/@ :"):
                raise ValueError(f"callback allow-list entry {entry!r} is not host[:port]")
            names.add((address, port))
        elif port is None:
            networks.append(ipaddress.ip_network(address))
        else:
            ip_ports.add((address, port))
    return AllowList(frozenset(names), frozenset(ip_ports), tuple(networks))


def normalise_host(host: str) -> IPAddress | str:
    """An IP literal in any spelling as an address; a name lower-cased without a trailing dot.

    Python's `ipaddress` only reads dotted quads, so the forms `inet_aton` (and browsers, and
    many HTTP clients) accept are read with `inet_aton`: `0x7f000001`, `2130706433`,
    `017700000001`, `127.1`, `0x7f.0.0.1`. A numeric host inet_aton refuses is refused.
    """
    host = host.strip().lower()
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    host = host.removesuffix(".")
    try:
        return ipaddress.ip_address(host.split("%", 1)[0] if ":" in host else host)
    except ValueError:
        pass
    if _INET_ATON_FORM.fullmatch(host):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            raise CallbackTargetRefused(f"{host!r} is not a valid IPv4 address") from None
    return host


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[ipaddress.IPv4Address]:
    """Every IPv4 address an IPv6 transition form carries: mapped, compatible, 6to4, Teredo
    (its server and its de-obfuscated client), NAT64 (well-known and local-use prefixes),
    ISATAP. A host that routes such an address may deliver it to the IPv4 address inside."""
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    found: list[ipaddress.IPv4Address] = []
    if address.ipv4_mapped is not None:
        found.append(address.ipv4_mapped)
    if address in _IPV4_COMPATIBLE and int(address) > 1:
        found.append(low32)
    if address.sixtofour is not None:
        found.append(address.sixtofour)
    if address.teredo is not None:
        found.extend(address.teredo)
    if address in _NAT64 or address in _NAT64_LOCAL:
        found.append(low32)
    if (int(address) >> 32) & 0xFFFFFFFF in _ISATAP_IDS:
        found.append(low32)
    return found


def forbidden_reason(address: IPAddress) -> str | None:
    """Why the address is inside (not a public unicast address), or None when it is public."""
    if isinstance(address, ipaddress.IPv6Address):
        for embedded in embedded_ipv4(address):
            reason = forbidden_reason(embedded)
            if reason:
                return f"{reason} (embedded in {address})"
        if address.ipv4_mapped is not None or address in _NAT64 or address in _NAT64_LOCAL:
            return None  # these reach exactly the (public) IPv4 address they carry
    for kind, hit in (
        ("an unspecified", address.is_unspecified),
        ("a loopback", address.is_loopback),
        ("a link-local", address.is_link_local),
        ("a multicast", address.is_multicast),
        ("a private", address.is_private),
        ("a reserved", address.is_reserved),
        ("a non-global", not address.is_global),
    ):
        if hit:
            return f"{address} is {kind} address"
    return None


def _getaddrinfo(host: str, port: int, timeout: float) -> list[IPAddress]:
    """`socket.getaddrinfo` in a daemon thread, given up after `timeout` seconds."""
    found: list[IPAddress] = []
    failure: list[BaseException] = []

    def lookup() -> None:
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            for _family, _type, _proto, _name, sockaddr in infos:
                address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])
                if address not in found:
                    found.append(address)
        except (OSError, UnicodeError, ValueError) as exc:
            failure.append(exc)

    worker = threading.Thread(target=lookup, name=f"resolve {host}", daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise CallbackHostUnresolved(f"host {host!r} did not resolve within {timeout:g}s")
    if failure or not found:
        why = f": {failure[0]}" if failure else ""
        raise CallbackHostUnresolved(f"host {host!r} does not resolve{why}")
    return found


def check_target(
    url: str,
    allow: AllowList,
    *,
    timeout: float,
    purpose: str = "callbacks",
    setting: str = "TIGHTROPE_CALLBACK_ALLOW",
) -> Target:
    """Resolve the URL's host and check every address; raise CallbackTargetRefused if any is
    inside and the allow-list does not name the destination. `purpose` and `setting` word the
    refusal (the endpoint client checks its destinations with the same rules)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise CallbackTargetRefused(f"not a valid URL: {exc}") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise CallbackTargetRefused(f"scheme {scheme!r} is not http or https")
    if not parts.hostname:
        raise CallbackTargetRefused("the URL has no host")
    port = port if port is not None else DEFAULT_PORTS[scheme]
    host = normalise_host(parts.hostname)
    if isinstance(host, str):
        named = allow.allows_name(host, port)
        if not named and (host == "localhost" or host.endswith(".localhost")):
            raise CallbackTargetRefused(f"{host!r} is a loopback name")
        addresses = _getaddrinfo(host, port, timeout)
        name = host
    else:
        named, addresses, name = False, [host], str(host)
    if not named:
        for address in addresses:
            reason = forbidden_reason(address)
            if reason and not allow.allows_address(address, port):
                shown = "" if name == str(address) else f"{name!r} resolves to "
                raise CallbackTargetRefused(
                    f"{shown}{reason}; {purpose} may not reach internal addresses "
                    f"(an operator can allow one with {setting})"
                )
    return Target(scheme=scheme, host=name, port=port, addresses=tuple(addresses))
