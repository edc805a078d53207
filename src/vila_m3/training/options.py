"""Fine-tuning options: defaults from ``configs/training.yaml``, overridden per run."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from vila_m3.configs import load_config

__all__ = ["PARTS", "LoraOptions", "TrainingOptions", "TrainingOptionsError"]

PARTS = ("llm", "projector", "vision")
PRECISIONS = ("auto", "bf16", "fp32")
DEVICES = ("auto", "cpu")


class TrainingOptionsError(ValueError):
    """An option has an invalid value; the message names it."""


@dataclass
class LoraOptions:
    """LoRA adapters on the LLM (peft): rank ``r``, scaling ``alpha``, ``dropout``."""

    enabled: bool = False
    r: int = 64
    alpha: int = 16
    dropout: float = 0.05


@dataclass
class TrainingOptions:
    """Everything a fine-tuning run is configured with (see ``configs/training.yaml``)."""

    parts: tuple[str, ...] = PARTS
    learning_rate: float = 2e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 4
    gradient_accumulation: int = 4
    precision: str = "auto"
    device: str = "auto"
    gradient_checkpointing: bool = True
    lora: LoraOptions = field(default_factory=LoraOptions)
    eval_steps: int = 0
    save_steps: int = 0
    save_total_limit: int = 2
    logging_steps: int = 10
    seed: int = 0
    max_length: int | None = None

    @classmethod
    def from_config(cls, overrides: Mapping[str, Any] | None = None,
                    config: Mapping[str, Any] | None = None) -> TrainingOptions:
        """``configs/training.yaml`` (or ``config``), then ``overrides`` (``None`` values are ignored).

        Raises:
            TrainingOptionsError: an unknown key or an invalid value.
        """
        merged: dict[str, Any] = dict(config if config is not None else load_config("training.yaml"))
        lora = dict(merged.pop("lora", None) or {})
        for key, value in (overrides or {}).items():
            if value is None:
                continue
            if key.startswith("lora_"):
                lora[key.removeprefix("lora_")] = value
            elif key == "lora" and isinstance(value, Mapping):
                lora.update(value)
            else:
                merged[key] = value
        names = {f.name for f in dataclasses.fields(cls)} - {"lora"}
        unknown = sorted(set(merged) - names)
        if unknown:
            raise TrainingOptionsError(f"unknown training option(s): {', '.join(unknown)}; known: {', '.join(sorted(names))}")
        lora_names = {f.name for f in dataclasses.fields(LoraOptions)}
        if set(lora) - lora_names:
            raise TrainingOptionsError(f"unknown LoRA option(s): {', '.join(sorted(set(lora) - lora_names))}")
        if isinstance(merged.get("parts"), str):
            merged["parts"] = [p.strip() for p in merged["parts"].split(",") if p.strip()]
        options = cls(**{**merged, "parts": tuple(merged.get("parts", PARTS)), "lora": LoraOptions(**lora)})
        options.check()
        return options

    def check(self) -> None:
        """Raise TrainingOptionsError on the first invalid value."""
        bad = [p for p in self.parts if p not in PARTS]
        if bad or not self.parts:
            raise TrainingOptionsError(f"parts must be a non-empty subset of {', '.join(PARTS)}; got {list(self.parts)}")
        if self.lora.enabled and "llm" not in self.parts:
            raise TrainingOptionsError("LoRA adapts the LLM: add 'llm' to parts or turn LoRA off")
        if self.precision not in PRECISIONS:
            raise TrainingOptionsError(f"precision must be one of {', '.join(PRECISIONS)}; got {self.precision!r}")
        if self.device not in DEVICES:
            raise TrainingOptionsError(f"device must be one of {', '.join(DEVICES)}; got {self.device!r}")
        if self.device == "cpu" and self.precision == "bf16":
            raise TrainingOptionsError("precision bf16 needs a GPU; with device cpu use precision auto or fp32")
        positive = {"learning_rate": self.learning_rate, "batch_size": self.batch_size,
                    "gradient_accumulation": self.gradient_accumulation, "logging_steps": self.logging_steps}
        for name, value in positive.items():
            if not value > 0:
                raise TrainingOptionsError(f"{name} must be > 0; got {value}")
        if not 0 <= self.warmup_ratio < 1:
            raise TrainingOptionsError(f"warmup_ratio must be in [0, 1); got {self.warmup_ratio}")
        if self.epochs <= 0 and self.max_steps <= 0:
            raise TrainingOptionsError("give epochs > 0 or max_steps > 0")
        if self.eval_steps < -1:
            raise TrainingOptionsError(f"eval_steps must be -1 (only before and after), 0 (each epoch) or > 0; "
                                       f"got {self.eval_steps}")
        for name in ("max_steps", "save_steps", "weight_decay"):
            if getattr(self, name) < 0:
                raise TrainingOptionsError(f"{name} must be >= 0; got {getattr(self, name)}")
        if self.lora.enabled and self.lora.r < 1:
            raise TrainingOptionsError(f"lora r must be >= 1; got {self.lora.r}")

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (for the training record)."""
        data = dataclasses.asdict(self)
        data["parts"] = list(self.parts)
        return data
