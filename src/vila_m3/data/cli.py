"""The ``datagen`` and ``datagen-check`` commands.

``vila-m3 datagen --datastore <folder | http://server:8000> --out <dir> [--chats <dir>] [--seed N]
[--config FILE] [--questions DIR] [--phrasings all|train|heldout]`` writes a dataset of expert-training
conversations (``--phrasings train`` draws only the training side of the question phrasings,
``heldout`` only the held-out side, for an evaluation set of unseen phrasings); ``vila-m3 datagen-check <dir>`` checks an export's
structure and scans it for patient identifiers (exit 1 with a list when it finds any).
Hook them into ``vila-m3`` with :func:`add_commands`; :func:`main` runs them alone.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

TOKEN_ENV = "VILA_M3_DATASTORE_TOKEN"


def _datagen(args: argparse.Namespace) -> int:
    from vila_m3.data.config import DatagenConfigError, load_datagen_config
    from vila_m3.data.export import ExportError, export_dataset
    from vila_m3.data.questions import QuestionPoolError
    from vila_m3.data.summary import format_summary

    try:
        config = load_datagen_config(args.config) if args.config else None
        result = export_dataset(
            args.datastore, args.out, chats_dir=args.chats, seed=args.seed, config=config,
            questions_dir=args.questions, progress=not args.no_progress,
            token=os.environ.get(TOKEN_ENV) or None, identifiers=args.identifier or (), phrasings=args.phrasings,
        )
    except (ExportError, DatagenConfigError, QuestionPoolError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(result.summary), end="")
    if result.skips:
        print("\nskipped (datastore ids, for you; the export lists them hashed):")
        for skip in result.skips:
            print(f"  {skip.kind} {skip.source}: {skip.reason}")
    counts = result.manifest["counts"]
    print(f"\nWrote {counts['train']['records']} train records ({counts['train']['listed']} listed with repeats), "
          f"{counts['val']['records']} val records and {counts['images']} images to {result.out_dir}")
    if not result.privacy_passed:
        print(f"PRIVACY CHECK FAILED: {len(result.findings)} finding(s); do not share this export:", file=sys.stderr)
        for finding in result.findings:
            print(f"  {finding}", file=sys.stderr)
        return 1
    print("Privacy check passed.")
    return 0


def _datagen_check(args: argparse.Namespace) -> int:
    from vila_m3.data.privacy import dicom_identifiers, find_dicom_files, scan_export
    from vila_m3.data.validate import check_structure

    folder = Path(args.export)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder", file=sys.stderr)
        return 2
    locations = [Path(p) for p in args.dicom or []]
    if not locations and not args.no_source:
        source = _manifest_source(folder)
        if source is not None:
            locations.append(source)
    files = [file for location in locations for file in find_dicom_files(location)]
    identifiers = dicom_identifiers(files) | set(args.identifier or [])
    problems = [] if args.privacy_only else check_structure(folder)
    findings = scan_export(folder, identifiers)
    print(f"Checked {folder}: {len(identifiers)} identifiers from {len(files)} DICOM file(s) searched for, and "
          "the generic patterns (DICOM dates, names and UIDs; record numbers and names typed into chats).")
    recorded = _recorded_privacy(folder)
    if recorded is not None:
        print(f"Recorded when exported: privacy check {'passed' if recorded.get('passed') else 'FAILED'} "
              f"({recorded.get('findings', '?')} finding(s)); training refuses an export whose check failed.")
    for problem in problems:
        print(f"structure: {problem}")
    for finding in findings:
        print(f"privacy: {finding}")
    if problems or findings:
        print(f"FAILED: {len(findings)} privacy finding(s), {len(problems)} structural problem(s).", file=sys.stderr)
        return 1
    print("Passed: no identifiers found; structure and checksums are correct.")
    return 0


def _manifest_source(folder: Path) -> Path | None:
    """The export's local source folder, when the manifest gives it as an absolute path that still exists
    (its DICOM headers are read); a manifest that names its source without a path needs ``--dicom``."""
    try:
        source = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("source")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(source, str) or source.startswith(("http://", "https://")):
        return None
    path = Path(source)
    return path if path.is_absolute() and path.exists() else None


def _recorded_privacy(folder: Path) -> dict | None:
    """The privacy result the export recorded in its manifest (``passed``, ``findings``), or None."""
    try:
        privacy = json.loads((folder / "manifest.json").read_text(encoding="utf-8")).get("privacy")
    except (OSError, ValueError, AttributeError):
        return None
    return privacy if isinstance(privacy, dict) else None


def add_commands(commands: argparse._SubParsersAction) -> None:
    """Add ``datagen`` and ``datagen-check`` to a sub-command parser (the ``vila-m3`` CLI)."""
    datagen = commands.add_parser("datagen", help="expert-training conversations from final labels and chats")
    datagen.add_argument("--datastore", required=True,
                         help="MONAI Label studies folder, or a server URL such as http://127.0.0.1:8000 "
                              f"(bearer token from ${TOKEN_ENV})")
    datagen.add_argument("--out", required=True, help="dataset folder to write (empty, new, or an earlier export)")
    datagen.add_argument("--chats", help="the server's chats folder (default: no chats)")
    datagen.add_argument("--seed", type=int, help="draws of questions, slices and the split (default: the config's)")
    datagen.add_argument("--config", help="datagen settings (default: configs/datagen.yaml)")
    datagen.add_argument("--questions", help="question pools folder (default: configs/questions)")
    datagen.add_argument("--phrasings", choices=("all", "train", "heldout"),
                         help="which question phrasings to draw: all, the train side or the held-out side "
                              "(default: the config's questions.use)")
    datagen.add_argument("--identifier", action="append", help="a further value that must not appear (repeatable)")
    datagen.add_argument("--no-progress", action="store_true", help="no progress bars")
    datagen.set_defaults(handler=_datagen)

    check = commands.add_parser("datagen-check", help="check an export for patient identifiers and structure")
    check.add_argument("export", help="the dataset folder")
    check.add_argument("--dicom", action="append",
                       help="DICOM file or folder whose identifiers to search for (repeatable; default: the "
                            "manifest's source folder)")
    check.add_argument("--identifier", action="append", help="a further value to search for (repeatable)")
    check.add_argument("--no-source", action="store_true", help="do not read the manifest's source folder")
    check.add_argument("--privacy-only", action="store_true", help="skip the structure and checksum checks")
    check.set_defaults(handler=_datagen_check)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m vila_m3.data.cli datagen ...`` / ``datagen-check ...``."""
    parser = argparse.ArgumentParser(prog="vila-m3", description="VILA-M3 data engine")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
