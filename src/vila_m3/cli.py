"""The ``vila-m3`` command line: ``serve``, ``samples`` and ``models``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from vila_m3 import __version__


def _serve(args: argparse.Namespace) -> int:
    from vila_m3.serve import ServeError, describe, parse_conf_pairs, plan_server, serve

    try:
        conf = parse_conf_pairs([*args.conf_pairs, *[item for pair in args.conf for item in pair]])
        plan = plan_server(args.host, args.port, args.studies, args.models_dir, conf, args.app)
    except ServeError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(describe(plan), flush=True)
    if args.check:
        return 0
    serve(plan)
    return 0  # not reached: serve() replaces the process


def _samples(args: argparse.Namespace) -> int:
    from vila_m3.samples import generate_samples

    manifest = generate_samples(Path(args.out), seed=args.seed, force=args.force)
    studies = ", ".join(manifest["studies"])
    print(f"Sample studies (synthetic phantoms, seed {manifest['seed']}) in {Path(args.out).resolve()}: {studies}")
    return 0


def _models_list(args: argparse.Namespace) -> int:
    from vila_m3.models.manifest import ModelManifest, resolve_models_dir

    models_dir = resolve_models_dir(args.models_dir)
    manifest = ModelManifest.load()
    print(f"Models directory: {models_dir}")
    width = max(len(model_id) for model_id in manifest.entries)
    for model_id, entry in manifest.entries.items():
        missing = entry.missing_files(models_dir)
        state = "ready" if not missing else f"missing ({len(missing)} file{'s' if len(missing) > 1 else ''})"
        print(f"  {model_id:<{width}}  {state:<18} {entry.location(models_dir)}  <- {_source_text(entry.source)}")
    return 0


def _source_text(source: dict[str, str]) -> str:
    hub = source.get("hub", "")
    if hub == "huggingface":
        return f"huggingface {source['repo']}@{source.get('revision', 'main')}"
    if hub == "monai_model_zoo":
        return f"MONAI model zoo {source['name']} {source['version']}"
    return source.get("url", hub)


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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
