"""A server interceptor that answers undecodable requests with INVALID_ARGUMENT.

Left alone, grpcio answers bytes that do not parse as the method's request
message with INTERNAL "Exception deserializing request!", which reads like
a server bug and names nothing. This interceptor parses the request itself
and, when that fails, aborts with INVALID_ARGUMENT naming the method and the
message type, so the client learns that it sent garbage.
"""

from __future__ import annotations

import grpc


class _Undecodable:
    """Stands in for a request that did not parse; carries the reason."""

    def __init__(self, message: str) -> None:
        self.message = message


class MalformedRequestGuard(grpc.ServerInterceptor):
    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # e3's RPCs all take one request message; others pass untouched
        method = handler_call_details.method
        parse = handler.request_deserializer
        message_type = getattr(getattr(parse, "__self__", None), "__name__", "request message")

        def parse_or_flag(data: bytes):
            try:
                return parse(data)
            except Exception as exc:  # noqa: BLE001 - protobuf raises DecodeError and friends
                return _Undecodable(f"{method}: the request is not a valid {message_type} ({type(exc).__name__}: {exc})")

        def refusing(behavior):
            def wrapped(request, context):
                if isinstance(request, _Undecodable):
                    context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.message)
                return behavior(request, context)

            return wrapped

        if handler.unary_unary is not None:
            return handler._replace(request_deserializer=parse_or_flag, unary_unary=refusing(handler.unary_unary))
        return handler._replace(request_deserializer=parse_or_flag, unary_stream=refusing(handler.unary_stream))
