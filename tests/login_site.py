"""A real VILA-M3 server with login on (the test realm of tests/keycloak_realm.py) and an audit log, as the
hardening tests use it: the site, a request with a bearer token, and the audit lines written so far."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import requests
from keycloak_realm import KeycloakRealm
from server_harness import start_monailabel


@contextmanager
def login_site(root: Path, sample_data: Path, vlm_url: str, conf: dict[str, str] | None = None) -> Iterator[dict]:
    """``{"server", "realm", "audit", "sessions", "image"}``: a server on a copy of the sample studies whose chat
    VLM is at ``vlm_url`` (the scripted one), its login checking the realm's tokens, its audit log at ``audit``;
    ``conf`` adds settings."""
    studies = root / "studies"
    shutil.copytree(sample_data / "studies", studies)
    audit = root / "audit.jsonl"
    settings = {"models": "vila_m3", "vlm_url": vlm_url, "vlm_model": "fake-vila-m3", "chats_dir": str(root / "chats"),
                "audit_log": str(audit), **(conf or {})}
    with KeycloakRealm() as realm:
        server = start_monailabel(root / "run", studies, conf=settings, env=realm.server_env())
        try:
            yield {"server": server, "realm": realm, "audit": audit, "sessions": root / "run" / "sessions",
                   "image": studies / "ct_abdomen.nii.gz"}
        finally:
            server.stop()


def call(site: dict, method: str, path: str, token: str | None = None, **kwargs) -> requests.Response:
    """``method path`` on the site's server, with ``token`` as the bearer token when given."""
    headers = {**({"Authorization": f"Bearer {token}"} if token else {}), **kwargs.pop("headers", {})}
    return requests.request(method, f"{site['server'].url}{path}", headers=headers, timeout=kwargs.pop("timeout", 120),
                            **kwargs)


def audit_lines(site: dict) -> list[dict]:
    """The site's audit log, one dict a line (empty before the first line)."""
    path = site["audit"]
    return [json.loads(text) for text in path.read_text(encoding="utf-8").splitlines()] if path.exists() else []
