"""A FastAPI dependency that refuses query parameters a route does not declare.

FastAPI ignores unknown query parameters, so `?limt=5` would silently
return the default 10; answering 422 with the unknown names says what is
wrong, in the same body shape as every other validation error.
"""

from __future__ import annotations

from fastapi import Request
from fastapi.exceptions import RequestValidationError


def reject_unknown_query(request: Request) -> None:
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    if dependant is None:
        return
    known = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:  # parameters declared by the route's dependencies count too
        known |= {param.alias for param in sub.query_params}
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        takes = ", ".join(sorted(known)) or "no query parameters"
        raise RequestValidationError([
            {"type": "extra_forbidden", "loc": ("query", name), "msg": f"unknown query parameter; this endpoint takes {takes}",
             "input": request.query_params.get(name)}
            for name in unknown
        ])
