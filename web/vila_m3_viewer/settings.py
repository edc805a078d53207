"""The web viewer's settings: window/level presets and display defaults (``configs/web_viewer.yaml``)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, Field

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO / "configs" / "web_viewer.yaml"


class WindowLevelPreset(BaseModel):
    """A named window/level (intensity units, e.g. HU); both None means the volume's automatic range."""

    name: str
    window: float | None = Field(default=None, gt=0)
    level: float | None = None


class ViewerSettings(BaseModel):
    window_level_presets: list[WindowLevelPreset]
    segment_opacity: float = Field(default=0.5, ge=0.0, le=1.0)
    poll_interval_s: float = Field(default=0.1, gt=0.0, le=5.0)
    reconnect_s: float = Field(default=5.0, gt=0.0)
    max_upload_mb: float = Field(default=1024.0, gt=0.0)  # the largest study the page's picker sends

    def preset(self, name: str) -> WindowLevelPreset:
        for preset in self.window_level_presets:
            if preset.name == name:
                return preset
        raise ValueError(f"no window/level preset named '{name}'")


def load_settings(path: Path | str | None = None) -> ViewerSettings:
    """The settings from ``path`` (default: configs/web_viewer.yaml), validated."""
    with open(path or DEFAULT_CONFIG, encoding="utf-8") as handle:
        return ViewerSettings.model_validate(yaml.safe_load(handle) or {})
