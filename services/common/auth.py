"""Bearer-token access control for gRPC (metadata) and HTTP (header).

A service configured with a token refuses gRPC calls and mutating HTTP
requests that do not carry `authorization: Bearer <token>`; with no token
configured everything is open (the embedded single-machine default).
"""

from __future__ import annotations

import hmac

import grpc


def token_matches(header: str | None, token: str) -> bool:
    if not header or not header.startswith("Bearer "):
        return False
    return hmac.compare_digest(header[len("Bearer "):].encode(), token.encode())


class BearerTokenInterceptor(grpc.ServerInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong bearer token in 'authorization' metadata")

        self._deny_unary = grpc.unary_unary_rpc_method_handler(deny)
        self._deny_stream = grpc.unary_stream_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        metadata = dict(handler_call_details.invocation_metadata or ())
        if token_matches(metadata.get("authorization"), self._token):
            return continuation(handler_call_details)
        handler = continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return self._deny_stream
        return self._deny_unary


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata a client attaches to every call."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def http_bearer(token: str | None):
    """A FastAPI dependency that refuses a request without `Authorization: Bearer <token>`.

    Declared through fastapi.security.HTTPBearer, so the OpenAPI schema names
    the scheme and clients (and the schema fuzzer) know to send it. With no
    token configured it lets everything through.
    """
    from fastapi import Depends, HTTPException
    from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

    scheme = HTTPBearer(auto_error=False, description="the run's API token (E3_API_TOKEN)")

    def check(credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        if token is None:
            return
        presented = f"Bearer {credentials.credentials}" if credentials is not None else None
        if not token_matches(presented, token):
            raise HTTPException(401, "missing or wrong bearer token", headers={"WWW-Authenticate": "Bearer"})

    return check
