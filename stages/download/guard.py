"""The fetch guard: what img2dataset's workers may connect to, and how much they may read.

img2dataset fetches with `urllib.request.urlopen`, which uses the process's installed opener.
`install()` replaces it, in each download worker, with one that

- resolves the host itself and refuses it when any of its addresses is loopback, private,
  link-local, a cloud metadata address, or otherwise not globally routable (unless private
  networks are allowed), then connects to the address it checked, so a second DNS answer cannot
  swap in another one;
- does the same for every redirect, and refuses redirects to schemes other than http(s);
- refuses bodies larger than `max_bytes` (by Content-Length up front, else while reading) and
  downloads that take longer than `max_seconds` from connecting to the last byte, redirects
  included.

A refusal is an exception whose message starts with `fetch guard: <reason>:`; img2dataset records
it as the sample's error, and the manifest counts it under that reason.

What it cannot enforce: the time cap is checked between reads, so it can be overrun by one
`--timeout` (each read waits at most that long), and while the response headers arrive only
`--timeout` applies (http.client bounds their size); a small compressed image can still decode to
a large one (img2dataset's `--max-image-area` filters it only after decoding; OpenCV's own limit,
`OPENCV_IO_MAX_IMAGE_PIXELS`, bounds the decode); HTTP(S) proxies from the environment are not
used while the guard is on, because the guard must see the address it connects to.
"""

from __future__ import annotations

import functools
import http.client
import ipaddress
import socket
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

REFUSAL_PREFIX = "fetch guard: "
READ_CHUNK = 1 << 16

# Cloud instance metadata endpoints (AWS, GCP, Azure, OpenStack, ECS; AWS's IPv6; Alibaba).
METADATA_ADDRESSES = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200"))
SHARED_ADDRESS_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT; not global

Resolver = Callable[[str, int], list[str]]


