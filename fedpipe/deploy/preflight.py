"""A device's pre-flight look at the coordinator, before a SuperNode is started.

Flower's SuperNode reports every failed connection alike (exit code 305, after retrying for
--max-wait seconds) and leaves the cause to an OpenSSL line in its log. One TCP connect and
one TLS handshake made here with Python's `ssl` (what Flower's own client uses) tell the
common mistakes apart in a second: nothing listening, a certificate issued for another
name, another CA, a coordinator without TLS, or TLS where the device expects none.
An outcome the probe cannot read (a reset, a timeout mid-handshake) is left to the
SuperNode, as before. The SuperLink serves plain HTTP/1.1 behind optional TLS, so a
connection opened and closed without a request costs it nothing.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

from cryptography import x509

from fedpipe.errors import os_reason

__all__ = [
    "PreflightError",
    "check_port",
    "hostname_mismatch",
    "not_tls",
    "probe",
    "split_address",
    "unreachable",
    "untrusted",
    "uses_tls",
]

HOSTNAME_MISMATCH = 62  # X509_V_ERR_HOSTNAME_MISMATCH
IP_ADDRESS_MISMATCH = 64  # X509_V_ERR_IP_ADDRESS_MISMATCH
CERT_NOT_YET_VALID, CERT_HAS_EXPIRED = 9, 10
# unable to get issuer cert (2), self-signed leaf (18) or chain (19), no local issuer (20),
# cannot verify the leaf (21): all mean "the given CA did not sign this certificate".
UNTRUSTED = frozenset({2, 18, 19, 20, 21})
# OpenSSL's reasons when the peer answers a ClientHello with something that is not TLS.
NOT_TLS = frozenset(
    {
        "WRONG_VERSION_NUMBER",
        "HTTP_REQUEST",
        "RECORD_LAYER_FAILURE",
        "PACKET_LENGTH_TOO_LONG",
        "UNKNOWN_PROTOCOL",
    }
)


class PreflightError(RuntimeError):
    """The coordinator cannot be used as configured; the message says why and what to do."""


def check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port {value} is out of range (1..65535)")
    return value


def split_address(address: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [ADDR]:PORT) -> (host, port); ValueError says what is wrong."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{address!r} is not HOST:PORT (e.g. 192.168.1.10:9092)")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"{address!r}: write an IPv6 address in brackets, e.g. [::1]:9092")
    try:
        number = int(port)
    except ValueError:
        raise ValueError(f"{address!r}: the port {port!r} is not a number (1..65535)") from None
    return host, check_port(number)


def unreachable(host: str, port: int, reason: str) -> str:
    return (
        f"cannot reach the coordinator at {host}:{port}: {reason}; "
        "is fedpipe-server running there? check --superlink"
    )


def hostname_mismatch(host: str, names: list[str]) -> str:
    listed = f" (it lists {', '.join(names)})" if names else ""
    return (
        f"TLS: the coordinator's certificate is not valid for {host}{listed}; connect using a "
        f"name it lists, or re-create it with `fedpipe certs --hosts {host} ...` on the "
        "coordinator"
    )


def untrusted(host: str, port: int, ca: Path) -> str:
    return (
        f"TLS: the coordinator's certificate at {host}:{port} is not signed by the given CA "
        f"({ca}); use the ca.crt from the coordinator's `fedpipe certs` folder"
    )


def not_tls(host: str, port: int) -> str:
    return (
        f"the coordinator at {host}:{port} does not use TLS (started with --insecure?); "
        "start it with --certs DIR, or on a test network pass --insecure here"
    )


def uses_tls(host: str, port: int) -> str:
    return (
        f"the coordinator at {host}:{port} uses TLS: pass --root-certificates CA.crt "
        "(the ca.crt from its `fedpipe certs` folder) instead of --insecure"
    )


def probe(
    address: str,
    ca: Path | None,
    wait: float = 0.0,
    timeout: float = 3.0,
    notify: Callable[[str], None] | None = None,
) -> None:
    """Raise PreflightError when the coordinator at `address` certainly cannot be used with
    `ca` (None: --insecure). An unreachable address is retried for `wait` seconds, as the
    SuperNode itself would (`notify` hears once that it is waiting)."""
    host, port = split_address(address)
    with _connect(host, port, wait, timeout, notify) as sock:
        if ca is None:
            _refuse_tls(sock, host, port)
        else:
            _check_tls(sock, host, port, ca, timeout)


def _connect(
    host: str, port: int, wait: float, timeout: float, notify: Callable[[str], None] | None
) -> socket.socket:
    deadline = time.monotonic() + wait
    told = False
    while True:
        try:
            return socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as exc:
            raise PreflightError(
                f"cannot resolve the coordinator's host name {host!r}: {exc.strerror}; "
                "check --superlink"
            ) from exc
        except OSError as exc:
            reason = os_reason(exc).lower()
            if time.monotonic() >= deadline:
                raise PreflightError(unreachable(host, port, reason)) from exc
            if notify is not None and not told:
                notify(
                    f"waiting for the coordinator at {host}:{port} ({reason}); "
                    f"retrying for up to {wait:.0f} s (--max-wait)"
                )
                told = True
            time.sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def _check_tls(sock: socket.socket, host: str, port: int, ca: Path, timeout: float) -> None:
    try:
        context = ssl.create_default_context(cafile=str(ca))
    except (ssl.SSLError, OSError):
        return  # the device checks the CA file itself, with a better message
    try:
        context.wrap_socket(sock, server_hostname=host).close()
    except ssl.SSLCertVerificationError as exc:
        raise PreflightError(_refused(exc, host, port, ca, timeout)) from exc
    except ssl.SSLError as exc:
        if exc.reason in NOT_TLS:
            raise PreflightError(not_tls(host, port)) from exc
    except OSError:
        pass  # reset, EOF or timeout: undecided, the SuperNode will say


def _refused(
    exc: ssl.SSLCertVerificationError, host: str, port: int, ca: Path, timeout: float
) -> str:
    """Why the given CA refused the coordinator's certificate, in the words that fix it."""
    code, message = exc.verify_code, str(exc.verify_message)
    if code in (HOSTNAME_MISMATCH, IP_ADDRESS_MISMATCH) or "mismatch" in message:
        return hostname_mismatch(host, _certificate_names(host, port, timeout))
    if code in UNTRUSTED:
        return untrusted(host, port, ca)
    if code in (CERT_HAS_EXPIRED, CERT_NOT_YET_VALID):
        return (
            f"TLS: the coordinator's certificate at {host}:{port} {message.lower()}; "
            "check both clocks, or re-create it with `fedpipe certs` on the coordinator"
        )
    return (
        f"TLS: the coordinator's certificate at {host}:{port} was refused ({message}); "
        "check --root-certificates"
    )


def _certificate_names(host: str, port: int, timeout: float) -> list[str]:
    """The names the coordinator's certificate is valid for (its subject alternative names),
    read through an unverified handshake; [] when that fails."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout) as sock,
            context.wrap_socket(sock, server_hostname=host) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        if der is None:
            return []
        san = x509.load_der_x509_certificate(der).extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        )
    except (OSError, ValueError, x509.ExtensionNotFound):
        return []
    return [str(name.value) for name in san.value]


def _refuse_tls(sock: socket.socket, host: str, port: int) -> None:
    """--insecure against a TLS coordinator: a handshake that verifies nothing succeeds."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        context.wrap_socket(sock, server_hostname=host).close()
    except (ssl.SSLError, OSError):
        return  # not TLS (or undecided): the SuperNode connects as asked
    raise PreflightError(uses_tls(host, port))
