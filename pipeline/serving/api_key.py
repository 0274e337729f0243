"""The service's optional API key: ``PNEUMO_API_KEY``, or ``PNEUMO_API_KEY_FILE`` naming a file that holds it
(a Docker or Kubernetes secret). Clients send ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``; the
comparison takes constant time, and the key is never printed, logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from pipeline.core.errors import ConfigError

ENV, FILE_ENV = "PNEUMO_API_KEY", "PNEUMO_API_KEY_FILE"
MIN_LENGTH = 16
CHALLENGE = {"WWW-Authenticate": 'Bearer realm="pneumo"', "Connection": "close"}

BEARER = HTTPBearer(auto_error=False, scheme_name="bearer", description="Authorization: Bearer <API key>")
HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, scheme_name="x_api_key", description="the API key")


def from_environment(environ: Mapping[str, str]) -> str | None:
    """The configured key, or None (an open service); a misconfigured key stops the service with one line."""
    value, path = environ.get(ENV), environ.get(FILE_ENV)
    if value is not None and path is not None:
        raise ConfigError(f"set {ENV} or {FILE_ENV}, not both")
    if path is not None:
        try:
            value = Path(path).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                f"{FILE_ENV}={path}: cannot read the API key ({exc.strerror or type(exc).__name__})"
            ) from None
        where = f"{FILE_ENV}={path}"
    else:
        where = ENV
    if value is None:
        return None
    if len(value) < MIN_LENGTH:
        raise ConfigError(
            f"{where}: the API key has {len(value)} characters, use at least {MIN_LENGTH} "
            "(python -c 'import secrets; print(secrets.token_urlsafe(32))')"
        )
    if not (value.isascii() and value.isprintable()) or " " in value:
        raise ConfigError(f"{where}: the API key must be printable ASCII without spaces (it travels in a header)")
    return value


def requirement(key: str) -> Callable[..., Awaitable[None]]:
    """A FastAPI dependency: 401 with a Bearer challenge unless the request carries `key`."""
    expected = key.encode()

    async def check(
        bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
        header: Annotated[str | None, Depends(HEADER)],
    ) -> None:
        given = [v.encode() for v in (bearer.credentials if bearer else None, header) if v]
        if not any([hmac.compare_digest(v, expected) for v in given]):  # each compared: constant time
            raise HTTPException(
                401, "missing or wrong API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'", CHALLENGE
            )

    return check
