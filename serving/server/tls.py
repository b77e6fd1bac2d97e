"""TLS for the gRPC port (server credentials) and the REST port (an `ssl` context), from the same PEM files,
checked before the server starts."""

from __future__ import annotations

import ssl

import grpc

from serving.errors import StartupError
from serving.server.config import TlsSettings


def server_credentials(tls: TlsSettings) -> grpc.ServerCredentials | None:
    """TLS credentials from --tls-cert/--tls-key (+ --tls-client-ca: mutual TLS), or None for plaintext.

    The files are checked with Python's `ssl` first (readable PEM, the key matching the certificate), so a
    bad file stops start-up with a message naming it instead of failing every handshake later.
    """
    if tls.tls_cert is None or tls.tls_key is None:
        return None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls.tls_cert, tls.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise StartupError(
            f"cannot use --tls-cert {tls.tls_cert} with --tls-key {tls.tls_key}: {exc.strerror or exc}"
        ) from None
    client_ca: bytes | None = None
    if tls.tls_client_ca is not None:
        try:
            ssl.create_default_context(cafile=str(tls.tls_client_ca))
            client_ca = tls.tls_client_ca.read_bytes()
        except (OSError, ssl.SSLError) as exc:
            raise StartupError(f"cannot use --tls-client-ca {tls.tls_client_ca}: {exc.strerror or exc}") from None
    return grpc.ssl_server_credentials(
        [(tls.tls_key.read_bytes(), tls.tls_cert.read_bytes())],
        root_certificates=client_ca,
        require_client_auth=client_ca is not None,
    )


def ssl_context(tls: TlsSettings) -> ssl.SSLContext | None:
    """The same certificate, key and client CA as an `ssl` context for the REST port, or None for plaintext
    (`server_credentials` has checked the files already)."""
    if tls.tls_cert is None or tls.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(tls.tls_cert, tls.tls_key)
    if tls.tls_client_ca is not None:
        context.load_verify_locations(cafile=str(tls.tls_client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context
