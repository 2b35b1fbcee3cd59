"""Network checks a site can run on its own: can it complete mutual TLS with the aggregator?

gRPC reports a refused client certificate only as "unavailable", which a hospital's IT team
cannot act on. A direct TLS probe with the site's own key and certificate says which side
refused and why.
"""
from __future__ import annotations

import socket
import ssl


def tls_probe(host: str, port: int, ca_file: str, cert_file: str | None, key_file: str | None,
              timeout: float = 5.0) -> tuple[bool, str]:
    """Try a mutual-TLS handshake; return (ok, what happened) in words hospital IT can act on."""
    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    if cert_file and key_file:
        ctx.load_cert_chain(cert_file, key_file)
    last = "no address found"
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        return False, f"cannot resolve {host}: {exc.strerror}"
    for family, _, _, _, addr in addresses:
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(addr)
        except OSError as exc:
            last = f"cannot connect to {host}:{port} ({exc.strerror or exc})"
            sock.close()
            continue
        try:
            with ctx.wrap_socket(sock, server_hostname=host) as tls:
                # With TLS 1.3 the server judges our certificate after our side of the handshake
                # is done: its verdict (an alert, or its HTTP/2 preface) arrives on the first read.
                try:
                    first = tls.recv(1)
                except socket.timeout:
                    first = b"?"  # no verdict within the timeout: not refused
                if not first:
                    return False, ("the aggregator rejected this site's certificate during the TLS handshake "
                                   "(it closed the connection: certificate not issued by the federation CA?)")
                return True, f"mutual TLS with {host}:{port} established ({tls.version()})"
        except ssl.SSLCertVerificationError as exc:
            return False, f"the aggregator's certificate is not trusted by this site's federation CA ({exc.verify_message})"
        except ssl.SSLError as exc:
            reason = (exc.reason or str(exc)).lower().replace("_", " ")
            return False, f"the aggregator rejected this site's certificate during the TLS handshake ({reason})"
        except OSError as exc:
            last = f"connection to {host}:{port} closed during the TLS handshake ({exc})"
    return False, last


# --------------------------------------------------------------------------- through the hospital's proxy

class NetworkProblem(Exception):
    """The aggregator cannot be reached; ``what`` says what happened, ``ask_it`` what to ask IT for."""

    def __init__(self, what: str, ask_it: str):
        super().__init__(f"{what}. Ask your IT team to {ask_it}.")
        self.what = what
        self.ask_it = ask_it