class FetchRefused(Exception):
    """Not an OSError on purpose: urllib would wrap an OSError into '<urlopen error …>'."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{REFUSAL_PREFIX}{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class FetchPolicy:
    allow_private_networks: bool = False
    max_bytes: int = 32 << 20
    max_seconds: float = 60.0
    allow_addresses: frozenset[str] = frozenset()  # exact addresses let through (a known mirror)


def address_refusal(ip: str) -> str | None:
    """The refusal reason for one resolved address, or None when it may be fetched from."""
    addr = ipaddress.ip_address(ip.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address):
        embedded = addr.ipv4_mapped or addr.sixtofour or (addr.teredo[1] if addr.teredo else None)
        if embedded is not None:
            addr = embedded
    if addr in METADATA_ADDRESSES:
        return "refused_metadata"
    if addr.is_loopback:
        return "refused_loopback"
    if addr.is_link_local:
        return "refused_link_local"
    if addr.is_multicast or addr.is_unspecified or addr.is_reserved:
        return "refused_reserved"
    if addr.is_private or (addr.version == 4 and addr in SHARED_ADDRESS_SPACE):
        return "refused_private"
    if not addr.is_global:
        return "refused_reserved"
    return None


def resolve(host: str, port: int) -> list[str]:
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


def checked_addresses(host: str, port: int, policy: FetchPolicy,
                      resolver: Resolver = resolve) -> list[str]:
    """The addresses to connect to for host:port; FetchRefused when any of them is refused.

    One refused address refuses the host: a name that resolves both inside and outside is
    exactly what a rebinding attack looks like.
    """
    addresses = resolver(host, port)
    if not policy.allow_private_networks:
        for ip in addresses:
            if ip not in policy.allow_addresses and (reason := address_refusal(ip)):
                raise FetchRefused(reason, f"{host} resolves to a {reason.removeprefix('refused_')} "
                                           "address (--allow-private-networks lifts this)")
    return addresses


def _connect(address: tuple[str, int], timeout, source_address=None, *, policy: FetchPolicy,
             resolver: Resolver = resolve) -> socket.socket:
    """socket.create_connection, but to the checked addresses of the host only."""
    host, port = address
    error: OSError | None = None
    for ip in checked_addresses(host, port, policy, resolver):
        try:
            return socket.create_connection((ip, port), timeout, source_address)
        except OSError as exc:
            error = exc
    raise error or OSError(f"no address for {host}")


class CappedResponse(http.client.HTTPResponse):
    """An HTTP response that stops reading past the byte cap or the deadline."""

    def __init__(self, sock, *args, max_bytes: int, deadline: float, **kwargs):
        super().__init__(sock, *args, **kwargs)
        self.max_bytes, self.deadline, self._read_bytes = max_bytes, deadline, 0

    def begin(self) -> None:
        super().begin()
        declared = self.getheader("Content-Length")
        if declared and declared.isdigit() and int(declared) > self.max_bytes:
            self.close()
            raise FetchRefused("too_large", f"Content-Length {declared} is over the {self.max_bytes} "
                                            "byte cap (--max-response-bytes)")

    def _account(self, data: bytes) -> bytes:
        self._read_bytes += len(data)
        if self._read_bytes > self.max_bytes:
            self.close()
            raise FetchRefused("too_large", f"body over the {self.max_bytes} byte cap "
                                            "(--max-response-bytes)")
        if time.monotonic() > self.deadline:
            self.close()
            raise FetchRefused("too_slow", "download took longer than --max-download-seconds")
        return data

    def read(self, amt: int | None = None) -> bytes:
        if amt is not None:
            return self._account(super().read(amt))
        chunks = []
        while chunk := self._account(self.read1(READ_CHUNK)):
            chunks.append(chunk)
        return b"".join(chunks)


def _deadline(req: urllib.request.Request, policy: FetchPolicy) -> float:
    if getattr(req, "clipforge_deadline", None) is None:
        req.clipforge_deadline = time.monotonic() + policy.max_seconds
    return req.clipforge_deadline


def _connection_class(base: type[http.client.HTTPConnection], policy: FetchPolicy, deadline: float,
                      resolver: Resolver):
    class Guarded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._create_connection = functools.partial(_connect, policy=policy, resolver=resolver)
            self.response_class = functools.partial(CappedResponse, max_bytes=policy.max_bytes,
                                                    deadline=deadline)
    return Guarded


class GuardedHTTPHandler(urllib.request.HTTPHandler):
    def __init__(self, policy: FetchPolicy, resolver: Resolver = resolve):
        super().__init__()
        self.policy, self.resolver = policy, resolver

    def http_open(self, req):
        cls = _connection_class(http.client.HTTPConnection, self.policy, _deadline(req, self.policy),
                                self.resolver)
        return self.do_open(cls, req)


class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
    def __init__(self, policy: FetchPolicy, resolver: Resolver = resolve):
        super().__init__()
        self.policy, self.resolver = policy, resolver

    def https_open(self, req):
        cls = _connection_class(http.client.HTTPSConnection, self.policy, _deadline(req, self.policy),
                                self.resolver)
        return self.do_open(cls, req, context=self._context)


class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
    """Redirects keep the first request's deadline; only http(s) targets are followed."""

    def http_error_302(self, req, fp, code, msg, headers):
        target = headers.get("location") or headers.get("uri")
        if target:
            scheme = urlsplit(urljoin(req.full_url, target)).scheme.lower()
            if scheme not in ("http", "https"):
                fp.close()
                raise FetchRefused("refused_scheme", f"redirect to a {scheme}: URL")
        return super().http_error_302(req, fp, code, msg, headers)

    http_error_301 = http_error_303 = http_error_307 = http_error_308 = http_error_302

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None:
            new.clipforge_deadline = getattr(req, "clipforge_deadline", None)
        return new


class RefuseOtherSchemes(urllib.request.BaseHandler):
    def unknown_open(self, req):
        raise FetchRefused("refused_scheme", f"{req.type}: URLs are not fetched, only http(s)")


def build_opener(policy: FetchPolicy, resolver: Resolver = resolve) -> urllib.request.OpenerDirector:
    """An opener with http(s), redirects and errors only: no file:, ftp:, data: or proxies."""
    opener = urllib.request.OpenerDirector()
    for handler in (GuardedHTTPHandler(policy, resolver), GuardedHTTPSHandler(policy, resolver),
                    GuardedRedirectHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), RefuseOtherSchemes()):
        opener.add_handler(handler)
    return opener


_installed: FetchPolicy | None = None


def install(policy: FetchPolicy) -> None:
    """Make urlopen in this process go through the guard (once per process and policy)."""
    global _installed
    if _installed != policy:
        urllib.request.install_opener(build_opener(policy))
        _installed = policy
