"""``vila-m3 datagen``: a dataset folder of expert-training conversations from a datastore and chats.

Layout of the export (all names relative to it)::

    train.json, val.json   VILA / LLaVA records (configs/datagen_schema.json)
    images/<sha256>.png    the slices and overlays the records refer to
    manifest.json          seed, source, config and question-pool hashes, the phrasings used (all, train or
                           heldout), counts, records' provenance (split, category, group, kind, answer,
                           slice; hashed source), files with sha256, and ``privacy``: the result of the
                           final privacy scan (``passed``, number of findings), which training reads
    summary.txt, .png      counts by expert, group, answer and split; skipped inputs with reasons

Steps: pair images with final labels (:mod:`.cases`), make each case's records (:mod:`.conversations`),
turn chats into records with corrections (:mod:`.chats`), drop any record holding an identifier of the
source DICOM headers (of the labelled volumes and of every chat's study) or a generic identifier
pattern - record numbers and names typed into a chat included (:mod:`.privacy`), with a skip reason
that does not quote what was found - deduplicate, split by patient or volume and repeat by category
(:mod:`.balance`), write, then scan the written export (the manifest too) and record the result in
the manifest.

The export is written next to ``out_dir`` and moved into place when complete; ``out_dir`` must be empty,
absent, or an earlier export (which is replaced).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from vila_m3 import __version__
from vila_m3.chat.store import Chat
from vila_m3.data.balance import TRAIN, VAL, Placed, deduplicate, listed, place
from vila_m3.data.cases import Case, CaseError, LoadedCase, collect_cases, load_case
from vila_m3.data.chats import ChatConverter, ChatStudy, chat_study_ids
from vila_m3.data.config import DatagenConfig, load_datagen_config
from vila_m3.data.conversations import ConversationBuilder
from vila_m3.data.privacy import (
    DICOM_SUFFIXES,
    Finding,
    dicom_identifiers,
    find_dicom_files,
    hashed_id,
    scan_export,
    scan_json,
    scan_text,
)
from vila_m3.data.questions import QuestionPools
from vila_m3.data.records import ImageWriter, Record
from vila_m3.data.sources import (
    IMAGE_SUFFIXES,
    DatastoreImage,
    DatastoreSource,
    Skip,
    SourceError,
    open_datastore,
    split_name,
)
from vila_m3.data.summary import draw_summary, format_summary, summarize
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.imaging.sequences import SEQUENCE_ORDER, sequence_of
from vila_m3.progress import progress as show_progress

FORMAT = "vila-m3-datagen"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"


class ExportError(RuntimeError):
    """The export cannot be made (bad output folder, unreadable datastore); the message says why."""


@dataclass
class ExportResult:
    """What an export did.

    Attributes:
        out_dir: the dataset folder.
        manifest: the manifest written.
        summary: the counts (as in ``summary.txt``; sources hashed).
        skips: what was left out, with raw source ids (for the admin; not written to the export).
        findings: what the final privacy scan of the export found (empty: passed).
    """

    out_dir: Path
    manifest: dict[str, Any]
    summary: dict[str, Any]
    skips: list[Skip] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)

    @property
    def privacy_passed(self) -> bool:
        return not self.findings

    def as_dict(self) -> dict[str, Any]:
        """JSON-able result (e.g. the answer of a server route)."""
        return {
            "out_dir": self.out_dir.name,  # the export's name: a client never sees the server's folders
            "counts": self.manifest["counts"],
            "summary": self.summary,
            "skipped": [{"source": s.source, "kind": s.kind, "reason": s.reason} for s in self.skips],
            # where and what kind, never the text found: this answer leaves the server
            "privacy": {"passed": self.privacy_passed, "findings": [f"{f.where}: {f.reason}" for f in self.findings]},
        }


def export_dataset(
    datastore: str | os.PathLike[str] | DatastoreSource,
    out_dir: str | os.PathLike[str],
    chats_dir: str | os.PathLike[str] | None = None,
    seed: int | None = None,
    config: DatagenConfig | None = None,
    questions_dir: str | os.PathLike[str] | None = None,
    progress: bool = True,
    token: str | None = None,
    identifiers: Iterable[str] = (),
    phrasings: str | None = None,
) -> ExportResult:
    """Export expert-training conversations (see the module docstring).

    Args:
        datastore: a MONAI Label studies folder, a server URL (``http://host:port``), or a ``DatastoreSource``
            (the app passes MONAI Label's datastore of a PACS this way).
        out_dir: the dataset folder to write.
        chats_dir: the server's chats folder (``<app>/chats`` or ``--conf chats_dir``), or None.
        seed: question, slice and split draws (default: the config's).
        config: datagen settings (default: ``configs/datagen.yaml``).
        questions_dir: question pools (default: ``configs/questions``).
        progress: show the progress (stderr: a bar on a terminal, else plain lines with the time left).
        token: bearer token for a server with authentication.
        identifiers: more values that must not appear (besides those of the source DICOM headers).
        phrasings: ``all``, ``train`` or ``heldout`` phrasings of the question pools (default: the
            config's ``questions.use``); the split is ``QuestionPools.restricted``'s.

    Raises:
        ExportError: the output folder is not usable or the datastore cannot be read.
        DatagenConfigError: ``phrasings`` is not one of the three.
    """
    config = config or load_datagen_config()
    if phrasings is not None:
        config = config.with_phrasings(phrasings)
    seed = config.seed if seed is None else int(seed)
    all_pools = QuestionPools.load(questions_dir)
    pools = all_pools.restricted(config.phrasings, config.heldout_fraction)
    used = {"use": config.phrasings, "heldout_fraction": config.heldout_fraction, "questions_sha256": pools.sha256,
            "phrasings": sum(len(p) for kinds in pools.pools.values() for p in kinds.values())}
    registry = ExpertRegistry.from_config(
        available=(lambda spec: None if spec.runner else "not run by this product") if config.card == "product" else None
    )
    out = Path(out_dir).resolve()
    _check_output(out)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with tempfile.TemporaryDirectory(prefix="vila-m3-datagen-") as cache:
            try:
                source = (open_datastore(datastore, cache, tag=config.label_tag, token=token)
                          if isinstance(datastore, str | os.PathLike) else datastore)
            except SourceError as err:
                raise ExportError(str(err)) from None
            images = ImageWriter(staging, config.id_length)
            engine = _Engine(config, seed, pools, registry, images, source, set(identifiers), progress)
            records, skips = engine.datastore_records()
            chat_notes: dict[str, int] = {}
            if chats_dir is not None and config.chats.get("include", True):
                chat_records, chat_skips, chat_notes = engine.chat_records(Path(chats_dir))
                records += chat_records
                skips += chat_skips
            records, privacy_skips = engine.privacy_gate(records)
            skips += privacy_skips
            records, duplicates = deduplicate(records)
            placed, units = place(records, config.val_fraction, seed, config.multipliers, config.id_length)
            removed = images.remove_unused({path for item in placed for path in item.record.images})
            notes = {"duplicates_removed": duplicates, "unused_images_removed": removed, **chat_notes}
            summary = summarize(placed, skips, seed, identifiers=engine.identifiers, **notes)
            manifest = _write(staging, placed, units, summary, config, all_pools, used, registry, seed,
                              source.location, chats_dir)
            close = getattr(source, "close", None)
            if close is not None:
                close()
        findings = scan_export(staging, engine.identifiers)
        findings += scan_json(manifest, MANIFEST, engine.identifiers)
        manifest["privacy"] = {"passed": not findings, "findings": len(findings),
                               "identifiers_searched": len(engine.identifiers)}
        _write_json(staging / MANIFEST, manifest)
        _replace(out, staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return ExportResult(out, manifest, summary, skips, findings)


def export_from_app(datastore_path_or_url: str | DatastoreSource, chats_dir: str | None, out_dir: str, seed: int = 0) -> dict[str, Any]:
    """The export as a server task for admins: no progress bars, a JSON-able result.

    Returns:
        ``{"out_dir", "counts", "summary", "skipped": [{"source", "kind", "reason"}], "privacy":
        {"passed", "findings"}}`` (``skipped`` names the raw image / chat ids, for the admin).
    """
    result = export_dataset(datastore_path_or_url, out_dir, chats_dir=chats_dir, seed=seed, progress=False)
    return result.as_dict()


class _Engine:
    """The steps of one export that share state (the datastore, written images, identifiers)."""

    def __init__(self, config: DatagenConfig, seed: int, pools: QuestionPools, registry: ExpertRegistry,
                 images: ImageWriter, source, identifiers: set[str], progress: bool):
        self.config, self.seed, self.registry, self.images = config, seed, registry, images
        self.source = source
        self.identifiers = identifiers
        self.progress = progress
        self.builder = ConversationBuilder(config, pools, registry, images)
        self.cases: list[Case] = []
        self.loaded_ok: set[str] = set()
        self.unit_of_image: dict[str, str] = {}
        self.identified: set[str] = set()
        self._cache: OrderedDict[str, LoadedCase] = OrderedDict()

    def datastore_records(self) -> tuple[list[Record], list[Skip]]:
        self.cases, skips = collect_cases(self.source)
        records: list[Record] = []
        for case in show_progress(self.cases, "Writing conversations about the labelled studies (data engine)",
                                  "volumes", disable=not self.progress):
            try:
                loaded = load_case(case, self.source)
            except CaseError as err:
                skips.append(Skip(case.labelled.label_name or case.source_id, "label", str(err)))
                continue
            self.identifiers |= loaded.identifiers
            self.identified.update(case.image_ids)
            made = self.builder.records(loaded, self.seed)
            if not made:
                skips.append(Skip(case.source_id, "label", "no structure of the label belongs to a conversation "
                                  "group (configs/datagen.yaml)"))
            records += made
            self.loaded_ok.add(case.source_id)
            self.unit_of_image.update({image_id: loaded.split_key for image_id in case.image_ids})
        return records, skips

    def chat_records(self, chats_dir: Path) -> tuple[list[Record], list[Skip], dict[str, int]]:
        converter = ChatConverter(self.config, self.registry, self.images, self.chat_study)
        count = len(list(chats_dir.glob("*/chat.json"))) if chats_dir.is_dir() else 0
        with show_progress(count, "Writing conversations from the chats (data engine)", "chats",
                           disable=not self.progress) as bar:
            outcome = converter.convert(chats_dir, progress=bar.update)
        notes = {"chats": len(outcome.records), "chat_expert_turns_corrected": outcome.corrected_turns,
                 "chat_expert_turns_changed_by_correction": outcome.changed_turns,
                 "chat_tool_calls_as_triggers": outcome.tool_calls_as_triggers,
                 "chats_skipped_for_tool_calls": outcome.tool_call_chats_skipped}
        return outcome.records, outcome.skips, notes

    def chat_study(self, chat: Chat) -> ChatStudy:
        """Split unit and final label of a chat's study (matched to the datastore by image id or file name)."""
        by_image = {image_id: case for case in self.cases for image_id in case.image_ids}
        images: dict[str, DatastoreImage] = {image.image_id: image for image in self.source.images()}
        studies = {case.source_id for case in self.cases if case.is_brats}
        brats_chat = set((chat.study or {}).get("images") or {}) == set(SEQUENCE_ORDER)
        candidates = chat_study_ids(chat)
        for candidate in candidates:
            if candidate in images:
                self.add_image_identifiers(images[candidate])
        for candidate in candidates:
            case = by_image.get(candidate)
            if case is not None:
                unit = self.unit_of_image.get(candidate) or (
                    f"study:{case.source_id}" if case.is_brats else f"image:{case.source_id}")
                usable = case.source_id in self.loaded_ok and case.is_brats == brats_chat
                loader: Callable[[], LoadedCase] | None = (lambda c=case: self._load(c)) if usable else None
                return ChatStudy(unit, loader, case.labelled.label_time)
            image = images.get(candidate)
            if image is not None:
                found = sequence_of(image.file_name)
                return ChatStudy(f"study:{found[0]}" if found and found[0] in studies else f"image:{candidate}")
        return ChatStudy(f"chat-study:{candidates[0]}" if candidates else f"chat:{chat.chat_id}")

    def add_image_identifiers(self, image: DatastoreImage) -> None:
        """Search the export for the DICOM-header identifiers of ``image`` too (a chat's study, labelled or not).

        Images in a known non-DICOM format (NIfTI, NRRD, PNG, ...) are not read (nor downloaded).
        """
        if image.image_id in self.identified:
            return
        self.identified.add(image.image_id)
        suffix = split_name(image.file_name)[1].lower()
        if suffix in IMAGE_SUFFIXES and suffix not in DICOM_SUFFIXES:
            return
        try:
            # a source whose images are converted copies (a PACS) names the DICOM files they came from
            headers = getattr(self.source, "dicom_path", self.source.image_path)
            self.identifiers |= dicom_identifiers(find_dicom_files(headers(image)))
        except OSError:  # unreadable or not downloadable: the generic patterns still apply
            return

    def _load(self, case: Case) -> LoadedCase:
        if case.source_id not in self._cache:
            self._cache[case.source_id] = load_case(case, self.source)
            while len(self._cache) > 2:
                self._cache.popitem(last=False)
        return self._cache[case.source_id]

    def privacy_gate(self, records: list[Record]) -> tuple[list[Record], list[Skip]]:
        """Records whose texts hold no identifier or identifier-like pattern, and skips for the others.

        A skip's reason says what kind of thing was found (:data:`vila_m3.data.privacy.SKIP_REASONS`),
        never the text itself: it is written to ``summary.txt``.
        """
        kept, skips = [], []
        clean: set[str] = set()
        for record in records:
            problem = None
            for _, text in record.turns:
                if text in clean:
                    continue
                findings = scan_text(text, "", self.identifiers)
                if findings:
                    problem = findings[0].skip_reason
                    break
                clean.add(text)
            if problem is None:
                kept.append(record)
            else:
                skips.append(Skip(record.source, "record", problem))
        return kept, skips


def _check_output(out: Path) -> None:
    if not out.exists():
        return
    if not out.is_dir():
        raise ExportError(f"{out} is a file; give a folder for the export")
    if not any(out.iterdir()):
        return
    try:
        manifest = json.loads((out / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        manifest = None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ExportError(f"{out} is not empty and holds no earlier export; choose an empty or new folder")


def _replace(out: Path, staging: Path) -> None:
    if out.exists():
        shutil.rmtree(out)
    os.replace(staging, out)


def _write(folder: Path, placed: list[Placed], units: dict[str, str], summary: dict[str, Any],
           config: DatagenConfig, pools: QuestionPools, phrasings: dict[str, Any], registry: ExpertRegistry,
           seed: int, datastore: str | os.PathLike[str], chats_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Write the split files and the summary; returns the manifest, which the caller writes after scanning.

    ``pools`` are all the question pools (their hash is ``questions_sha256``); ``phrasings`` says which
    side of them was drawn from (``use``, ``heldout_fraction``, the hash and number of those phrasings).
    """
    counts = {
        "records": len(placed),
        "train": {"records": sum(p.split == TRAIN for p in placed), "listed": sum(p.repeats for p in placed
                                                                                  if p.split == TRAIN)},
        "val": {"records": sum(p.split == VAL for p in placed)},
        "images": len({path for p in placed for path in p.record.images}),
        "skipped": len(summary["skipped"]),
    }
    for split in (TRAIN, VAL):
        _write_json(folder / f"{split}.json", listed(placed, split))
    (folder / "summary.txt").write_text(format_summary(summary), encoding="utf-8")
    draw_summary(summary, folder / "summary.png")
    files = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = path.read_bytes()
        files.append({"path": path.relative_to(folder).as_posix(), "sha256": hashlib.sha256(data).hexdigest(),
                      "bytes": len(data)})
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "generator": f"vila-m3 {__version__}",
        "seed": seed,
        "source": source_name(datastore),  # names, never the server's folders
        "chats": Path(chats_dir).name if chats_dir is not None else None,
        "config_sha256": config.sha256(),
        "questions_sha256": pools.sha256,
        "phrasings": phrasings,
        "card_sha256": hashlib.sha256(registry.model_card().encode("utf-8")).hexdigest(),
        "multipliers": dict(config.multipliers),
        "val_fraction": config.val_fraction,
        "counts": counts,
        "splits": {split: sorted(hashed_id(seed, "unit", unit) for unit, s in units.items() if s == split)
                   for split in (TRAIN, VAL)},
        "records": [
            {"id": p.record_id, "split": p.split, "repeats": p.repeats, "category": p.record.category,
             "group": p.record.group, "kind": p.record.kind, "answer": p.record.answer,
             "source": hashed_id(seed, "source", p.record.source), "unit": hashed_id(seed, "unit", p.record.split_key),
             "axis": p.record.axis, "slice": p.record.index}
            for p in placed
        ],
        "files": files,
    }
    return manifest


def source_name(datastore: str | os.PathLike[str]) -> str:
    """What the manifest says about the export's datastore: a folder's name, or a server URL without
    credentials, query or path beyond the host (never a server path)."""
    text = os.fspath(datastore)
    parts = urlsplit(text)
    if parts.scheme in ("http", "https") and parts.hostname:
        port = f":{parts.port}" if parts.port else ""
        return f"{parts.scheme}://{parts.hostname}{port}"
    return Path(text).name


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
