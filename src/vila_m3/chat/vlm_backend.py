"""Which VLM answers a server's chats: a staged VILA-M3 checkpoint, or a remote OpenAI-compatible
server (``vlm_url`` + ``vlm_model``; the key in ``VILA_M3_REMOTE_API_KEY``)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vila_m3.models.manifest import ModelManifest


def remote_settings(conf: Mapping[str, str]) -> dict[str, Any] | None:
    """The remote backend's settings from app settings, or None when no ``vlm_url`` is set."""
    url = (conf.get("vlm_url") or "").strip()
    if not url:
        return None
    model = (conf.get("vlm_model") or "").strip()
    if not model:
        raise ValueError("--conf vlm_url needs --conf vlm_model (the model name the remote server serves)")
    settings: dict[str, Any] = {"base_url": url, "model": model}
    if conf.get("vlm_timeout_s"):
        settings["timeout_s"] = float(conf["vlm_timeout_s"])
    return settings


def open_vlm(conf: Mapping[str, str], models_dir: Path, vlm_id: str, manifest: ModelManifest | None = None) -> Any:
    """The VLM for ``conf``: RemoteVLM when ``vlm_url`` is set, else the staged checkpoint ``vlm_id``."""
    settings = remote_settings(conf)
    if settings is not None:
        from vila_m3.vlm.remote import RemoteVLM

        return RemoteVLM.from_config(settings)
    from vila_m3.vlm.generation import VilaChat

    return VilaChat.from_pretrained(served_checkpoint(models_dir, vlm_id, manifest))


def served_checkpoint(models_dir: Path, vlm_id: str, manifest: ModelManifest | None = None) -> Path:
    """The checkpoint the chat serves: the current fine-tuned version of ``vlm_id``, else its staged weights."""
    from vila_m3.training.versions import ModelVersions

    manifest = manifest or ModelManifest.load()
    return ModelVersions(models_dir, vlm_id).checkpoint() or manifest[vlm_id].location(models_dir)
