"""TokenVerifier against a Keycloak-like realm on 127.0.0.1 with real RSA keys (no MONAI Label server)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ec
from keycloak_realm import KeycloakRealm, forge_hs256, new_rsa_key, public_pem, unsigned

from vila_m3.security.tokens import RealmUnavailable, TokenError, TokenSettings, TokenVerifier

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def realm() -> Iterator[KeycloakRealm]:
    with KeycloakRealm() as served:
        yield served


def verifier_for(realm: KeycloakRealm, **settings) -> TokenVerifier:
    return TokenVerifier(TokenSettings(realm_uri=realm.url, client_id=realm.client_id, **settings))


def certs_fetches(realm: KeycloakRealm) -> int:
    return sum(path.endswith("/protocol/openid-connect/certs") for path in realm.fetches)


def test_a_valid_token_gives_its_user_and_roles(realm):
    user = verifier_for(realm).verify(realm.token("alice", ["monailabel-user", "monailabel-annotator"]))
    assert user.username == "alice" and user.subject == "sub-alice"
    assert user.email == "alice@hospital.example" and user.name == "Alice"
    assert user.roles == ("monailabel-user", "monailabel-annotator")


def test_a_token_without_kid_is_checked_with_the_realms_public_key(realm):
    verifier = verifier_for(realm)
    assert verifier.verify(realm.sign(realm.claims("bob"), kid=None)).username == "bob"
    with pytest.raises(TokenError, match="Signature"):
        verifier.verify(realm.sign(realm.claims("bob"), kid=None, key=new_rsa_key()))


@pytest.mark.parametrize("case", ["expired", "no exp", "wrong key", "alg none", "alg none no kid", "hs256 pem",
                                  "hs256 pem no kid", "wrong issuer", "no issuer", "wrong audience", "garbage",
                                  "tampered payload", "id token"])
def test_bad_tokens_are_refused(realm, case):
    claims = realm.claims("mallory", ["monailabel-admin"])
    pem = public_pem(realm.keys[realm.active])
    token = {
        "expired": lambda: realm.sign({**claims, "exp": int(time.time()) - 60}),
        "no exp": lambda: realm.sign({k: v for k, v in claims.items() if k != "exp"}),
        "wrong key": lambda: realm.sign(claims, key=new_rsa_key()),
        "alg none": lambda: unsigned(claims, kid=realm.active),
        "alg none no kid": lambda: unsigned(claims),
        "hs256 pem": lambda: forge_hs256(claims, pem, kid=realm.active),
        "hs256 pem no kid": lambda: forge_hs256(claims, pem),
        "wrong issuer": lambda: realm.sign({**claims, "iss": "http://127.0.0.1:1/realms/other"}),
        "no issuer": lambda: realm.sign({k: v for k, v in claims.items() if k != "iss"}),
        "wrong audience": lambda: realm.sign({**claims, "azp": "other-client", "aud": ["account", "other-client"]}),
        "garbage": lambda: "not.a.token",
        "tampered payload": lambda: _tamper(realm.sign(claims)),
        "id token": lambda: realm.sign({**claims, "typ": "ID", "aud": realm.client_id}),
    }[case]()
    with pytest.raises(TokenError) as refused:
        verifier_for(realm).verify(token)
    assert not isinstance(refused.value, RealmUnavailable)
    assert refused.value.reason


def _tamper(token: str) -> str:
    header, payload, signature = token.split(".")
    claims = jwt.decode(token, options={"verify_signature": False})
    claims["preferred_username"] = "admin"
    forged = jwt.encode(claims, "x" * 32, algorithm="HS256").split(".")[1]
    return f"{header}.{forged}.{signature}"


def test_the_client_may_be_the_audience_or_the_authorized_party(realm):
    verifier = verifier_for(realm)
    assert verifier.verify(realm.sign(realm.claims(aud="account"))).username == "alice"  # azp = our client
    assert verifier.verify(realm.sign(realm.claims(azp="slicer", aud=["account", realm.client_id]))).username == "alice"
    with pytest.raises(TokenError, match="not for client"):
        verifier.verify(realm.sign(realm.claims(azp="slicer", aud="account")))


def test_the_issuer_setting_overrides_the_openid_configuration(realm):
    verifier = verifier_for(realm, issuer="https://login.hospital.example/realms/monailabel")
    with pytest.raises(TokenError, match="issuer"):
        verifier.verify(realm.token())
    assert verifier.verify(realm.token(iss="https://login.hospital.example/realms/monailabel")).username == "alice"


def test_an_es256_header_on_an_rsa_key_is_refused(realm):
    token = jwt.encode(realm.claims(), ec.generate_private_key(ec.SECP256R1()), algorithm="ES256",
                       headers={"kid": realm.active})
    with pytest.raises(TokenError, match="does not match|not a EC key"):
        verifier_for(realm).verify(token)


def test_the_encryption_key_never_verifies_a_signature(realm):
    with pytest.raises(TokenError, match="no realm key"):
        verifier_for(realm).verify(realm.sign(realm.claims(), kid="enc-key", key=new_rsa_key()))


def test_a_rotated_key_is_fetched_once_and_unknown_kids_are_rate_limited():
    now = [1000.0]
    with KeycloakRealm() as realm:
        verifier = TokenVerifier(TokenSettings(realm_uri=realm.url, client_id=realm.client_id, jwks_refresh_s=10),
                                 clock=lambda: now[0])
        old = realm.active
        assert verifier.verify(realm.token("alice")).username == "alice"
        assert certs_fetches(realm) == 1

        new = realm.rotate()
        now[0] += 11
        assert verifier.verify(realm.sign(realm.claims("bob"))).username == "bob"  # unknown kid: one refetch
        assert certs_fetches(realm) == 2
        assert verifier.verify(realm.sign(realm.claims("carol"), kid=old)).username == "carol"  # old key still listed
        assert verifier.verify(realm.sign(realm.claims("dave"), kid=new)).username == "dave"
        assert certs_fetches(realm) == 2

        for _ in range(5):  # a flood of made-up kids within the interval fetches nothing
            with pytest.raises(TokenError, match="no realm key"):
                verifier.verify(realm.sign(realm.claims(), kid="made-up", key=new_rsa_key()))
        assert certs_fetches(realm) == 2

        newest = realm.rotate()  # rotated within 10 s of the last fetch: refused until the interval is over
        with pytest.raises(TokenError, match="no realm key"):
            verifier.verify(realm.sign(realm.claims("erin"), kid=newest))
        now[0] += 11
        assert verifier.verify(realm.sign(realm.claims("erin"), kid=newest)).username == "erin"
        assert certs_fetches(realm) == 3


def test_roles_follow_the_claim_path_setting(realm):
    verifier = verifier_for(realm, roles_claim="resource_access#monailabel-app#roles")
    token = realm.token(resource_access={"monailabel-app": {"roles": ["monailabel-reviewer"]}})
    assert verifier.verify(token).roles == ("monailabel-reviewer",)
    assert verifier_for(realm).verify(realm.token(realm_access=None)).roles == ()


def test_an_unreachable_realm_is_a_realm_error_not_a_bad_token(realm):
    verifier = TokenVerifier(TokenSettings(realm_uri="http://127.0.0.1:9/realms/none", client_id="x", timeout_s=2))
    with pytest.raises(RealmUnavailable):
        verifier.verify(realm.token())
