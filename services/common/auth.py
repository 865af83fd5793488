"""Per-role bearer tokens for gRPC (metadata) and HTTP (header), failing closed.

Three roles, each with its own token (e3.config.AuthConfig): `generation`
(the replicas: LeaseTasks, RenewLeases, SubmitGroup, ReportTaskFailure, and
the reward service's /v1/score), `trainer` (StreamBatch, ReportStep) and
`operator` (the scheduler's mutating HTTP calls, and its /v1 reads when
`api_read_open` is false). A call without a known token is UNAUTHENTICATED
(HTTP 401); a known token of the wrong role is PERMISSION_DENIED (HTTP 403)
naming the role and the call. A role whose token is unset is open, which a
service allows only with `auth.insecure_loopback: true` and every address it
binds or calls on loopback (require_tokens, run at start-up). A token comes
from its variable (E3_GENERATION_TOKEN) or from a file that variable's _FILE
twin names (E3_GENERATION_TOKEN_FILE, a mounted Secret); e3.config reads the
file and refuses a missing or empty one.
"""

from __future__ import annotations

import hmac
import ipaddress
from dataclasses import dataclass
from pathlib import Path

import grpc
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from e3.config import AuthConfig, ConfigError

ROLES = ("generation", "trainer", "operator")
ENV = {role: f"E3_{role.upper()}_TOKEN" for role in ROLES}  # e3.config.SHORT_ENV
ENV_FILE = {role: f"{name}_FILE" for role, name in ENV.items()}  # a file holding the token instead
GRPC_ROLES = {
    "LeaseTasks": "generation", "RenewLeases": "generation", "SubmitGroup": "generation",
    "ReportTaskFailure": "generation", "StreamBatch": "trainer", "ReportStep": "trainer", "RegisterTrainer": "trainer",
}
GRPC_SERVICE = "/e3.v1.Scheduler/"
# The tokens each service's __main__ needs to start (and the only ones a deployment gives it).
SERVICE_ROLES = {
    "scheduler": ("generation", "trainer", "operator"), "generation": ("generation",),
    "reward": ("generation",), "trainer": ("trainer",),
}


def setting(role: str) -> str:
    """The config field and environment variables of a role's token, for messages."""
    return f"auth.{role}_token ({ENV[role]}, or a file named by {ENV_FILE[role]})"


def is_loopback(host: str) -> bool:
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_of(address: str) -> str:
    """The host of HOST:PORT, [V6]:PORT or a URL."""
    if "://" in address:
        address = address.split("://", 1)[1].split("/", 1)[0]
    if address.startswith("["):
        return address[1:address.index("]")]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


@dataclass(frozen=True)
class RoleTokens:
    """The token of each role a service checks or sends; None: that role is open (loopback only)."""

    generation: str | None = None
    trainer: str | None = None
    operator: str | None = None

    @classmethod
    def from_config(cls, auth: AuthConfig) -> RoleTokens:
        return cls(auth.generation_token, auth.trainer_token, auth.operator_token)

    def __repr__(self) -> str:  # never print a token
        return "RoleTokens(" + ", ".join(f"{r}={'set' if getattr(self, r) else 'open'}" for r in ROLES) + ")"

    def role_of(self, header: str | None) -> str | None:
        """The role whose token `Authorization: Bearer <token>` carries, or None."""
        if not header or not header.startswith("Bearer "):
            return None
        presented = header[len("Bearer "):].encode()
        found = None
        for role in ROLES:
            token = getattr(self, role)
            # Compare against every role, so the time taken says nothing about which matched.
            if token is not None and hmac.compare_digest(presented, token.encode()):
                found = found or role
        return found

    def check(self, role: str, header: str | None, call: str) -> tuple[str, str] | None:
        """None if `header` may make `call` (a `role` call); else ("unauthenticated" | "permission_denied", message)."""
        token = getattr(self, role)
        if token is None:
            return None
        if header and header.startswith("Bearer ") and hmac.compare_digest(header[len("Bearer "):].encode(), token.encode()):
            return None
        presented = self.role_of(header)
        if presented is None:
            return "unauthenticated", f"{call} needs the {role} token (missing or wrong bearer token)"
        return "permission_denied", f"the {presented} token may not call {call}: it is a {role} call"


