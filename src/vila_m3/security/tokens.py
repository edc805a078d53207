"""Verify the bearer tokens a Keycloak realm (or any OpenID Connect provider laid out like one) issues.

The realm URL is Keycloak's ``https://<host>/realms/<realm>``; three documents under it are read:

- ``<realm>``: JSON whose ``public_key`` is the realm's signing key (base64 DER, no PEM armour);
- ``<realm>/.well-known/openid-configuration``: ``issuer`` and ``jwks_uri``;
- ``<realm>/protocol/openid-connect/certs`` (or the configuration's ``jwks_uri``): the JWKS.

A token is accepted only when all of these hold:

- its ``alg`` is one of :data:`ALLOWED_ALGORITHMS` (asymmetric only: ``none`` and ``HS*`` are refused
  before any key is looked at, which closes the algorithm-confusion hole of CVE-2022-29217);
- it is signed by the JWKS key its ``kid`` names (an unknown ``kid`` refetches the JWKS once, at most
  every ``jwks_refresh_s`` seconds, so a rotated realm key is picked up), or by the realm's
  ``public_key`` when the token carries no ``kid``; the key's type must fit the algorithm;
- ``exp`` is present and in the future (``leeway_s`` seconds of clock skew allowed);
- ``iss`` equals the issuer (the setting, else the openid-configuration's);
- it is an access token: a ``typ`` claim, where present, is ``Bearer`` (Keycloak's ID tokens, ``typ: ID``,
  are signed by the same key and name our client as audience, but prove nothing to a server);
- the client id is the audience: Keycloak puts the client a token was issued *for* in ``azp`` and the
  clients it may be *sent to* in ``aud`` (often ``account`` only, unless an audience mapper adds ours);
  either naming our client is accepted.

Pure Python over PyJWT and ``cryptography``: no web framework; documents are fetched with urllib.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives.serialization import load_der_public_key, load_pem_public_key

logger = logging.getLogger(__name__)

ALLOWED_ALGORITHMS: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "ES256")
_KEY_TYPE = {"RS256": "RSA", "RS384": "RSA", "RS512": "RSA", "PS256": "RSA", "ES256": "EC"}

Fetch = Callable[[str, float], Any]


class TokenError(Exception):
    """A token that is refused; ``reason`` says why (for the log, never for the client)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class RealmUnavailable(TokenError):
    """The realm's keys or configuration could not be read (the login service is down or misconfigured)."""


@dataclass(frozen=True)
class TokenUser:
    """Who a verified token speaks for.

    Attributes:
        subject: the token's ``sub`` (Keycloak's stable user id), or the username when absent.
        username: the username claim (``preferred_username`` by default), or the subject when absent.
        email, name: as the token says, if it does.
        roles: the roles found at the roles claim path.
    """

    subject: str
    username: str
    email: str | None
    name: str | None
    roles: tuple[str, ...]


@dataclass(frozen=True)
class _Jwk:
    """One JWKS entry: its JSON and the public key it holds."""

    data: dict[str, Any]
    key: Any


@dataclass(frozen=True)
class TokenSettings:
    """What a token must match and where its claims are.

    Attributes:
        realm_uri: the realm URL, e.g. ``https://keycloak.example.org/realms/monailabel``.
        client_id: our client; must be in ``aud`` or be ``azp``.
        issuer: the expected ``iss``; empty = the openid-configuration's ``issuer``.
        roles_claim: the path of the role list, ``#``-separated (``realm_access#roles``).
        username_claim, email_claim, name_claim: the claims naming the user.
        timeout_s: limit for each fetch from the realm (seconds).
        leeway_s: clock skew allowed for ``exp``/``nbf``/``iat`` (seconds).
        jwks_refresh_s: least time between two JWKS fetches caused by an unknown ``kid`` (seconds).
    """

    realm_uri: str
    client_id: str
    issuer: str = ""
    roles_claim: str = "realm_access#roles"
    username_claim: str = "preferred_username"
    email_claim: str = "email"
    name_claim: str = "name"
    timeout_s: float = 10.0
    leeway_s: float = 10.0
    jwks_refresh_s: float = 10.0


