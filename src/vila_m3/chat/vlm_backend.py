"""Which VLM answers a server's chats: a staged VILA-M3 checkpoint, or a remote OpenAI-compatible
server (``vlm_url`` + ``vlm_model``; the key in ``VILA_M3_REMOTE_API_KEY``; ``vlm_tools on``: the
remote model calls the experts with OpenAI tool calls, ``vlm_tool_images off``: without overlay images)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vila_m3.models.manifest import ModelManifest


def remote_settings(conf: Mapping[str, str]) -> dict[str, Any] | None:
    """The remote backend's settings from app settings, or None when no ``vlm_url`` is set."""
    url = (conf.get("vlm_url") or "").strip()
    tools = _switch(conf, "vlm_tools")
    if not url:
        if tools:
            raise ValueError("--conf vlm_tools on needs --conf vlm_url (a remote model served with tool calling; "
                             "VILA-M3 itself calls experts with triggers in its text)")
        return None
    model = (conf.get("vlm_model") or "").strip()
    if not model:
        raise ValueError("--conf vlm_url needs --conf vlm_model (the model name the remote server serves)")
    settings: dict[str, Any] = {"base_url": url, "model": model}
    if conf.get("vlm_timeout_s"):
        settings["timeout_s"] = float(conf["vlm_timeout_s"])
    if tools:
        settings["tool_calling"] = True
        settings["tool_images"] = _switch(conf, "vlm_tool_images", default=True)
    return settings


def _switch(conf: Mapping[str, str], key: str, default: bool = False) -> bool:
    """An on/off setting (``on``/``off``, ``true``/``false``, ``yes``/``no``, ``1``/``0``); ValueError names it."""
    value = str(conf.get(key) or "").strip().lower()
    if not value:
        return default
    if value in ("on", "true", "yes", "1"):
        return True
    if value in ("off", "false", "no", "0"):
        return False
    raise ValueError(f"--conf {key} must be on or off, got {value!r}")


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