def require_tokens(auth: AuthConfig, roles: tuple[str, ...], service: str, addresses: list[str]) -> None:
    """Raise ConfigError unless every role in `roles` has a token, or insecure loopback is explicitly allowed.

    `addresses` are what the service binds and calls: with auth.insecure_loopback
    every one of them must be a loopback address.
    """
    if auth.insecure_loopback:
        outside = [a for a in addresses if not is_loopback(host_of(a))]
        if outside:
            raise ConfigError(f"{service}: auth.insecure_loopback is set, but {', '.join(outside)} is not a loopback "
                              f"address (127.0.0.1, ::1, localhost); set {', '.join(setting(r) for r in roles)} instead")
        return
    missing = [r for r in roles if getattr(auth, f"{r}_token") is None]
    if missing:
        raise ConfigError(f"{service}: no {', '.join(setting(r) for r in missing)} set; set it, or set "
                          f"auth.insecure_loopback: true (E3_AUTH__INSECURE_LOOPBACK=true) to run without "
                          f"tokens on loopback only")


def weights_path_problem(weights_path: str, run_dir: str) -> str | None:
    """None if `weights_path` lies inside run_dir/weights (symlinks resolved, `..` refused); else why not.

    A replica loads whatever directory a step report names, so only the
    run's own published versions may be named.
    """
    weights_dir = (Path(run_dir) / "weights").resolve()
    path = Path(weights_path)
    if not path.is_absolute():
        return f"weights_path {weights_path!r} must be an absolute path inside {weights_dir}"
    if ".." in path.parts:
        return f"weights_path {weights_path!r} must not contain '..'"
    resolved = path.resolve()
    if resolved == weights_dir or not resolved.is_relative_to(weights_dir):
        return f"weights_path {weights_path!r} (resolved: {resolved}) is not inside the run's weights directory {weights_dir}"
    return None


class RoleInterceptor(grpc.ServerInterceptor):
    """Lets each Scheduler call through only with its role's token (GRPC_ROLES); refuses every other method."""

    def __init__(self, tokens: RoleTokens) -> None:
        self._tokens = tokens

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method or ""
        name = method[len(GRPC_SERVICE):] if method.startswith(GRPC_SERVICE) else None
        role = GRPC_ROLES.get(name) if name else None
        if role is None:
            refusal = ("permission_denied", f"no role may call {method}")
        else:
            metadata = dict(handler_call_details.invocation_metadata or ())
            refusal = self._tokens.check(role, metadata.get("authorization"), name)
        if refusal is None:
            return continuation(handler_call_details)
        code = grpc.StatusCode.UNAUTHENTICATED if refusal[0] == "unauthenticated" else grpc.StatusCode.PERMISSION_DENIED

        def deny(request, context):
            context.abort(code, refusal[1])

        handler = continuation(handler_call_details)
        if handler is not None and handler.response_streaming:
            return grpc.unary_stream_rpc_method_handler(deny)
        return grpc.unary_unary_rpc_method_handler(deny)


def call_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """Metadata a client attaches to every call."""
    return (("authorization", f"Bearer {token}"),) if token else ()


def http_bearer(token: str | None):
    """The reward service's check: /v1/score is a generation call (None: open, insecure loopback)."""
    return http_role(RoleTokens(generation=token), "generation")


def http_role(tokens: RoleTokens, role: str):
    """A FastAPI dependency that lets a request through only with `role`'s bearer token.

    Declared through fastapi.security.HTTPBearer, so the OpenAPI schema names
    the scheme and clients (and the schema fuzzer) know to send it. A role
    with no token configured is open (insecure loopback, require_tokens).
    """
    scheme = HTTPBearer(auto_error=False, description=f"the {role} token ({ENV[role]})")

    def check(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(scheme)) -> None:
        presented = f"Bearer {credentials.credentials}" if credentials is not None else None
        route = getattr(request.scope.get("route"), "path", request.url.path)
        refusal = tokens.check(role, presented, f"{request.method} {route}")
        if refusal is None:
            return
        if refusal[0] == "unauthenticated":
            raise HTTPException(401, refusal[1], headers={"WWW-Authenticate": "Bearer"})
        raise HTTPException(403, refusal[1])

    return check
