"""Addresses and ports: parsing HOST[:PORT], the TCP probe every service check uses, and the argparse types
shared by the command lines (`genesis`, `python -m pipeline.services`, the Dask TLS launcher)."""

from __future__ import annotations

import argparse
import ipaddress
import socket
import urllib.parse

__all__ = ["host_port", "connect", "binds_every_interface", "positive_int", "non_negative_int", "port"]


def host_port(address: str, default_port: int) -> tuple[str, int]:
    """(host, port) of HOST[:PORT] or SCHEME://HOST[:PORT] (IPv6 in brackets); ValueError when it is not one."""
    parts = urllib.parse.urlsplit(address if "://" in address else f"//{address}")
    host, port = parts.hostname, parts.port  # .port raises ValueError for a port out of range or not a number
    if not host or parts.path.strip("/") or parts.query:
        raise ValueError(address)
    return host, port if port is not None else default_port


def connect(host: str, port: int, timeout: float) -> str | None:
    """None when a TCP connection to host:port opens within `timeout` s, else why not, in a few words."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except TimeoutError:
        return f"no answer within {timeout:g} s"
    except socket.gaierror as err:
        return f"unknown host: {err.strerror or err}"
    except OSError as err:
        return (err.strerror or str(err)).lower()


def _unspecified(address: str) -> bool:
    """Whether an address as getaddrinfo returns it (IPv6 possibly with a %scope) is 0.0.0.0, :: or ::ffff:0.0.0.0."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_unspecified or bool(mapped and mapped.is_unspecified)


def binds_every_interface(host: str) -> bool:
    """Whether a server told to listen on `host` listens on every network interface.

    Decided as the server's socket layer decides it, not by spelling: the host (brackets of an IPv6 literal
    removed) goes through getaddrinfo, which also accepts "0", "000.0.0.0", "0x0", "::0", "0:0:0:0:0:0:0:0" and
    host names that resolve to an unspecified address; any unspecified result binds everywhere. An empty host is
    the wildcard too. A host that does not resolve binds nothing (the server will say so)."""
    text = host.strip()
    if text.startswith("[") and text.endswith("]"):
        text = text[1:-1]
    if not text:
        return True
    if _unspecified(text):
        return True
    try:
        infos = socket.getaddrinfo(text, None, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError, OSError):
        return False
    return any(_unspecified(str(info[4][0])) for info in infos)


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = _integer(text, "a positive integer")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = _integer(text, "an integer >= 0")
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}")
    return value


def port(text: str) -> int:
    """argparse type: a TCP port, 1..65535."""
    value = _integer(text, "a port number")
    if not 0 < value < 65536:
        raise argparse.ArgumentTypeError(f"expected a port in 1..65535, got {value}")
    return value