def fetch_json(url: str, timeout_s: float) -> Any:
    """GET ``url`` and parse its JSON body; any failure is :class:`RealmUnavailable`."""
    if not url.lower().startswith(("http://", "https://")):
        raise RealmUnavailable(f"realm URL {url!r} is not http(s)")
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:  # noqa: S310 - scheme checked above
            return json.loads(response.read().decode("utf-8"))
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise RealmUnavailable(f"cannot read {url}: {err}") from None


def claim_at(claims: dict[str, Any], path: str) -> Any:
    """The value at a ``#``-separated claim path (``realm_access#roles``), or None."""
    value: Any = claims
    for part in path.split("#"):
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    return value


class TokenVerifier:
    """Verifies tokens of one realm; thread-safe; realm documents are fetched lazily and cached.

    Args:
        settings: the realm, client and claim settings.
        fetch: ``fetch(url, timeout_s) -> parsed JSON`` (default: :func:`fetch_json`).
        clock: monotonic seconds, for the JWKS refetch limit.
    """

    def __init__(self, settings: TokenSettings, fetch: Fetch = fetch_json,
                 clock: Callable[[], float] = time.monotonic):
        self.settings = settings
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._configuration: dict[str, Any] | None = None
        self._realm_key: Any = None
        self._jwks: dict[str, _Jwk] | None = None
        self._jwks_fetched_at = float("-inf")

    @property
    def realm_uri(self) -> str:
        return self.settings.realm_uri.rstrip("/")

    # --- realm documents -------------------------------------------------------------------------

    def configuration(self) -> dict[str, Any]:
        """The realm's openid-configuration (cached once read)."""
        with self._lock:
            if self._configuration is None:
                data = self._fetch(f"{self.realm_uri}/.well-known/openid-configuration", self.settings.timeout_s)
                if not isinstance(data, dict):
                    raise RealmUnavailable("the openid-configuration is not a JSON object")
                self._configuration = data
            return self._configuration

    def issuer(self) -> str:
        """The ``iss`` tokens must carry."""
        issuer = self.settings.issuer or self.configuration().get("issuer")
        if not isinstance(issuer, str) or not issuer:
            raise RealmUnavailable("no issuer: the openid-configuration names none and none is set")
        return issuer

    def realm_key(self) -> Any:
        """The realm's ``public_key`` (for tokens without ``kid``)."""
        with self._lock:
            if self._realm_key is None:
                data = self._fetch(self.realm_uri, self.settings.timeout_s)
                encoded = data.get("public_key") if isinstance(data, dict) else None
                if not isinstance(encoded, str) or not encoded:
                    raise RealmUnavailable("the realm document has no public_key")
                try:
                    if "BEGIN PUBLIC KEY" in encoded:
                        self._realm_key = load_pem_public_key(encoded.encode())
                    else:
                        self._realm_key = load_der_public_key(base64.b64decode(encoded))
                except ValueError as err:
                    raise RealmUnavailable(f"the realm's public_key cannot be read: {err}") from None
            return self._realm_key

    def _jwks_uri(self) -> str:
        uri = self.configuration().get("jwks_uri")
        return uri if isinstance(uri, str) and uri else f"{self.realm_uri}/protocol/openid-connect/certs"

    def signing_key(self, kid: str) -> _Jwk:
        """The JWKS key named ``kid``; an unknown one refetches the JWKS (rate-limited)."""
        uri = self._jwks_uri()  # outside the lock: configuration() takes it
        with self._lock:
            if self._jwks is None or (kid not in self._jwks
                                      and self._clock() - self._jwks_fetched_at >= self.settings.jwks_refresh_s):
                self._jwks_fetched_at = self._clock()
                self._jwks = self._load_jwks_locked(uri)
            found = self._jwks.get(kid)
        if found is None:
            raise TokenError(f"no realm key has kid {kid!r}")
        return found

    def _load_jwks_locked(self, uri: str) -> dict[str, _Jwk]:
        """The JWKS's signing keys by kid (the lock is held)."""
        data = self._fetch(uri, self.settings.timeout_s)
        keys: dict[str, _Jwk] = {}
        for item in data.get("keys", []) if isinstance(data, dict) else []:
            if not isinstance(item, dict) or item.get("use", "sig") != "sig" or not item.get("kid"):
                continue  # encryption keys and unnamed keys never verify a signature
            try:
                keys[str(item["kid"])] = _Jwk(item, jwt.PyJWK(item).key)
            except (jwt.PyJWTError, ValueError, TypeError) as err:
                logger.info("JWKS key %r skipped: %s", item.get("kid"), err)
        return keys

    # --- verification ----------------------------------------------------------------------------

    def verify(self, token: str) -> TokenUser:
        """The user of a valid token; raises :class:`TokenError` (or :class:`RealmUnavailable`) otherwise."""
        if not isinstance(token, str) or not token:
            raise TokenError("no token")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as err:
            raise TokenError(f"malformed token: {err}") from None
        algorithm = header.get("alg")
        if algorithm not in ALLOWED_ALGORITHMS:
            raise TokenError(f"algorithm {algorithm!r} is not allowed (only {', '.join(ALLOWED_ALGORITHMS)})")
        kid = header.get("kid")
        if kid is not None:
            jwk = self.signing_key(str(kid))
            declared = jwk.data.get("alg")
            if declared and declared != algorithm:
                raise TokenError(f"token algorithm {algorithm} does not match key {kid!r} ({declared})")
            if jwk.data.get("kty") != _KEY_TYPE[algorithm]:
                raise TokenError(f"key {kid!r} is not a {_KEY_TYPE[algorithm]} key, as {algorithm} needs")
            key = jwk.key
        else:
            key = self.realm_key()
            if _KEY_TYPE[algorithm] != "RSA":
                raise TokenError(f"a token without kid must be RSA-signed (realm public_key), not {algorithm}")
        issuer = self.issuer()
        try:
            claims = jwt.decode(
                token, key, algorithms=[algorithm], issuer=issuer, leeway=self.settings.leeway_s,
                options={"require": ["exp", "iss"], "verify_aud": False},
            )
        except (jwt.PyJWTError, TypeError, ValueError) as err:
            raise TokenError(f"{type(err).__name__}: {err}") from None
        kind = claims.get("typ")
        if kind is not None and str(kind).lower() != "bearer":
            raise TokenError(f"a {kind!r} token is not an access token")  # Keycloak's ID tokens carry typ "ID"
        self._check_audience(claims)
        return self._user(claims)

    def _check_audience(self, claims: dict[str, Any]) -> None:
        client = self.settings.client_id
        audience = claims.get("aud")
        audiences = [audience] if isinstance(audience, str) else audience if isinstance(audience, list) else []
        if client in audiences or claims.get("azp") == client:
            return
        raise TokenError(f"token is not for client {client!r} (aud={audience!r}, azp={claims.get('azp')!r})")

    def _user(self, claims: dict[str, Any]) -> TokenUser:
        subject = claims.get("sub")
        username = claim_at(claims, self.settings.username_claim)
        subject = subject if isinstance(subject, str) and subject else None
        username = username if isinstance(username, str) and username else None
        if subject is None and username is None:
            raise TokenError("token names no user (no sub, no username claim)")
        roles = claim_at(claims, self.settings.roles_claim)
        roles = tuple(role for role in roles if isinstance(role, str)) if isinstance(roles, list) else ()
        email = claim_at(claims, self.settings.email_claim)
        name = claim_at(claims, self.settings.name_claim)
        return TokenUser(
            subject=subject or username or "", username=username or subject or "",
            email=email if isinstance(email, str) else None, name=name if isinstance(name, str) else None,
            roles=roles,
        )
