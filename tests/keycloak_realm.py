"""A Keycloak realm on 127.0.0.1 for the login tests: real RSA keys, real RS256 tokens.

Serves, like Keycloak does under ``/realms/<name>``:

- ``GET  /realms/<name>``: ``{"realm", "public_key" (base64 DER of the active key), ...}``;
- ``GET  /realms/<name>/.well-known/openid-configuration``: ``issuer``, ``jwks_uri``, ``token_endpoint``;
- ``GET  /realms/<name>/protocol/openid-connect/certs``: the JWKS (every signing key, plus an
  encryption key that must never verify anything);
- ``POST /realms/<name>/protocol/openid-connect/token``: the password grant for the realm's users.

Keys are made with ``cryptography`` (RSA 2048) and tokens signed with PyJWT; :meth:`KeycloakRealm.rotate`
adds a new active key the way a realm administrator rotates keys.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROLES = {
    "admin": "monailabel-admin",
    "reviewer": "monailabel-reviewer",
    "annotator": "monailabel-annotator",
    "user": "monailabel-user",
}


def new_rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    """The public half of ``key`` as PEM (what an attacker would use as an HS256 secret)."""
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@dataclass
class RealmUser:
    password: str
    roles: list[str]
    email: str | None = None
    name: str | None = None


@dataclass
class KeycloakRealm:
    """The realm; use as a context manager (the server runs in a thread).

    Attributes:
        name: the realm's name (``/realms/<name>``).
        client_id: the client the tokens are for (``azp``).
        keys: signing keys by kid; ``active`` is the kid that signs new tokens and is the ``public_key``.
        users: the password grant's users.
        fetches: paths served, in order (to count JWKS fetches).
    """

    name: str = "monailabel"
    client_id: str = "monailabel-app"
    keys: dict[str, rsa.RSAPrivateKey] = field(default_factory=dict)
    active: str = ""
    users: dict[str, RealmUser] = field(default_factory=dict)
    fetches: list[str] = field(default_factory=list)
    token_lifetime_s: int = 300

    def __post_init__(self) -> None:
        if not self.keys:
            self.rotate()
        self._encryption_key = new_rsa_key()
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.realm = self  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)

    # --- addresses -------------------------------------------------------------------------------

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    @property
    def url(self) -> str:
        """The realm URL (``MONAI_LABEL_AUTH_REALM_URI``); also the tokens' issuer."""
        return f"{self.base}/realms/{self.name}"

    def server_env(self, timeout_s: int = 5) -> dict[str, str]:
        """The environment of a MONAI Label server whose login checks this realm's tokens."""
        return {"MONAI_LABEL_AUTH_ENABLE": "true", "MONAI_LABEL_AUTH_REALM_URI": self.url,
                "MONAI_LABEL_AUTH_CLIENT_ID": self.client_id, "MONAI_LABEL_AUTH_TIMEOUT": str(timeout_s)}

    # --- keys and tokens -------------------------------------------------------------------------

    def rotate(self) -> str:
        """A new RSA key becomes the active one (the old ones stay in the JWKS); returns its kid."""
        kid = uuid.uuid4().hex[:16]
        self.keys[kid] = new_rsa_key()
        self.active = kid
        return kid

    def claims(self, username: str = "alice", roles: list[str] | None = None, **overrides: Any) -> dict[str, Any]:
        """The claims of a Keycloak access token for ``username`` (``overrides`` replace or add claims)."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "exp": now + self.token_lifetime_s, "iat": now, "jti": uuid.uuid4().hex, "iss": self.url,
            "aud": "account", "sub": f"sub-{username}", "typ": "Bearer", "azp": self.client_id,
            "realm_access": {"roles": list(roles if roles is not None else [ROLES["user"]])},
            "preferred_username": username, "email": f"{username}@hospital.example", "name": username.title(),
        }
        claims.update(overrides)
        return {key: value for key, value in claims.items() if value is not None}

    def sign(self, claims: dict[str, Any], kid: str | None = "", key: Any = None, algorithm: str = "RS256",
             headers: dict[str, Any] | None = None) -> str:
        """A token with ``claims``, signed by the active key (``kid=""``), the key ``kid``, or ``key`` itself;
        ``kid=None`` leaves the kid out of the header."""
        use_kid = self.active if kid == "" else kid
        signing_key = key if key is not None else self.keys[use_kid or self.active]
        header = dict(headers or {})
        if use_kid is not None:
            header["kid"] = use_kid
        return jwt.encode(claims, signing_key, algorithm=algorithm, headers=header)

    def token(self, username: str = "alice", roles: list[str] | None = None, **overrides: Any) -> str:
        """A valid access token (active key, RS256)."""
        return self.sign(self.claims(username, roles, **overrides))

    def add_user(self, username: str, password: str, roles: list[str]) -> None:
        self.users[username] = RealmUser(password, roles)

    # --- documents -------------------------------------------------------------------------------

    def document(self, path: str) -> dict[str, Any] | None:
        realm = f"/realms/{self.name}"
        if path == realm:
            der = self.keys[self.active].public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
            return {"realm": self.name, "public_key": base64.b64encode(der).decode(),
                    "token-service": f"{self.url}/protocol/openid-connect", "account-service": f"{self.url}/account",
                    "tokens-not-before": 0}
        if path == f"{realm}/.well-known/openid-configuration":
            return {"issuer": self.url, "jwks_uri": f"{self.url}/protocol/openid-connect/certs",
                    "token_endpoint": f"{self.url}/protocol/openid-connect/token",
                    "authorization_endpoint": f"{self.url}/protocol/openid-connect/auth",
                    "id_token_signing_alg_values_supported": ["RS256", "PS256", "ES256"]}
        if path == f"{realm}/protocol/openid-connect/certs":
            keys = [{**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}
                    for kid, key in self.keys.items()]
            keys.append({**RSAAlgorithm.to_jwk(self._encryption_key.public_key(), as_dict=True),
                         "kid": "enc-key", "alg": "RSA-OAEP", "use": "enc"})
            return {"keys": keys}
        return None

    def password_grant(self, form: dict[str, str]) -> tuple[int, dict[str, Any]]:
        user = self.users.get(form.get("username", ""))
        if form.get("grant_type") != "password" or form.get("client_id") != self.client_id:
            return 400, {"error": "unauthorized_client"}
        if user is None or user.password != form.get("password"):
            return 401, {"error": "invalid_grant", "error_description": "Invalid user credentials"}
        token = self.token(form["username"], user.roles)
        return 200, {"access_token": token, "token_type": "Bearer", "expires_in": self.token_lifetime_s,
                     "refresh_expires_in": 1800, "scope": "profile email"}

    # --- server ----------------------------------------------------------------------------------

    def __enter__(self) -> KeycloakRealm:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class _Handler(BaseHTTPRequestHandler):
    server: ThreadingHTTPServer

    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    @property
    def realm(self) -> KeycloakRealm:
        return self.server.realm  # type: ignore[attr-defined]

    def do_GET(self) -> None:
        self.realm.fetches.append(self.path)
        document = self.realm.document(self.path.split("?")[0])
        self._send(200 if document is not None else 404, document or {"error": "not found"})

    def do_POST(self) -> None:
        self.realm.fetches.append(self.path)
        if self.path != f"/realms/{self.realm.name}/protocol/openid-connect/token":
            self._send(404, {"error": "not found"})
            return
        length = int(self.headers.get("Content-Length") or 0)
        form = {key: values[0] for key, values in parse_qs(self.rfile.read(length).decode()).items()}
        self._send(*self.realm.password_grant(form))

    def _send(self, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


def forge_hs256(claims: dict[str, Any], secret: bytes, kid: str | None = None) -> str:
    """An HS256 token whose HMAC secret is ``secret`` (e.g. the realm's public key PEM), built by hand:
    PyJWT itself refuses to use an asymmetric key as an HMAC secret."""
    import hashlib
    import hmac

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    header = {"alg": "HS256", "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    signature = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(signature)}"


def unsigned(claims: dict[str, Any], kid: str | None = None) -> str:
    """An ``alg: none`` token."""
    return jwt.encode(claims, None, algorithm="none", headers={"kid": kid} if kid else None)