def proxy_for(host: str, configured: str | None = None) -> str | None:
    """The HTTPS proxy gRPC will use for ``host``: ``configured`` (data.yaml), else grpc_proxy /
    https_proxy / http_proxy from the environment, unless no_proxy lists the host."""
    import os
    import urllib.request

    if configured:
        return configured
    for var in ("grpc_proxy", "https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        value = os.environ.get(var)
        if value:
            if os.environ.get("no_grpc_proxy") or os.environ.get("no_proxy") or os.environ.get("NO_PROXY"):
                if urllib.request.proxy_bypass_environment(host):
                    return None
            return value
    return None


def _proxy_address(proxy: str) -> tuple[str, int]:
    from urllib.parse import urlsplit

    u = urlsplit(proxy if "://" in proxy else f"http://{proxy}")
    if u.scheme not in ("http", ""):
        raise NetworkProblem(f"the proxy setting {proxy!r} is not an http:// proxy URL",
                             "give you the HTTPS proxy's address as http://HOST:PORT")
    if u.username:
        raise NetworkProblem("the proxy setting carries a user name; sitekit does not send proxy passwords",
                             "allow this machine to use the proxy without a password (by address)")
    return u.hostname, u.port or 3128


def open_tunnel(host: str, port: int, proxy: str | None, timeout: float = 5.0) -> tuple[socket.socket, dict]:
    """A TCP connection to ``host:port``, through the HTTPS proxy (HTTP CONNECT) when one is given.

    Returns the socket and timings (seconds). Every step is bounded by ``timeout``; a failure
    raises :class:`NetworkProblem` saying what to ask the hospital's IT team for."""
    import time

    timing: dict = {"via": proxy or "direct"}
    t0 = time.monotonic()
    if not proxy:
        try:
            sock = socket.create_connection((host, port), timeout=timeout)
        except socket.gaierror as exc:
            raise NetworkProblem(f"this machine cannot resolve {host} ({exc.strerror}) and no HTTPS proxy is configured",
                                 f"give you the HTTPS proxy's address (set https_proxy, or 'proxy' in data.yaml) and "
                                 f"allow CONNECT through it to {host}:{port}") from None
        except OSError as exc:
            raise NetworkProblem(f"cannot connect to the aggregator {host}:{port} directly ({exc.strerror or exc}) and no "
                                 "HTTPS proxy is configured",
                                 f"either give you the HTTPS proxy's address (set https_proxy, or 'proxy' in data.yaml) "
                                 f"and allow CONNECT through it to {host}:{port}, or open outbound TCP to {host}:{port}") from None
        timing["connect_s"] = time.monotonic() - t0
        return sock, timing
    phost, pport = _proxy_address(proxy)
    try:
        sock = socket.create_connection((phost, pport), timeout=timeout)
    except OSError as exc:
        raise NetworkProblem(f"cannot connect to the HTTPS proxy {phost}:{pport} ({exc.strerror or exc})",
                             f"check the proxy's address and that it is running, and allow this machine to use it "
                             f"for CONNECT to {host}:{port}") from None
    timing["connect_s"] = time.monotonic() - t0
    sock.settimeout(timeout)
    try:
        sock.sendall(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
        answer = b""
        while b"\r\n\r\n" not in answer and len(answer) < 65536:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    except OSError as exc:
        sock.close()
        raise NetworkProblem(f"the HTTPS proxy {phost}:{pport} did not answer a CONNECT to {host}:{port} within "
                             f"{timeout:.0f} s ({exc.strerror or exc})",
                             f"check the proxy is running and allows CONNECT to {host}:{port}") from None
    status = answer.split(b"\r\n", 1)[0].decode("latin-1").strip()
    if not status:
        sock.close()
        raise NetworkProblem(f"the HTTPS proxy {phost}:{pport} closed the connection without answering a CONNECT to "
                             f"{host}:{port} (is it running?)",
                             f"check the proxy is running and can reach {host}:{port}")
    parts = status.split(" ", 2)
    if len(parts) >= 2 and parts[1].startswith("5"):
        sock.close()
        raise NetworkProblem(f"the HTTPS proxy {phost}:{pport} accepted the request but could not reach {host}:{port} "
                             f"({status}): the aggregator may be down, or a firewall behind the proxy blocks it",
                             f"check that the proxy itself may connect to {host}:{port} (and ask the federation whether "
                             "the aggregator is running)")
    if len(parts) < 2 or parts[1] != "200":
        sock.close()
        raise NetworkProblem(f"the HTTPS proxy {phost}:{pport} refused CONNECT to {host}:{port} ({status})",
                             f"allow outbound HTTPS (HTTP CONNECT) from this machine through the proxy to {host}:{port} "
                             "(see the allow-list request that sitekit preflight wrote)")
    timing["tunnel_s"] = time.monotonic() - t0 - timing["connect_s"]
    return sock, timing


def mtls_handshake(host: str, port: int, ca_file: str, cert_file: str, key_file: str, proxy: str | None = None,
                   timeout: float = 5.0) -> dict:
    """Complete the mutual-TLS handshake with the aggregator (through ``proxy`` if given).

    Returns timings, the TLS version and the aggregator certificate's SHA-256 fingerprint; raises
    :class:`NetworkProblem` if the connection or the handshake fails."""
    import hashlib
    import time

    ctx = ssl.create_default_context(cafile=ca_file)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    ctx.load_cert_chain(cert_file, key_file)
    sock, timing = open_tunnel(host, port, proxy, timeout)
    t0 = time.monotonic()
    try:
        with ctx.wrap_socket(sock, server_hostname=host) as tls:
            try:
                first = tls.recv(1)  # TLS 1.3: the server's verdict on our certificate comes with the first read
            except socket.timeout:
                first = b"?"
            if not first:
                raise NetworkProblem(f"the aggregator {host}:{port} rejected this site's certificate during the TLS "
                                     "handshake (not issued by the federation CA, or not for this site?)",
                                     "do nothing: this is for the federation operator; send them this report")
            der = tls.getpeercert(binary_form=True)
            timing["handshake_s"] = time.monotonic() - t0
            timing["tls_version"] = tls.version()
            h = hashlib.sha256(der).hexdigest().upper()
            timing["aggregator_fingerprint"] = ":".join(h[i:i + 2] for i in range(0, len(h), 2))
            return timing
    except ssl.SSLCertVerificationError as exc:
        raise NetworkProblem(f"the server at {host}:{port} presented a certificate this site's federation CA does not "
                             f"trust ({exc.verify_message}); something between this machine and the aggregator "
                             "(e.g. a TLS-inspecting proxy) may be replacing it",
                             f"exempt {host}:{port} from TLS inspection: the connection must pass through unchanged "
                             "(mutual TLS)") from None
    except ssl.SSLError as exc:
        reason = (exc.reason or str(exc)).lower().replace("_", " ")
        raise NetworkProblem(f"the TLS handshake with {host}:{port} failed ({reason})",
                             f"exempt {host}:{port} from TLS inspection: the connection must pass through unchanged "
                             "(mutual TLS)") from None
    except OSError as exc:
        if isinstance(exc, NetworkProblem):
            raise
        raise NetworkProblem(f"the connection to {host}:{port} closed during the TLS handshake ({exc})",
                             f"check that the proxy passes the CONNECT tunnel to {host}:{port} through unchanged") from None
