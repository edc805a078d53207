"""The server's infer tasks (``configs/app.yaml``): which exist, which were asked for, and whether
each can run with the weights staged under the models directory.

This is what the app registers and what ``vila-m3 serve`` reports before the server starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vila_m3.configs import load_config
from vila_m3.models.manifest import ModelManifest

ALL_TASKS = "all"


class TaskSelectionError(ValueError):
    """The ``models`` setting names a task that does not exist, or a VLM the manifest lacks."""


@dataclass(frozen=True)
class TaskStatus:
    """One infer task and whether it can be served.

    ``missing`` lists the required weight files that are absent; ``reason`` is a one-line
    explanation when the task cannot run (None when it can).
    """

    name: str
    description: str
    model_ids: tuple[str, ...]
    missing: tuple[Path, ...]
    reason: str | None
    stand_in: bool = False
    stand_in_notes: tuple[str, ...] = ()

    @property
    def available(self) -> bool:
        return self.reason is None


def task_catalogue(config: dict | None = None) -> dict[str, dict]:
    """Every task of ``configs/app.yaml`` by name, in the file's order."""
    config = config if config is not None else load_config("app.yaml")
    return dict(config["tasks"])


def select_tasks(
    models: str | None, catalogue: dict[str, dict] | None = None, setting: str = "--conf models"
) -> list[str]:
    """The task names chosen by the ``models`` setting: ``all`` (or empty) or a comma-separated list.

    Raises:
        TaskSelectionError: a name is not a task; the message lists the valid ones.
    """
    catalogue = catalogue if catalogue is not None else task_catalogue()
    text = (models or ALL_TASKS).strip()
    if text.lower() == ALL_TASKS:
        return list(catalogue)
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in catalogue]
    if unknown or not names:
        valid = ", ".join([ALL_TASKS, *catalogue])
        shown = ", ".join(f"'{name}'" for name in unknown) or f"'{models}'"
        raise TaskSelectionError(f"unknown model {shown} in {setting}; valid names are: {valid}")
    return list(dict.fromkeys(names))


def _expert_weights(expert_name: str, registry: Any = None) -> tuple[str, ...]:
    """The weights an expert of ``configs/experts.yaml`` needs, as the expert registry reads them."""
    from vila_m3.experts.registry import ExpertRegistry, UnknownExpert

    registry = registry if registry is not None else ExpertRegistry.from_config()
    try:
        return tuple(registry.configured_spec(expert_name).weights)
    except UnknownExpert:
        raise TaskSelectionError(
            f"configs/app.yaml names expert '{expert_name}', which experts.yaml does not define"
        ) from None


def required_models(task: dict, vlm_id: str, remote_vlm: bool = False, registry: Any = None) -> tuple[str, ...]:
    """The model ids of the manifest that ``task`` (an entry of the catalogue) needs.

    With a remote VLM (``--conf vlm_url``) the chat task needs no local weights. ``registry``: an
    already built ExpertRegistry, to avoid reading the expert configs again.
    """
    if task.get("vlm"):
        return () if remote_vlm else (vlm_id,)
    if task.get("expert"):
        return _expert_weights(task["expert"], registry)
    return ()


def task_statuses(
    names: list[str],
    models_dir: Path,
    vlm_id: str | None = None,
    catalogue: dict[str, dict] | None = None,
    manifest: ModelManifest | None = None,
    remote_vlm: bool = False,
) -> list[TaskStatus]:
    """Whether each selected task can run with the weights under ``models_dir``.

    Raises:
        TaskSelectionError: ``vlm_id`` is not a VILA checkpoint of the manifest.
    """
    catalogue = catalogue if catalogue is not None else task_catalogue()
    manifest = manifest if manifest is not None else ModelManifest.load()
    vlm_id = vlm_id or load_config("app.yaml").get("default_vlm", "")
    checkpoints = [mid for mid, entry in manifest.entries.items() if entry.kind == "vila_checkpoint"]
    if vlm_id not in checkpoints:
        raise TaskSelectionError(f"unknown VLM '{vlm_id}' in --conf vlm; valid ids are: {', '.join(checkpoints)}")

    registry = None
    if any(catalogue[name].get("expert") for name in names):
        from vila_m3.experts.registry import ExpertRegistry

        registry = ExpertRegistry.from_config()
    statuses = []
    for name in names:
        task = catalogue[name]
        model_ids = required_models(task, vlm_id, remote_vlm, registry)
        missing = tuple(manifest.missing(model_ids, models_dir))
        reason = None
        if missing:
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            vlm_option = f" --vlm {vlm_id}" if task.get("vlm") else ""
            reason = (
                f"weights not found: {missing[0]}{more}; fetch them with "
                f"`vila-m3 models pull --task {name}{vlm_option} --models-dir {models_dir}` "
                f"(air-gapped: `vila-m3 models list` shows what to copy where)"
            )
        notes = () if missing else tuple(dict.fromkeys(
            note for mid in model_ids if (note := manifest[mid].stand_in_note(models_dir))))
        statuses.append(TaskStatus(name, str(task.get("description", "")), model_ids, missing, reason, bool(notes),
                                   notes))
    return statuses


def format_statuses(statuses: list[TaskStatus]) -> str:
    """A short table, one line per task: ``name  available`` or ``name  not available: reason``."""
    width = max((len(status.name) for status in statuses), default=0)
    lines = []
    for status in statuses:
        state = "available" if status.available else f"not available: {status.reason}"
        if status.stand_in:
            state += f" (STAND-IN weights: {'; '.join(status.stand_in_notes)})"
        lines.append(f"  {status.name:<{width}}  {state}")
    return "\n".join(lines) if lines else "  (no tasks selected)"
