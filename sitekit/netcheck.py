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
