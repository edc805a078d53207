"""The demo model: a tiny VILA-layout model trained by this product's own pipeline on synthetic studies.

With no real VILA-M3 weights on a machine (a laptop, CI, this repository's ``make run``), the whole
loop must still be shown honestly. The demo model is built exactly as a site would fine-tune the real
one, end to end, from ``configs/demo_model.yaml``:

1. phantom studies of several seeds with their ground truth as final labels (an annotated datastore);
2. the data engine writes two exports: conversations drawn from the **training** side of the question
   phrasings, and an evaluation set from the **held-out** side (questions never seen in training);
3. an untrained tiny checkpoint in the released layout (its tokenizer trained on the training texts);
4. fine-tuning with :func:`vila_m3.training.trainer.fine_tune`;
5. trigger evaluation (:mod:`vila_m3.training.evaluation`) on the held-out phrasings.

The result carries ``vila_m3_stand_in`` = the configured note in its ``config.json`` (so the server
labels every answer with it), a README and ``demo_evaluation.json`` with the measured accuracy.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from vila_m3.configs import config_path, load_config
from vila_m3.data.config import DatagenConfig, parse_datagen_config
from vila_m3.training.evaluation import EvaluationReport, evaluate_triggers, format_report, percent_text
from vila_m3.training.options import TrainingOptions
from vila_m3.training.reproducible import checked_thread_count, fixed_cpu_threads
from vila_m3.training.shipped_demo import shipped_parts, stage_shipped_part

__all__ = ["DEMO_EVALUATION", "DemoBuild", "build_demo_vlm", "demo_config", "demo_datagen_config", "load_demo_recipe",
           "demo_cpu_threads", "real_weights_staged", "stage_demo"]

DEMO_EVALUATION = "demo_evaluation.json"


@dataclass
class DemoBuild:
    """A built demo model: the checkpoint folder, its held-out evaluation and the build folder."""

    checkpoint: Path
    report: EvaluationReport
    work_dir: Path
    seconds: float


def demo_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``configs/demo_model.yaml`` with ``overrides`` merged in (nested mappings merge)."""
    return _merged(load_config("demo_model.yaml"), overrides or {})


