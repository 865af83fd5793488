"""TLS from e3.config.TLSConfig for gRPC servers and channels, uvicorn and httpx.

No cert_file: the server speaks plaintext. No ca_file: the client speaks
plaintext. client_ca_file: the server asks for, and verifies, a client
certificate (mutual TLS); the client then presents its cert_file.
"""

from __future__ import annotations

import ssl
from pathlib import Path

import grpc

from e3.config import TLSConfig


def _read(path: str | None) -> bytes | None:
    return Path(path).read_bytes() if path else None


def grpc_server_credentials(tls: TLSConfig) -> grpc.ServerCredentials | None:
    if not tls.cert_file:
        return None
    return grpc.ssl_server_credentials(
        [(_read(tls.key_file), _read(tls.cert_file))], root_certificates=_read(tls.client_ca_file),
        require_client_auth=tls.client_ca_file is not None,
    )


def grpc_channel_credentials(tls: TLSConfig) -> grpc.ChannelCredentials | None:
    if not tls.ca_file:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(tls.ca_file), private_key=_read(tls.key_file), certificate_chain=_read(tls.cert_file),
    )


def grpc_channel(address: str, tls: TLSConfig, options: list, aio: bool = False):
    """A channel to `address`: TLS when tls.ca_file is set, else plaintext."""
    module = grpc.aio if aio else grpc
    credentials = grpc_channel_credentials(tls)
    if credentials is None:
        return module.insecure_channel(address, options=options)
    return module.secure_channel(address, credentials, options=options)


def uvicorn_options(tls: TLSConfig) -> dict:
    """uvicorn.run / uvicorn.Config keywords for HTTPS (empty: plain HTTP)."""
    if not tls.cert_file:
        return {}
    options = {"ssl_certfile": tls.cert_file, "ssl_keyfile": tls.key_file}
    if tls.client_ca_file:
        options |= {"ssl_ca_certs": tls.client_ca_file, "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return options


def http_scheme(tls: TLSConfig) -> str:
    """The scheme of a URL to a server this config makes: https with a certificate."""
    return "https" if tls.cert_file else "http"


def httpx_verify(tls: TLSConfig) -> ssl.SSLContext | bool:
    """httpx's `verify=`: a context trusting tls.ca_file (presenting cert_file), or the default."""
    if not tls.ca_file:
        return True
    context = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    return context
