"""``vila-m3 train``, ``vila-m3 evaluate``, ``vila-m3 models demo`` and ``vila-m3 models versions``.

``vila-m3 train --base CKPT --data EXPORT --out RUN [--max-steps N ...] [--resume [STEP_DIR]]`` fine-tunes
(also under ``accelerate launch``, see ``configs/accelerate/``); ``vila-m3 evaluate --model CKPT --data
EXPORT`` prints the trigger-accuracy table (``--vlm-url URL --vlm-model NAME [--tools]``: of a remote model,
``--tools`` scoring its OpenAI tool calls); ``vila-m3 models demo`` stages the demo model (and demo experts)
where no real weights are staged, from the shipped build when it is of the current recipe;
``vila-m3 models demo-rebuild`` builds the shipped demo again and compares; ``vila-m3 models versions`` lists or switches
the fine-tuned versions a server serves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from vila_m3.configs import load_config


def _train(args: argparse.Namespace) -> int:
    from vila_m3.training.examples import DataError
    from vila_m3.training.options import TrainingOptions, TrainingOptionsError
    from vila_m3.training.trainer import TrainingError, fine_tune
    from vila_m3.vlm.errors import CheckpointError

    overrides: dict[str, Any] = {
        "parts": args.parts, "learning_rate": args.learning_rate, "epochs": args.epochs, "max_steps": args.max_steps,
        "batch_size": args.batch_size, "gradient_accumulation": args.gradient_accumulation,
        "precision": args.precision, "device": args.device, "save_steps": args.save_steps, "eval_steps": args.eval_steps,
        "logging_steps": args.logging_steps, "seed": args.seed, "warmup_ratio": args.warmup_ratio,
        "lora_enabled": True if args.lora else None, "lora_r": args.lora_r,
        "gradient_checkpointing": False if args.no_gradient_checkpointing else None,
    }
    try:
        options = TrainingOptions.from_config(overrides)
        resume: bool | str = True if args.resume == "latest" else (args.resume or False)
        result = fine_tune(args.base, args.data, args.out, options, resume=resume, progress=not args.no_progress)
    except (TrainingOptionsError, TrainingError, DataError, CheckpointError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    metrics = result.metrics
    print(f"Fine-tuned checkpoint: {result.checkpoint} ({metrics['steps']} steps, train loss "
          f"{metrics['train_loss']:.4f}, eval loss {metrics['eval_loss']})")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from vila_m3.training.evaluation import evaluate_triggers, format_report
    from vila_m3.training.examples import DataError
    from vila_m3.vlm.errors import CheckpointError
    from vila_m3.vlm.generation import VilaChat
    from vila_m3.vlm.remote import API_KEY_ENV, RemoteVLM, RemoteVLMError

    if bool(args.model) == bool(args.vlm_url) or (args.vlm_url and not args.vlm_model) or (args.tools and not args.vlm_url):
        print("error: give --model CKPT, or --vlm-url URL with --vlm-model NAME (and --tools for a tool-calling "
              "model)", file=sys.stderr)
        return 2
    try:
        if args.vlm_url:
            chat = RemoteVLM(args.vlm_url, args.vlm_model, api_key=os.environ.get(API_KEY_ENV) or None,
                             tool_calling=args.tools)
        else:
            chat = VilaChat.from_pretrained(args.model, device=args.device)
        report = evaluate_triggers(chat, args.data, split=args.split, limit=args.limit,
                                   check_answers=not args.no_answers, tools=args.tools,
                                   progress=not args.no_progress)
    except (CheckpointError, DataError, RemoteVLMError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.vlm_url:
        print(f"model: {chat.describe()}")
    elif chat.is_stand_in:
        print(f"note: {args.model} is marked as a stand-in ({getattr(chat.model.config, 'vila_m3_stand_in', '')})")
    evaluation = load_config("demo_model.yaml").get("evaluation") or {}
    targets = {"trigger_accuracy": float(evaluation.get("target_trigger_accuracy", 0.95)),
               "false_call_rate": float(evaluation.get("target_false_call_rate", 0.05))}
    print(format_report(report, targets))
    if args.json:
        Path(args.json).write_text(json.dumps(report.as_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


def _models_demo(args: argparse.Namespace) -> int:
    from vila_m3.models.manifest import resolve_models_dir
    from vila_m3.training.demo import DemoError, load_demo_recipe, stage_demo

    try:
        overrides = load_demo_recipe(args.recipe) if args.recipe else None
        lines = stage_demo(resolve_models_dir(args.models_dir), rebuild=args.rebuild, progress=not args.no_progress,
                           only_without_weights=args.if_no_weights, overrides=overrides)
    except DemoError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0


def _models_demo_rebuild(args: argparse.Namespace) -> int:
    from vila_m3.training.shipped_demo import (
        SHIPPED_DEMO_DIR,
        compare_builds,
        cpu_profile,
        read_build_record,
        rebuild,
        replace_shipped,
    )

    try:
        profile = cpu_profile(args.cpu_profile)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if any(os.environ.get(name) != value for name, value in profile.items()):
        # torch, MKL and oneDNN read these when they load: run again with them set
        print(f"CPU profile {args.cpu_profile}: {' '.join(f'{k}={v}' for k, v in profile.items())}")
        os.execve(sys.argv[0], sys.argv, {**os.environ, **profile})
    parts = [part.strip() for part in args.parts.split(",") if part.strip()] if args.parts else None
    try:
        rebuilt = rebuild(Path(args.work_dir), progress=not args.no_progress, parts=parts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    shipped = read_build_record()
    if shipped is None:
        print("no shipped demo build to compare with (demo/build.json)")
        equal = False
    else:
        equal, text = compare_builds(shipped, rebuilt)
        print(text)
    if args.ship:
        replace_shipped(Path(args.work_dir) / "demo")
        print(f"the rebuild is now the shipped build ({SHIPPED_DEMO_DIR}); commit it with its build.json")
    return 0 if equal or args.ship or shipped is None else 1


def _models_versions(args: argparse.Namespace) -> int:
    from vila_m3.models.manifest import resolve_models_dir
    from vila_m3.training.versions import ModelVersions, VersionError

    vlm_id = args.vlm or load_config("app.yaml")["default_vlm"]
    versions = ModelVersions(resolve_models_dir(args.models_dir), vlm_id)
    if args.use:
        try:
            versions.use(args.use)
        except VersionError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    index = versions.read()
    current = index.get("current")
    print(f"{vlm_id}: serving {current or 'base'} (a running server switches at its next chat turn)")
    for entry in index.get("versions", []):
        mark = "*" if entry.get("id") == current else " "
        print(f" {mark} {entry.get('id')}  {entry.get('created')}  steps {entry.get('steps')}  "
              f"eval loss {entry.get('eval_loss')}")
    return 0


def add_commands(commands: argparse._SubParsersAction) -> None:
    """``train`` and ``evaluate``."""
    train = commands.add_parser("train", help="fine-tune a VILA checkpoint on a data-engine export")
    train.add_argument("--base", required=True, help="checkpoint folder (released layout)")
    train.add_argument("--data", required=True, help="export folder of `vila-m3 datagen`")
    train.add_argument("--out", required=True, help="run folder: model/, steps/, training_record.json")
    train.add_argument("--resume", nargs="?", const="latest", help="continue the run in --out (or from STEP_DIR)")
    train.add_argument("--parts", help="comma list of llm, projector, vision (default: all)")
    train.add_argument("--learning-rate", type=float)
    train.add_argument("--epochs", type=float)
    train.add_argument("--max-steps", type=int)
    train.add_argument("--batch-size", type=int, help="per device")
    train.add_argument("--gradient-accumulation", type=int)
    train.add_argument("--warmup-ratio", type=float)
    train.add_argument("--precision", choices=("auto", "bf16", "fp32"))
    train.add_argument("--device", choices=("auto", "cpu"), help="auto: a GPU when there is one (default)")
    train.add_argument("--lora", action="store_true", help="LoRA adapters on the LLM (merged into the saved checkpoint)")
    train.add_argument("--lora-r", type=int)
    train.add_argument("--no-gradient-checkpointing", action="store_true")
    train.add_argument("--save-steps", type=int)
    train.add_argument("--eval-steps", type=int)
    train.add_argument("--logging-steps", type=int)
    train.add_argument("--seed", type=int)
    train.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser("evaluate", help="trigger accuracy of a checkpoint on a data-engine export")
    evaluate.add_argument("--model", help="checkpoint folder")
    evaluate.add_argument("--vlm-url", help="instead: a remote OpenAI-compatible server's API root (key in "
                                            "$VILA_M3_REMOTE_API_KEY)")
    evaluate.add_argument("--vlm-model", help="the model name the remote server serves")
    evaluate.add_argument("--tools", action="store_true",
                          help="the remote model calls experts with OpenAI tool calls; score those as triggers")
    evaluate.add_argument("--data", required=True, help="export folder (e.g. `vila-m3 datagen --phrasings heldout`)")
    evaluate.add_argument("--split", default="val", choices=("val", "train", "all"))
    evaluate.add_argument("--limit", type=int, help="at most this many records")
    evaluate.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if present)")
    evaluate.add_argument("--no-answers", action="store_true", help="score the expert calls only")
    evaluate.add_argument("--json", help="also write the totals to this file")
    evaluate.add_argument("--no-progress", action="store_true")
    evaluate.set_defaults(handler=_evaluate)


def add_model_commands(model_commands: argparse._SubParsersAction) -> None:
    """``models demo`` and ``models versions``."""
    demo = model_commands.add_parser(
        "demo", help="build (once) and stage the demo model and demo experts where no real weights are staged")
    demo.add_argument("--models-dir", help="default: $VILA_M3_MODELS_DIR or ./models")
    demo.add_argument("--rebuild", action="store_true", help="build again even if an up-to-date build is staged")
    demo.add_argument("--if-no-weights", action="store_true",
                      help="do nothing when real weights of any model are staged (what `make run` does)")
    demo.add_argument("--recipe", metavar="FILE",
                      help="YAML changes to configs/demo_model.yaml, and under `experts` to configs/demo_experts.yaml "
                           "(e.g. fewer steps for a quick look)")
    demo.add_argument("--no-progress", action="store_true")
    demo.set_defaults(handler=_models_demo)
    rebuilding = model_commands.add_parser(
        "demo-rebuild", help="build the shipped demo (demo/) again from its recipes and compare (about 40 min)")
    rebuilding.add_argument("--work-dir", default="build/demo-rebuild", help="where the rebuild goes (replaced)")
    rebuilding.add_argument("--ship", action="store_true", help="then make the rebuild the shipped build (demo/)")
    rebuilding.add_argument("--parts", metavar="LIST",
                            help="comma-separated parts to build (vlm, vista3d, brats; default all); the others are "
                                 "kept from the shipped build, which must be of their current recipes")
    rebuilding.add_argument("--cpu-profile", default="native",
                            help="CPU kernel settings of configs/demo_cpu_profiles.yaml: native, avx2 (the same bits on "
                                 "every AVX2 machine) or default")
    rebuilding.add_argument("--no-progress", action="store_true")
    rebuilding.set_defaults(handler=_models_demo_rebuild)
    versions = model_commands.add_parser("versions", help="fine-tuned versions of the chat's VLM; switch with --use")
    versions.add_argument("--vlm", help="checkpoint id (default: configs/app.yaml default_vlm)")
    versions.add_argument("--use", help="serve this version (or 'base')")
    versions.add_argument("--models-dir", help="default: $VILA_M3_MODELS_DIR or ./models")
    versions.set_defaults(handler=_models_versions)