def _merged(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in overrides.items():
        out[key] = _merged(out[key], value) if isinstance(value, Mapping) and isinstance(out.get(key), Mapping) else value
    return out


def demo_datagen_config(config: Mapping[str, Any]) -> DatagenConfig:
    """``configs/datagen.yaml`` with the demo's ``datagen`` overrides."""
    raw = yaml.safe_load(config_path("datagen.yaml").read_text(encoding="utf-8"))
    return parse_datagen_config(_merged(raw, config.get("datagen") or {}))


def demo_cpu_threads(config: Mapping[str, Any], source: str = "demo recipe") -> int:
    """The recipe's ``cpu_threads``: how many CPU threads the fine-tuning and evaluation run on (fixed,
    so that every machine builds the same model; see :mod:`vila_m3.training.reproducible`); DemoError
    naming ``source`` when invalid."""
    try:
        return checked_thread_count(config.get("cpu_threads", 1), f"{source}: cpu_threads")
    except ValueError as err:
        raise DemoError(str(err)) from None


def _texts(export_dir: Path) -> list[str]:
    """Every distinct turn text of an export's train split (the tokenizer's corpus), images removed."""
    records = json.loads((export_dir / "train.json").read_text(encoding="utf-8"))
    return sorted({turn["value"].replace("<image>", " ") for record in records for turn in record["conversations"]})


def build_demo_vlm(
    out_dir: str | Path,
    work_dir: str | Path,
    overrides: Mapping[str, Any] | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> DemoBuild:
    """Build the demo model into ``out_dir`` (a checkpoint folder in the released layout).

    Args:
        out_dir: where the finished checkpoint goes (replaced if it holds an earlier demo build).
        work_dir: build folder for the studies, exports and the training run (kept: the exports and
            the run's ``training_record.json`` show how the model was made).
        overrides: changes to ``configs/demo_model.yaml`` (tests use fewer steps).
        progress: progress bars (else log lines).
        log: where progress lines go.
    """
    from vila_m3.data.export import export_dataset
    from vila_m3.samples.annotated import annotated_studies
    from vila_m3.standins.tiny_vila import make_tiny_vila_checkpoint
    from vila_m3.training.trainer import fine_tune
    from vila_m3.vlm.generation import VilaChat

    started = time.perf_counter()
    config = demo_config(overrides)
    work = Path(work_dir)
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    note = str(config["note"])

    evaluation = config.get("evaluation") or {}
    seeds = {"train": tuple(config["study_seeds"]), "heldout": tuple(evaluation.get("study_seeds", (0,)))}
    log(f"demo model 1/5: synthetic annotated studies (phantom seeds {seeds['train']}; evaluation {seeds['heldout']})")
    studies = {side: annotated_studies(work / f"studies_{side}", seeds=chosen, scratch=work / "samples")
               for side, chosen in seeds.items()}

    log("demo model 2/5: conversations from the data engine (training phrasings, held-out phrasings)")
    datagen = demo_datagen_config(config)
    exports = {}
    for side in ("train", "heldout"):
        exports[side] = work / f"export_{side}"
        export_dataset(studies[side], exports[side], config=datagen, progress=progress, phrasings=side)

    log("demo model 3/5: untrained tiny checkpoint in the released layout")
    model = dict(config["model"])
    base = make_tiny_vila_checkpoint(
        work / "base", template=model["template"], seed=int(model.get("seed", 0)), corpus=_texts(exports["train"]),
        vocab_size=int(model["vocab_size"]), llm_hidden=int(model["llm_hidden"]), llm_layers=int(model["llm_layers"]),
        vision_hidden=int(model["vision_hidden"]), vision_layers=int(model["vision_layers"]),
        image_size=int(model["image_size"]), num_shards=1, note=note, rope_theta=model.get("rope_theta"),
    )

    threads = demo_cpu_threads(config)
    log(f"demo model 4/5: fine-tuning (on {threads} CPU threads, whatever the machine has: the same model everywhere)")
    options = TrainingOptions.from_config(config.get("training") or {})
    with fixed_cpu_threads(threads):
        result = fine_tune(base, exports["train"], work / "run", options, note=note, progress=progress, log=log,
                           description="Fine-tuning the demo VLM on the data engine's conversations")

        log("demo model 5/5: trigger evaluation on held-out phrasings")
        chat = VilaChat.from_pretrained(result.checkpoint, device="cpu")
        report = evaluate_triggers(chat, exports["heldout"], split="all", log=log)
    targets = {"trigger_accuracy": float(evaluation.get("target_trigger_accuracy", 0.95)),
               "false_call_rate": float(evaluation.get("target_false_call_rate", 0.05))}
    table = format_report(report, targets)
    log(table)

    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(result.checkpoint, out)
    summary = {**report.as_dict(), "targets": targets, "evaluated_on": "held-out phrasings of the data engine",
               "study_seeds": list(seeds["train"]), "evaluation_study_seeds": list(seeds["heldout"])}
    (out / DEMO_EVALUATION).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    (out / "README.txt").write_text(_readme(note, result.metrics, table), encoding="utf-8")
    return DemoBuild(checkpoint=out, report=report, work_dir=work, seconds=time.perf_counter() - started)


def _readme(note: str, metrics: Mapping[str, Any], table: str) -> str:
    return (
        f"DEMO MODEL - NOT A MEDICAL MODEL.\n\n{note}.\n\n"
        "Built by `vila-m3 models demo` from configs/demo_model.yaml: phantom studies -> data engine -> "
        f"fine-tuning ({metrics.get('steps')} steps, eval loss {metrics.get('eval_loss')}) -> trigger "
        "evaluation on question phrasings held out from training:\n\n"
        f"{table}\n\nIt has learned which expert (and argument) a question needs on these synthetic studies; "
        "its other words mean nothing. Stage the real VILA-M3 weights for actual use (vila-m3 models pull).\n"
    )


# ---- staging ------------------------------------------------------------------------------------

DEMO_BUILD = "demo_build.json"


class DemoError(RuntimeError):
    """The demo cannot be staged (e.g. something that is not a stand-in lies where it would go)."""


#: Revision of the demo VLM's build code (the untrained checkpoint, the fine-tuning, the evaluation), part
#: of its fingerprint: raise it when a change there changes what an unchanged recipe learns.
DEMO_TRAINING_REVISION = 1

#: The fields of ``configs/experts.yaml`` that make the model card the demo learns from.
_CARD_FIELDS = ("name", "modality", "task", "overview", "accuracy", "args", "default_arg", "aliases")


def _model_card_fields() -> dict[str, Any]:
    """What of ``configs/experts.yaml`` the demo VLM sees: the card format and each expert's card fields
    (a runner class or display colour changing does not change what the model learns)."""
    experts = load_config("experts.yaml")
    return {"card": experts.get("card"),
            "experts": [{key: entry.get(key) for key in _CARD_FIELDS} for entry in experts.get("experts") or []]}


def demo_fingerprint(overrides: Mapping[str, Any] | None = None) -> str:
    """sha256 of everything a demo build depends on: its recipe (``configs/demo_model.yaml`` with
    ``overrides``, by content: the same recipe however written gives the same build), the data engine's
    and training's configs, the model card, the question pools and :data:`DEMO_TRAINING_REVISION`. A build
    with another one is rebuilt (the shipped build, ``demo/``, is staged only when it has this one)."""
    import hashlib

    digest = hashlib.sha256(f"demo-vlm-revision-{DEMO_TRAINING_REVISION}".encode())
    digest.update(json.dumps(demo_config(overrides), sort_keys=True).encode())
    for name in ("datagen.yaml", "training.yaml"):
        digest.update(json.dumps(load_config(name), sort_keys=True).encode())
    digest.update(json.dumps(_model_card_fields(), sort_keys=True).encode())
    for path in sorted(config_path("questions").glob("*.y*ml")):
        digest.update(path.name.encode() + path.read_bytes())
    return digest.hexdigest()


def _staged_state(location: Path) -> str:
    """``absent``, ``real`` (weights that are not ours to replace), ``stand-in`` or ``demo:<fingerprint>``."""
    from vila_m3.vlm.configuration import STAND_IN_FIELD

    config = location / "config.json"
    if not location.exists() or not any(location.iterdir()):
        return "absent"
    if not config.is_file() or STAND_IN_FIELD not in config.read_text(encoding="utf-8", errors="replace"):
        return "real"
    build = location / DEMO_BUILD
    if build.is_file():
        return "demo:" + str(json.loads(build.read_text(encoding="utf-8")).get("fingerprint"))
    return "stand-in"


def stage_demo_vlm(models_dir: Path, vlm_id: str | None = None, rebuild: bool = False, progress: bool = True,
                   log: Callable[[str], None] = print, overrides: Mapping[str, Any] | None = None) -> str:
    """Build the demo model (once) at ``vlm_id``'s location, unless real weights are staged there.

    Returns:
        One line saying what was done.
    """
    from vila_m3.models.manifest import ModelManifest

    vlm_id = vlm_id or load_config("app.yaml")["default_vlm"]
    location = ModelManifest.load()[vlm_id].location(models_dir)
    state = _staged_state(location)
    fingerprint = demo_fingerprint(overrides)
    if state == "real":
        return f"{vlm_id}: real weights staged at {location}; the demo model is not needed"
    if state == f"demo:{fingerprint}" and not rebuild:
        return f"{vlm_id}: demo model already built at {location}"
    if not rebuild and stage_shipped_part("vlm", location, fingerprint):
        evaluation = shipped_parts()["vlm"].record.get("evaluation") or {}
        return (f"{vlm_id}: the shipped demo model staged at {location}; on held-out phrasings it calls the right "
                f"expert and argument for {percent_text(evaluation.get('trigger_accuracy'))} of the questions that need one "
                f"and an expert for {percent_text(evaluation.get('false_call_rate'))} of those that need none")
    build = build_demo_vlm(location, models_dir / ".demo-build", overrides=overrides, progress=progress, log=log)
    (location / DEMO_BUILD).write_text(json.dumps({"fingerprint": fingerprint, "seconds": round(build.seconds, 1)},
                                                  indent=2) + "\n", encoding="utf-8")
    accuracy = build.report.trigger_accuracy
    false_calls = build.report.false_call_rate
    return (f"{vlm_id}: demo model built in {build.seconds:.0f} s at {location}; on held-out phrasings it calls the "
            f"right expert and argument for {100 * (accuracy or 0):.1f} % of the questions that need one and an "
            f"expert for {100 * (false_calls or 0):.1f} % of those that need none")


def demo_experts_config(overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """``configs/demo_experts.yaml`` with ``overrides`` (a recipe's ``experts`` section) merged in."""
    return _merged(load_config("demo_experts.yaml"), overrides or {})


@dataclass(frozen=True)
class _TrainableExpert:
    """An expert whose demo stand-in is trained on phantoms: its manifest model, its recipe class and
    trainer (import paths, loaded when used), its bundle config (part of the fingerprint), what it is
    trained on and the sample study it is measured on (in messages)."""

    model_id: str
    recipe: str
    trainer: str
    inference_config: str
    trained_on: str
    measured_on: str

    @staticmethod
    def _load(path: str) -> Any:
        import importlib

        module, name = path.rsplit(":", 1)
        return getattr(importlib.import_module(module), name)

    def recipe_of(self, config: Mapping[str, Any], task: str, source: str) -> Any:
        """The recipe of ``config`` (its ``train`` switch aside); DemoError naming ``source`` when invalid."""
        try:
            return self._load(self.recipe).from_config({k: v for k, v in config.items() if k != "train"})
        except (TypeError, ValueError) as err:
            raise DemoError(f"{source}: experts {task}: {err}") from None

    def fingerprint(self, config: Mapping[str, Any]) -> str:
        """sha256 of what a trained stand-in depends on: the recipe, the stand-in bundle's
        ``inference.json``, the training code's revision, and the phantoms (the sample generator's version)."""
        import hashlib

        from vila_m3.samples.generate import GENERATOR_VERSION
        from vila_m3.training.stand_in_training import TRAINING_REVISION

        text = json.dumps({"recipe": {k: v for k, v in config.items() if k != "train"},
                           "training": TRAINING_REVISION, "phantoms": GENERATOR_VERSION,
                           "bundle": self._load(self.inference_config)()}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    def train(self, bundle: Path, recipe: Any, log: Callable[[str], None]) -> Any:
        return self._load(self.trainer)(bundle, recipe, log=log)


#: The experts ``configs/demo_experts.yaml`` can train (``<task>: {train: true, ...}``).
TRAINABLE_EXPERTS: dict[str, _TrainableExpert] = {
    "vista3d": _TrainableExpert(
        "vista3d", "vila_m3.training.vista3d_stand_in:Vista3DStandInRecipe",
        "vila_m3.training.vista3d_stand_in:train_vista3d_stand_in",
        "vila_m3.standins.tiny_bundles:vista3d_inference_config", "synthetic phantom CTs", "the sample CT"),
    "brats": _TrainableExpert(
        "brats_mri_segmentation", "vila_m3.training.brats_stand_in:BratsStandInRecipe",
        "vila_m3.training.brats_stand_in:train_brats_stand_in",
        "vila_m3.standins.tiny_bundles:brats_inference_config", "synthetic phantom brain MRIs", "the sample MRI"),
}


def _stage_trained_expert(models_dir: Path, task: str, recipe_config: Mapping[str, Any], rebuild: bool,
                          log: Callable[[str], None]) -> str:
    """``task``'s stand-in trained on phantoms in ``models_dir`` (reused when its build is current)."""
    from vila_m3.models.manifest import ModelManifest
    from vila_m3.standins.stand_ins import stage_stand_ins

    expert = TRAINABLE_EXPERTS[task]
    recipe = expert.recipe_of(recipe_config, task, "configs/demo_experts.yaml")
    fingerprint = expert.fingerprint(recipe_config)
    location = ModelManifest.load()[expert.model_id].location(models_dir)
    build = location / "docs" / DEMO_BUILD
    if not rebuild and build.is_file() and json.loads(build.read_text(encoding="utf-8")).get("fingerprint") == fingerprint:
        return f"{task}: demo stand-in already trained on {expert.trained_on}"
    if not rebuild and stage_shipped_part(task, location, fingerprint):
        dice = shipped_parts()[task].record.get("dice") or {}
        return (f"{task}: the shipped demo stand-in, trained on {expert.trained_on} (its results say so); Dice on "
                f"{expert.measured_on}, which it never saw: {', '.join(f'{k} {v:.2f}' for k, v in dice.items())}")
    try:
        stage_stand_ins(models_dir, (task,))
    except (ValueError, FileExistsError) as err:
        raise DemoError(str(err)) from None
    log(f"{recipe.expert} stand-in: training on {expert.trained_on} (seeds {list(recipe.study_seeds)}, "
        f"{recipe.steps} steps)")
    report = expert.train(location, recipe, log)
    build.write_text(json.dumps({"fingerprint": fingerprint, "seconds": round(report.seconds, 1)}, indent=2) + "\n",
                     encoding="utf-8")
    return (f"{task}: tiny stand-in trained on {expert.trained_on} in {report.seconds:.0f} s (its results say so); "
            f"Dice on {expert.measured_on}, which it never saw: {report.dice_text()}")


def stage_demo_experts(models_dir: Path, overrides: Mapping[str, Any] | None = None, rebuild: bool = False,
                       log: Callable[[str], None] = print) -> list[str]:
    """Stand-ins for every expert whose weights are not staged (never over real weights): VISTA3D and
    BRATS trained on the phantoms as ``configs/demo_experts.yaml`` says (``overrides`` change it;
    ``rebuild`` trains again even when the staged one is current), the others random."""
    from vila_m3.models.manifest import ModelManifest
    from vila_m3.standins.stand_ins import stage_stand_ins

    manifest = ModelManifest.load()
    config = demo_experts_config(overrides)
    tasks = {"vista3d": ("vista3d",), "brats": ("brats_mri_segmentation",),
             "cxr": tuple(mid for mid, entry in manifest.entries.items() if entry.kind == "xrv_weights")}
    lines = []
    for task, model_ids in tasks.items():
        if not manifest.missing(list(model_ids), models_dir) and not any(
                manifest[mid].is_stand_in(models_dir) for mid in model_ids):
            lines.append(f"{task}: real weights staged")
            continue
        if task in TRAINABLE_EXPERTS and (config.get(task) or {}).get("train", False):
            lines.append(_stage_trained_expert(models_dir, task, config[task], rebuild, log))
            continue
        try:
            stage_stand_ins(models_dir, (task,), manifest=manifest)
        except (ValueError, FileExistsError) as err:
            raise DemoError(str(err)) from None
        lines.append(f"{task}: tiny RANDOM stand-in weights (its results say so)")
    return lines


def real_weights_staged(models_dir: Path) -> list[str]:
    """Ids of the manifest's models that have real weights (anything that is not a stand-in) staged."""
    from vila_m3.models.staging import real_models_staged

    return real_models_staged(models_dir)


def load_demo_recipe(path: str | Path) -> dict[str, Any]:
    """A YAML file of changes to ``configs/demo_model.yaml`` (same keys; nested mappings merge), e.g. a
    shorter recipe for a quick look, and under ``experts`` to ``configs/demo_experts.yaml``. The build made
    from it is cached under its own fingerprint."""
    recipe = Path(path)
    try:
        loaded = yaml.safe_load(recipe.read_text(encoding="utf-8"))
    except OSError as err:
        raise DemoError(f"demo recipe {recipe} cannot be read: {err.strerror or err}") from None
    except yaml.YAMLError as err:
        raise DemoError(f"demo recipe {recipe} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise DemoError(f"demo recipe {recipe} must be a mapping of configs/demo_model.yaml keys")
    unknown = sorted(set(loaded) - set(load_config("demo_model.yaml")) - {"experts"})
    if unknown:
        raise DemoError(f"demo recipe {recipe} has unknown keys: {', '.join(map(str, unknown))}")
    experts = loaded.get("experts") or {}
    unknown = sorted(set(experts) - set(load_config("demo_experts.yaml"))) if isinstance(experts, dict) else ["experts"]
    if unknown:
        raise DemoError(f"demo recipe {recipe} has unknown experts keys: {', '.join(map(str, unknown))} "
                        f"(configs/demo_experts.yaml has {', '.join(load_config('demo_experts.yaml'))})")
    merged = demo_experts_config(experts)
    for task, expert in TRAINABLE_EXPERTS.items():
        expert.recipe_of(merged.get(task) or {}, task, f"demo recipe {recipe}")
    demo_cpu_threads(demo_config({k: v for k, v in loaded.items() if k != "experts"}), f"demo recipe {recipe}")
    return loaded


def _say_why_not_shipped(overrides: Mapping[str, Any] | None, log: Callable[[str], None]) -> None:
    """One line when a part will be built here rather than staged from the shipped build (``demo/``)."""
    from vila_m3.training.shipped_demo import current_fingerprints

    shipped = {name: part.fingerprint for name, part in shipped_parts().items()}
    stale = [name for name, fingerprint in current_fingerprints(overrides).items() if shipped.get(name) != fingerprint]
    if not stale:
        return
    why = ("the demo recipe given (DEMO_RECIPE) differs from the shipped build's" if overrides else
           "the shipped demo build (demo/) is not of the recipes in configs/ (rebuild and ship it: make demo-rebuild "
           "SHIP=yes)" if shipped else "no demo build is shipped (demo/build.json)")
    log(f"{why}: building {', '.join(stale)} here, once (the full recipes take about 40 min on two CPU cores)")


def stage_demo(models_dir: Path, rebuild: bool = False, progress: bool = True,
               log: Callable[[str], None] = print, only_without_weights: bool = False,
               overrides: Mapping[str, Any] | None = None) -> list[str]:
    """Stage everything the demo needs under ``models_dir``, building what is missing or out of date.

    Real weights are never replaced. With ``only_without_weights`` (what ``make run`` asks for), a
    models directory holding real weights of any model is left exactly as it is: a site that staged
    some weights gets no stand-ins beside them unless it asks. Returns one line per model saying what
    was done. ``overrides`` change ``configs/demo_model.yaml`` (see :func:`load_demo_recipe`).
    """
    if only_without_weights and models_dir.is_dir():
        real = real_weights_staged(models_dir)
        if real:
            return [f"real weights staged in {models_dir} ({', '.join(real)}): the demo model is not staged "
                    "(`vila-m3 models demo` stages it beside them)"]
    models_dir.mkdir(parents=True, exist_ok=True)
    if not rebuild:
        _say_why_not_shipped(overrides, log)
    overrides = dict(overrides or {})
    lines = stage_demo_experts(models_dir, overrides=overrides.pop("experts", None), rebuild=rebuild, log=log)
    lines.append(stage_demo_vlm(models_dir, rebuild=rebuild, progress=progress, log=log, overrides=overrides or None))
    return lines
