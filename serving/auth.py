"""Optional API-key auth for the ingress: a bearer token from an env var or a secret file.

With a token configured, every route but :data:`PUBLIC_PATHS` needs ``Authorization: Bearer <token>``
(401 + ``WWW-Authenticate: Bearer`` otherwise, ``/docs`` and ``/openapi.json`` included).
"""

from __future__ import annotations

import hmac
import os
import re
from collections.abc import Mapping
from pathlib import Path

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from serving.config import ServingConfig
from stylear_core.config import ConfigError

# Paths answered without the API token: load balancers and orchestrators probe them.
PUBLIC_PATHS = frozenset({"/healthz"})
# RFC 6750 token characters; a short token is guessable.
TOKEN_PATTERN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
MIN_TOKEN_CHARS = 16


def load_api_token(cfg: ServingConfig, environ: Mapping[str, str] = os.environ) -> str | None:
    """The bearer token every request must carry, or None when the service runs without auth.

    Read from ``auth_token_file`` when set (a missing or empty file is an error), else from the
    ``auth_token_env`` variable. Raises :class:`ConfigError` when ``auth_required`` and there is no
    token, or when the token is shorter than 16 characters or not RFC 6750 token characters.
    """
    if cfg.auth_token_file:
        try:
            token = Path(cfg.auth_token_file).read_text().strip()
        except OSError as e:
            raise ConfigError(f"auth_token_file: cannot read {cfg.auth_token_file} ({e.strerror})") from None
        if not token:
            raise ConfigError(f"auth_token_file: {cfg.auth_token_file} is empty")
    else:
        token = environ.get(cfg.auth_token_env, "").strip() if cfg.auth_token_env else ""
    if not token:
        if cfg.auth_required:
            where = (
                f"the {cfg.auth_token_env} environment variable" if cfg.auth_token_env else "auth_token_file"
            )
            raise ConfigError(
                f"auth_required: no API token; set {where} (or auth_token_file) on the cluster, "
                "or auth_required: false to serve without auth"
            )
        return None
    if len(token) < MIN_TOKEN_CHARS or not TOKEN_PATTERN.fullmatch(token):
        raise ConfigError(
            f"API token: need at least {MIN_TOKEN_CHARS} characters of A-Z a-z 0-9 . _ ~ + / - (then = padding)"
        )
    return token


class BearerTokenAuth:
    """ASGI middleware: every HTTP request but ``public_paths`` needs ``Authorization: Bearer <token>``.

    Anything else gets a 401 ``{"error", "field": "authorization"}`` with ``WWW-Authenticate: Bearer``
    before the body is read. Tokens are compared in constant time.
    """

    def __init__(self, app: ASGIApp, token: str, public_paths: frozenset[str] = PUBLIC_PATHS) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.public_paths = public_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        root = scope.get("root_path", "")
        if root and path.startswith(root):
            path = path[len(root) :] or "/"
        if path in self.public_paths:
            await self.app(scope, receive, send)
            return
        given = [v for k, v in scope["headers"] if k == b"authorization"]
        # Same-length compare of the whole header value; the scheme is case-insensitive (RFC 7235).
        value = given[0] if len(given) == 1 else b""
        if value[:7].lower() == b"bearer ":
            value = b"Bearer " + value[7:]
        if hmac.compare_digest(value, self.expected):
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        challenge = 'Bearer error="invalid_token"' if given else "Bearer"
        message = "invalid API token" if given else "missing API token: send Authorization: Bearer <token>"
        response = JSONResponse(
            {"error": message, "field": "authorization"},
            status_code=401,
            headers={"WWW-Authenticate": challenge},
        )
        await response(scope, receive, send)
