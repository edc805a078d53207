"""The ``vila-m3`` command line: ``serve``, ``samples``, ``models list | verify | pull | stand-ins | demo |
versions``, ``vlm inspect | ask``, ``datagen`` / ``datagen-check`` (the data engine), ``train`` and
``evaluate`` (fine-tuning and trigger accuracy), ``mcp`` (an MCP server over a running server)."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from vila_m3 import __version__
from vila_m3.configs import load_config

if TYPE_CHECKING:
    from vila_m3.serve import ServePlan


def _serve(args: argparse.Namespace) -> int:
    from vila_m3.serve import ServeError, describe, parse_conf_pairs, plan_server, serve

    try:
        conf = parse_conf_pairs([*args.conf_pairs, *[item for pair in args.conf for item in pair]])
        plan = plan_server(args.host, args.port, args.studies, args.models_dir, conf, args.app)
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    hint = _real_weights_hint(plan) if args.demo_if_no_weights else None
    if args.demo_if_no_weights and not args.check:
        try:
            plan = _with_demo(plan, args, conf)
        except (ServeError, RuntimeError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
    print(describe(plan), flush=True)
    if hint:
        print(hint, flush=True)
    if args.check:
        return 0
    serve(plan)
    return 0  # not reached: serve() replaces the process


def _real_weights_hint(plan: ServePlan) -> str | None:
    """With no real weights staged and no remote VLM, the one line saying that the demo is served and how to get
    the real models (no network probe: just the line); None otherwise."""
    from vila_m3.models.staging import real_models_staged
    from vila_m3.serve import REAL_WEIGHTS_HINT, remote_settings

    if remote_settings(plan.conf) is not None or real_models_staged(plan.models_dir):
        return None
    return REAL_WEIGHTS_HINT


def _with_demo(plan: ServePlan, args: argparse.Namespace, conf: dict[str, str]) -> ServePlan:
    """Stage the demo model (built once, cached) when no real weights are staged and no remote VLM is set,
    then plan again so that the task list shows it. The settings were checked first: a typo fails at once."""
    from vila_m3.serve import plan_server, remote_settings
    from vila_m3.training.demo import load_demo_recipe, stage_demo

    overrides = load_demo_recipe(args.demo_recipe) if args.demo_recipe else None
    if remote_settings(plan.conf) is not None:
        return plan
    for line in stage_demo(plan.models_dir, only_without_weights=True, overrides=overrides):
        print(line, flush=True)
    return plan_server(args.host, args.port, args.studies, args.models_dir, conf, args.app)


def _samples(args: argparse.Namespace) -> int:
    from vila_m3.samples import generate_samples

    manifest = generate_samples(Path(args.out), seed=args.seed, force=args.force, progress=True)
    studies = ", ".join(manifest["studies"])
    print(f"Sample studies (synthetic phantoms, seed {manifest['seed']}) in {Path(args.out).resolve()}: {studies}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from vila_m3.models.manifest import ModelManifest, resolve_models_dir
    from vila_m3.models.staging import source_text

    models_dir = resolve_models_dir(args.models_dir)
    manifest = ModelManifest.load()
    print(f"Models directory: {models_dir}")
    width = max(len(model_id) for model_id in manifest.entries)
    for model_id, entry in manifest.entries.items():
        missing = entry.missing_files(models_dir)
        state = "present" if not missing else f"missing ({len(missing)} file{'s' if len(missing) > 1 else ''})"
        print(f"  {model_id:<{width}}  {state:<18} {entry.location(models_dir)}  <- {source_text(entry)}")
    return 0


def _chosen_entries(args: argparse.Namespace):
    from vila_m3.models.manifest import ModelManifest
    from vila_m3.tasks import required_models, select_tasks, task_catalogue

    manifest = ModelManifest.load()
    model_ids = list(args.model_ids)
    tasks = list(getattr(args, "task", None) or [])
    catalogue = task_catalogue() if tasks or getattr(args, "real", False) else {}
    default_vlm = load_config("app.yaml")["default_vlm"]
    if getattr(args, "real", False):  # every task's models, with the VLM `--real` pulls by default
        tasks += list(catalogue)
        default_vlm = load_config("models.yaml").get("real_default_vlm", default_vlm)
    vlm = args.chosen_vlm = getattr(args, "vlm", None) or default_vlm
    if tasks and getattr(manifest.entries.get(vlm), "kind", None) != "vila_checkpoint":
        valid = ", ".join(mid for mid, entry in manifest.entries.items() if entry.kind == "vila_checkpoint")
        raise ValueError(f"--vlm {vlm} is not a VILA-M3 checkpoint of configs/models.yaml; valid ids are: {valid}")
    for task in tasks:
        select_tasks(task, catalogue, setting="--task")
        model_ids += required_models(catalogue[task], vlm)
    args.model_ids = list(dict.fromkeys(model_ids))
    if not args.model_ids:
        return manifest, list(manifest.entries.values())
    unknown = [model_id for model_id in args.model_ids if model_id not in manifest.entries]
    if unknown:
        raise KeyError(f"unknown model id {', '.join(unknown)}; valid ids are: {', '.join(manifest.entries)}")
    return manifest, [manifest[model_id] for model_id in args.model_ids]


def _models_verify(args: argparse.Namespace) -> int:
    from vila_m3.models.manifest import resolve_models_dir
    from vila_m3.models.staging import verify

    models_dir = resolve_models_dir(args.models_dir)
    try:
        _, entries = _chosen_entries(args)
    except KeyError as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    failed = False
    for entry in entries:
        report = verify(entry, models_dir)
        # Without explicit ids, a model that is simply not staged is listed but is no failure.
        failed |= not report.ok and (bool(args.model_ids) or report.state != "not staged")
        detail = f": {'; '.join(report.problems)}" if report.problems else ""
        print(f"{entry.model_id}: {report.state}{detail}")
    return 1 if failed else 0


def _models_pull(args: argparse.Namespace) -> int:
    from vila_m3.models.manifest import resolve_models_dir
    from vila_m3.models.staging import StagingError, pull

    if not args.model_ids and not args.task and not args.all and not args.real:
        print("error: name the models to pull (see `vila-m3 models list`), or pass --real, --task NAME or --all",
              file=sys.stderr)
        return 2
    models_dir = resolve_models_dir(args.models_dir)
    try:
        manifest, entries = _chosen_entries(args)
    except (KeyError, ValueError) as err:
        print(f"error: {err.args[0]}", file=sys.stderr)
        return 2
    started = time.monotonic()
    staged, fetched, failed = [], [], []
    for entry in entries:
        try:
            report = pull(entry, models_dir, manifest)
        except StagingError as err:
            print(f"error: {err}", file=sys.stderr, flush=True)
            failed.append(entry.model_id)
            continue
        staged.append(entry)
        fetched += [entry.model_id] if report.downloaded else []
        how = "downloaded, checksums recorded" if report.downloaded else "already staged, checksums match"
        print(f"{entry.model_id}: {report.state} at {report.location} ({how})", flush=True)
    print(pull_summary(staged, fetched, failed, models_dir, time.monotonic() - started), flush=True)
    if args.real and not failed:
        print(f"Serve them with: make run MODELS=real VLM={args.chosen_vlm} (checks them again, downloads nothing), or "
              f"vila-m3 serve --models-dir {models_dir} --conf vlm {args.chosen_vlm} --studies ...", flush=True)
    return 1 if failed else 0


def pull_summary(staged: list, fetched: list[str], failed: list[str], models_dir: Path, seconds: float) -> str:
    """The one line ``models pull`` ends with: what is staged, its size on disk, how long it took, what failed."""
    from vila_m3.models.staging import staged_bytes
    from vila_m3.progress import duration_text

    size = sum(staged_bytes(entry, models_dir) for entry in staged)
    line = (f"Staged {len(staged)} model{'s' * (len(staged) != 1)} in {models_dir} "
            f"({', '.join(entry.model_id for entry in staged) or 'none'}): {size / 1e9:.2f} GB on disk; "
            f"{len(fetched)} downloaded, {len(staged) - len(fetched)} already there; took {duration_text(seconds)}")
    if failed:
        line += f"; FAILED: {', '.join(failed)} (see the errors above)"
    return line


def _models_stand_ins(args: argparse.Namespace) -> int:
    from vila_m3.models.manifest import resolve_models_dir
    from vila_m3.standins.stand_ins import STAND_IN_TASKS, stage_stand_ins

    models_dir = resolve_models_dir(args.models_dir)
    tasks = tuple(args.task or STAND_IN_TASKS)
    try:
        written = stage_stand_ins(models_dir, tasks)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"Tiny RANDOM stand-ins for {', '.join(tasks)} in {models_dir} ({len(written)} models): they exercise "
          "every code path but are not medical models; every answer made with them says so.")
    return 0


def _mcp(args: argparse.Namespace) -> int:
    import anyio

    from vila_m3.mcp_server import TOKEN_ENV, result_store, serve_http, serve_stdio, token_from_env

    token = token_from_env()
    try:
        results = result_store(args.results_dir, args.keep_results)
    except (OSError, ValueError) as err:
        print(f"error: the MCP results folder cannot be used: {err}", file=sys.stderr)
        return 2
    if args.transport == "http":
        print(f"MCP server (streamable HTTP) at http://{args.host}:{args.port}/mcp for the VILA-M3 server at "
              f"{args.server}; bearer token: {'$' + TOKEN_ENV if token else 'the MCP request header, if any'}",
              file=sys.stderr, flush=True)
        serve_http(args.server, token, args.host, args.port, results)
    else:
        anyio.run(serve_stdio, args.server, token, results)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vila-m3", description="VILA-M3 for MONAI Label and 3D Slicer")
    parser.add_argument("--version", action="version", version=f"vila-m3 {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="check the settings and start the MONAI Label server")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--studies", required=True, help="studies folder or DICOMweb URL")
    serve.add_argument("--models-dir", help="where model weights are staged (default: $VILA_M3_MODELS_DIR or ./models)")
    serve.add_argument("--app", help="MONAI Label app folder (default: apps/vila_m3 of this checkout)")
    serve.add_argument("--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"),
                       help="a MONAI Label --conf pair, e.g. --conf models vista3d,cxr")
    serve.add_argument("--check", action="store_true", help="only check the settings and print the tasks")
    serve.add_argument("--demo-if-no-weights", action="store_true",
                       help="with no real weights staged (and no remote VLM), build (once) and stage the demo model "
                            "first (`vila-m3 models demo`); what `make run` does")
    serve.add_argument("--demo-recipe", metavar="FILE",
                       help="with --demo-if-no-weights: YAML changes to configs/demo_model.yaml, and under `experts` to "
                            "configs/demo_experts.yaml (`make run DEMO_RECIPE=`)")
    serve.add_argument("conf_pairs", nargs="*", metavar="KEY VALUE", help="more --conf pairs, written plainly")
    serve.set_defaults(handler=_serve)

    samples = commands.add_parser("samples", help="write the synthetic sample studies")
    samples.add_argument("--out", default="sample_data", help="output folder (default: sample_data)")
    samples.add_argument("--seed", type=int, default=0)
    samples.add_argument("--force", action="store_true", help="rewrite even if up to date")
    samples.set_defaults(handler=_samples)

    models = commands.add_parser("models", help="model weights: what is needed and where it goes")
    model_commands = models.add_subparsers(dest="models_command", required=True)
    listing = model_commands.add_parser("list", help="every model, whether it is staged, and where it goes")
    listing.add_argument("--models-dir", help="default: $VILA_M3_MODELS_DIR or ./models")
    listing.set_defaults(handler=_models_list)
    verifying = model_commands.add_parser("verify", help="check that staged models are complete and unchanged")
    verifying.add_argument("model_ids", nargs="*", help="model ids (default: every model; absent ones are listed)")
    verifying.add_argument("--models-dir", help="default: $VILA_M3_MODELS_DIR or ./models")
    verifying.set_defaults(handler=_models_verify)
    pulling = model_commands.add_parser("pull", help="download models that are missing (needs network)")
    pulling.add_argument("model_ids", nargs="*", help="model ids of configs/models.yaml")
    pulling.add_argument("--real", action="store_true",
                         help="the real models of every infer task: the VLM (--vlm; default vila_m3_3b), VISTA3D, "
                              "BRATS and the 8 TorchXRayVision files (what `make run MODELS=real` pulls)")
    pulling.add_argument("--all", action="store_true", help="every model of the manifest (all three VLMs too)")
    pulling.add_argument("--task", action="append", help="the models an infer task needs (vila_m3, vista3d, brats, cxr)")
    pulling.add_argument("--vlm", help="with --real or --task vila_m3: which checkpoint, e.g. vila_m3_8b (default: "
                                       "configs/models.yaml real_default_vlm with --real, else app.yaml default_vlm)")
    pulling.add_argument("--models-dir", help="default: $VILA_M3_MODELS_DIR or ./models")
    pulling.set_defaults(handler=_models_pull)
    stand_ins = model_commands.add_parser("stand-ins", help="write tiny random stand-ins (demos and tests only)")
    stand_ins.add_argument("--task", action="append", help="vista3d, brats, cxr, vila_m3 (default: all)")
    stand_ins.add_argument("--models-dir", required=True, help="a folder of its own, e.g. models-demo")
    stand_ins.set_defaults(handler=_models_stand_ins)
    mcp = commands.add_parser("mcp", help="an MCP server offering the experts and studies of a running server")
    mcp.add_argument("--server", default="http://127.0.0.1:8000", help="the VILA-M3 server's URL "
                     "(a bearer token for it from $VILA_M3_TOKEN when login is on)")
    mcp.add_argument("--transport", choices=("stdio", "http"), default="stdio",
                     help="stdio (a client spawns this command) or streamable HTTP at http://HOST:PORT/mcp")
    mcp.add_argument("--host", default="127.0.0.1", help="with --transport http (default: 127.0.0.1)")
    mcp.add_argument("--port", type=int, default=8010, help="with --transport http (default: 8010)")
    mcp.add_argument("--results-dir", help="where segmentation results are kept, private to you (default: "
                     "$VILA_M3_MCP_RESULTS, else ~/.cache/vila-m3/mcp-results; configs/tools.yaml mcp)")
    mcp.add_argument("--keep-results", type=int, help="how many results stay there, the newest (default: 32)")
    mcp.set_defaults(handler=_mcp)
    from vila_m3.data.cli import add_commands as add_datagen_commands
    from vila_m3.training.cli import add_commands as add_training_commands
    from vila_m3.training.cli import add_model_commands as add_demo_commands
    from vila_m3.vlm_cli import add_commands as add_vlm_commands

    add_demo_commands(model_commands)
    add_vlm_commands(commands)
    add_datagen_commands(commands)
    add_training_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
