"""Expert-training conversations from a case's final label (EXPERT_PROTOCOL.md §8).

For each kind of question the conversation is the one the model should have at inference time::

    human: <card> <image>This is a CT image.\\n<question>
    gpt:   This looks like a CT image. Let me trigger <VISTA3D(hepatic tumor)>.
    human: The results are <image>. The colors in this image describe red: liver, ... prompt:\\n<question>
    gpt:   <answer computed from the final label>

The feedback turn is built by the expert feedback functions from the *final* label restricted to the
group's labels on the slice shown, and its image is the overlay of that restricted label
(``render_overlay``), so the colours named are the colours drawn. Segmentation-only requests are one
exchange (``I segmented ... using <VISTA3D(group)>.``). BRATS shows the four sequences and the
overlay; a chest X-ray gets the findings text (no overlay).

Questions name what they ask about, so the trigger's argument follows from the question: ``visible``
questions name the group's ``{subject}`` (``vista3d.subjects``), presence questions of a group without
a focus only ask about structures no more specific group covers (``vista3d.presence_structures:
owned``), and a structure may be named by a synonym (``vista3d.synonyms``, drawn with
``synonym_fraction``) while the trigger and the answer keep the canonical name.

Questions that need no expert (category ``general``: imaging modality, slice plane) are one exchange
with no trigger; a BRATS study shows its T1c slice alone, with the single-image prefix and ``MRI``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from vila_m3.data.annotations import any_present, choose_slices, count_components, label_ids, slice_presence
from vila_m3.data.cases import LoadedCase
from vila_m3.data.config import GENERAL_KINDS, DatagenConfig, DatagenConfigError
from vila_m3.data.questions import QuestionPools
from vila_m3.data.records import ImageWriter, Record
from vila_m3.experts.colors import overlay_colors_float
from vila_m3.experts.feedback import brats_feedback, classification_feedback, segmentation_feedback
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.imaging import labelmap_like
from vila_m3.imaging.overlay import render_overlay
from vila_m3.imaging.sequences import SEQUENCE_ORDER
from vila_m3.imaging.slices import render_slice, slice_index_count


def case_rng(seed: int, content: str) -> np.random.Generator:
    """The random stream of one case: fixed by the seed and the case's content, independent of the others.

    Keyed by content rather than datastore id, so a study stored twice draws the same questions and
    slices, and its records are removed as duplicates instead of landing in both splits.
    """
    digest = hashlib.sha256(content.encode("utf-8")).digest()
    return np.random.default_rng([seed, int.from_bytes(digest[:8], "big")])


def join_names(names: Sequence[str]) -> str:
    """``["a"]`` → ``a``; ``["a", "b", "c"]`` → ``a, b and c``."""
    if len(names) <= 1:
        return "".join(names)
    return ", ".join(names[:-1]) + " and " + names[-1]


class ConversationBuilder:
    """Makes the records of loaded cases; images go to ``images`` (content-named PNGs).

    Args:
        config: the datagen settings.
        pools: the question pools.
        registry: the experts (model card, VISTA3D groups, BRATS label names).
        images: where rendered PNGs are written.
    """

    def __init__(self, config: DatagenConfig, pools: QuestionPools, registry: ExpertRegistry, images: ImageWriter):
        self.config = config
        self.pools = pools
        self.registry = registry
        self.images = images
        self.card = registry.model_card()
        self.vista3d = registry.configured_spec("VISTA3D")
        self.brats = registry.configured_spec("BRATS")
        self.templates = config.templates
        self.answers = config.answers
        self.colors = overlay_colors_float()
        self.synonyms = {str(name): tuple(others) for name, others in (config.vista3d.get("synonyms") or {}).items()}
        self.synonym_fraction = float(config.vista3d.get("synonym_fraction", 0.0))
        self.owners = self._owners()
        self._check_synonyms()

    # --- shared pieces ---------------------------------------------------------------------------

    def first_turn(self, modality: str, question: str) -> str:
        """Card, image placeholder(s) with the modality line, question."""
        if modality == "BRATS":
            return self.card + self.templates["brats_prefix"] + question
        return self.card + self.templates["image_prefix"].format(modality=modality) + question

    def yes_no(self, value: bool) -> tuple[str, str]:
        key = "yes" if value else "no"
        return self.answers[key], key

    def groups(self) -> tuple[str, ...]:
        chosen = self.config.vista3d.get("groups", "all")
        return tuple(self.vista3d.args) if chosen in (None, "all") else tuple(chosen)

    def plural(self, name: str) -> str:
        """A structure name's plural: ``vista3d.plurals``, else the name + "s" (synonyms too)."""
        return (self.config.vista3d.get("plurals") or {}).get(name, name + "s")

    def subject(self, group: str) -> str:
        """What a VISTA3D group covers, as ``visible`` questions name it (``vista3d.subjects``)."""
        subjects = self.config.vista3d.get("subjects") or {}
        if group in subjects:
            return str(subjects[group])
        return str(self.config.vista3d.get("default_subject", "{group} structures")).format(group=group)

    def spoken(self, name: str, rng: np.random.Generator) -> str:
        """The name a question uses for a structure: a synonym with ``synonym_fraction``, else the name."""
        others = self.synonyms.get(name, ())
        if not others or self.synonym_fraction <= 0.0 or rng.random() >= self.synonym_fraction:
            return name
        return others[int(rng.integers(len(others)))]

    def _owners(self) -> dict[str, str]:
        """``{structure name: the group its presence questions belong to}``: a group's focus belongs to it;
        other structures to the first group (in argument order) holding them, the default argument
        (``everything``) last."""
        groups = self.groups()
        focus = self.config.vista3d.get("focus") or {}
        owners = {str(focus[group]): group for group in groups if group in focus}
        for group in sorted(groups, key=lambda g: g == self.vista3d.default_arg):
            for name in self.vista3d.resolve_argument(group).labels:
                owners.setdefault(name, group)
        return owners

    def _check_synonyms(self) -> None:
        """A synonym must not be the name of another structure of the conversation groups."""
        names = {name for group in self.groups() for name in self.vista3d.resolve_argument(group).labels}
        for name, others in self.synonyms.items():
            clashes = sorted(set(others) & (names - {name}))
            if clashes:
                raise DatagenConfigError(f"vista3d.synonyms.{name}: {', '.join(clashes)} already name other "
                                         "VISTA3D structures")

    def askable(self, group: str, group_ids: list[int], names: dict[int, str]) -> list[int]:
        """The structures of ``group_ids`` that presence questions of ``group`` may ask about."""
        if self.config.vista3d.get("presence_structures", "owned") == "all":
            return list(group_ids)
        return [i for i in group_ids if self.owners.get(names[i]) == group]

    # --- dispatch --------------------------------------------------------------------------------

    def records(self, case: LoadedCase, seed: int) -> list[Record]:
        """Every record of one case, drawn with the case's own random stream."""
        digest = case.content_digest()
        rng = case_rng(seed, digest)
        if case.category == "vista3d":
            records = self._vista3d(case, rng)
        elif case.category == "brats":
            records = self._brats(case, rng)
        else:
            records = self._cxr(case, rng)
        return records + self._general(case, case_rng(seed, f"general:{digest}"))

    # --- VISTA3D ---------------------------------------------------------------------------------

    def _vista3d(self, case: LoadedCase, rng: np.random.Generator) -> list[Record]:
        volume, labels = case.primary, case.labels
        present = set(label_ids(labels))
        kinds = self.config.kinds("vista3d")
        focus_names = self.config.vista3d.get("focus") or {}
        records: list[Record] = []
        for axis in self.config.axes:
            presence = slice_presence(labels, axis, sorted(present))
            n_slices = slice_index_count(volume, axis)
            pictures: dict[int, str] = {}
            for group in self.groups():
                resolved = self.vista3d.resolve_argument(group)
                names = {label_id: name for name, label_id in resolved.labels.items()}
                group_ids = sorted(i for i in names if i in present)
                if not group_ids:
                    continue
                focus_id = resolved.labels.get(focus_names.get(group, ""))
                askable = [focus_id] if focus_id is not None else self.askable(group, group_ids, names)
                targets = askable or group_ids
                slices = choose_slices(any_present(presence, targets, n_slices), self.config.slices_per_volume,
                                       self.config.positive_fraction, rng)
                restricted = labelmap_like(volume, np.where(np.isin(labels.array, group_ids), labels.array, 0))
                views = {index: self._ct_view(case, restricted, axis, index, pictures) for index, _ in slices}
                context = dict(case=case, group=group, axis=axis, names=names)
                for index, through in slices:
                    on_slice = views[index][2]
                    if "presence" in kinds and askable:
                        if focus_id is not None:
                            structure = focus_id
                        elif through:
                            structure = int(rng.choice([i for i in on_slice if i in askable] or askable))
                        else:
                            absent = [i for i in askable if i not in on_slice]
                            structure = int(rng.choice(absent or askable))
                        question = self.pools.draw("vista3d", "presence", rng,
                                                   structure=self.spoken(names[structure], rng))
                        answer, key = self.yes_no(structure in on_slice)
                        records.append(self._vista3d_record(context, views[index], index, "presence", question,
                                                            answer, key))
                    if "visible" in kinds:
                        subject = self.subject(group)
                        question = self.pools.draw("vista3d", "visible", rng, group=group, subject=subject)
                        items = [names[i] for i in on_slice]
                        answer = (self.answers["visible"].format(items=join_names(items)) if items
                                  else self.answers["visible_none"].format(subject=subject))
                        records.append(self._vista3d_record(context, views[index], index, "visible", question,
                                                            answer, "visible" if items else "none visible"))
                if not slices:
                    continue
                shown = [index for index, through in slices if through] or [index for index, _ in slices]
                if "count" in kinds and focus_id is not None:
                    index = int(rng.choice(shown))
                    singular = names[focus_id]
                    plural = self.plural(singular)
                    number = count_components(labels.array == focus_id, self.config.connectivity)
                    if number == 0:
                        answer = self.answers["count_none"].format(plural=plural, singular=singular)
                    elif number == 1:
                        answer = self.answers["count_one"].format(plural=plural, singular=singular)
                    else:
                        answer = self.answers["count_many"].format(count=number, plural=plural, singular=singular)
                    said = self.spoken(singular, rng)
                    question = self.pools.draw("vista3d", "count", rng, structure=said, structures=self.plural(said))
                    records.append(self._vista3d_record(context, views[index], index, "count", question, answer,
                                                        f"count={number}"))
                if "segment" in kinds:
                    index = int(rng.choice([i for i, _ in slices]))
                    targets = self.config.vista3d.get("targets") or {}
                    target = targets.get(group, f"the {group}")
                    asked = target if group in targets else f"the {self.spoken(group, rng)}"
                    question = self.pools.draw("vista3d", "segment", rng, target=asked, group=group)
                    reply = self.templates["segmented"]["VISTA3D"].format(target=target, group=group)
                    records.append(Record(
                        [("human", self.first_turn("CT", question)), ("gpt", reply)], [views[index][0]],
                        "vista3d", group, "segment", "segmented", case.case.source_id, case.split_key, axis, index))
        return records

    def _ct_view(self, case: LoadedCase, restricted, axis: str, index: int,
                 pictures: dict[int, str]) -> tuple[str, str, list[int]]:
        """(slice PNG, overlay PNG, label ids on the slice ascending) of one slice; ``pictures`` caches slice PNGs."""
        volume = case.primary
        if index not in pictures:
            pictures[index] = self.images.add(render_slice(volume, axis, index, case.modality))
        picture = pictures[index]
        overlay, drawn = render_overlay(volume, restricted, axis, index, self.colors, modality=case.modality)
        return picture, self.images.add(overlay), [label_id for label_id, _ in drawn]

    def _vista3d_record(self, context: dict, view: tuple[str, str, list[int]], index: int, kind: str,
                        question: str, answer: str, answer_key: str) -> Record:
        case, group = context["case"], context["group"]
        picture, overlay, on_slice = view
        turns = [
            ("human", self.first_turn("CT", question)),
            ("gpt", self.templates["trigger"]["VISTA3D"].format(group=group)),
            ("human", segmentation_feedback(on_slice, context["names"], question)),
            ("gpt", answer),
        ]
        return Record(turns, [picture, overlay], "vista3d", group, kind, answer_key, case.case.source_id,
                      case.split_key, context["axis"], index)

    # --- BRATS -----------------------------------------------------------------------------------

    def _brats(self, case: LoadedCase, rng: np.random.Generator) -> list[Record]:
        labels, t1c = case.labels, case.primary
        kinds = self.config.kinds("brats")
        regions = self.config.brats["regions"]
        names = dict(self.brats.labels)
        records: list[Record] = []
        for axis in self.config.axes:
            presence = slice_presence(labels, axis)
            n_slices = slice_index_count(t1c, axis)
            slices = choose_slices(any_present(presence, regions["presence"], n_slices),
                                   self.config.slices_per_volume, self.config.positive_fraction, rng)
            for index, _ in slices:
                sequences = [self.images.add(render_slice(case.volumes[name], axis, index, "MRI"))
                             for name in SEQUENCE_ORDER]
                overlay, drawn = render_overlay(t1c, labels, axis, index, self.colors, modality="MRI")
                on_slice = [label_id for label_id, _ in drawn]
                overlay_path = self.images.add(overlay)
                for kind in ("presence", "core", "enhancing", "edema", "visible"):
                    if kind not in kinds:
                        continue
                    question = self.pools.draw("brats", kind, rng)
                    if kind == "visible":
                        items = [names.get(i, f"label {i}") for i in on_slice]
                        answer = (self.answers["visible"].format(items=join_names(items)) if items
                                  else self.answers["visible_none"])
                        key = "visible" if items else "none visible"
                    else:
                        answer, key = self.yes_no(bool(set(regions[kind]) & set(on_slice)))
                    turns = [
                        ("human", self.first_turn("BRATS", question)),
                        ("gpt", self.templates["trigger"]["BRATS"]),
                        ("human", brats_feedback(on_slice, question)),
                        ("gpt", answer),
                    ]
                    records.append(Record(turns, [*sequences, overlay_path], "brats", "BRATS", kind, key,
                                          case.case.source_id, case.split_key, axis, index))
            if "segment" in kinds and slices:
                index = int(rng.choice([i for i, _ in slices]))
                sequences = [self.images.add(render_slice(case.volumes[name], axis, index, "MRI"))
                             for name in SEQUENCE_ORDER]
                target = str(self.config.brats.get("target", "the brain tumor"))
                question = self.pools.draw("brats", "segment", rng, target=target)
                reply = self.templates["segmented"]["BRATS"].format(target=target)
                records.append(Record([("human", self.first_turn("BRATS", question)), ("gpt", reply)], sequences,
                                      "brats", "BRATS", "segment", "segmented", case.case.source_id,
                                      case.split_key, axis, index))
        return records

    # --- CXR -------------------------------------------------------------------------------------

    def _cxr(self, case: LoadedCase, rng: np.random.Generator) -> list[Record]:
        findings = case.findings or {}
        kinds = self.config.kinds("cxr")
        picture = self.images.add(render_slice(case.primary, "axial", 0, "CXR"))
        records = []
        questions: list[tuple[str, str, str, str]] = []
        if "finding" in kinds:
            for name in sorted(findings):
                question = self.pools.draw("cxr", "finding", rng, finding=name.lower().replace("_", " "))
                answer, key = self.yes_no(findings[name])
                questions.append(("finding", question, answer, key))
        if "findings" in kinds:
            positive = [name.lower().replace("_", " ") for name in sorted(findings) if findings[name]]
            question = self.pools.draw("cxr", "findings", rng)
            answer = (self.answers["findings"].format(items=join_names(positive)) if positive
                      else self.answers["findings_none"])
            questions.append(("findings", question, answer, "findings" if positive else "no findings"))
        for kind, question, answer, key in questions:
            turns = [
                ("human", self.first_turn("CXR", question)),
                ("gpt", self.templates["trigger"]["CXR"]),
                ("human", classification_feedback(findings, question)),
                ("gpt", answer),
            ]
            records.append(Record(turns, [picture], "cxr", "CXR", kind, key, case.case.source_id, case.split_key))
        return records

    # --- questions that need no expert -----------------------------------------------------------

    def _general(self, case: LoadedCase, rng: np.random.Generator) -> list[Record]:
        """``general.per_case`` records per kind (and per axis of a 3D case): one exchange, no trigger.

        Slices are drawn through the labelled region (others fill in); a BRATS study shows its T1c slice.
        A chest X-ray has no plane question.
        """
        kinds = [kind for kind in GENERAL_KINDS if kind in self.config.kinds("general")]
        per_case = int(self.config.general.get("per_case", 1))
        if not kinds or per_case <= 0:
            return []
        answers = self.config.general["answers"]
        modality = case.modality
        records: list[Record] = []
        if case.category == "cxr":
            if "modality" in kinds:
                picture = self.images.add(render_slice(case.primary, "axial", 0, "CXR"))
                for question in self.pools.draw_distinct("general", "modality", rng, per_case):
                    records.append(self._general_record(case, "modality", question, answers["modality"][modality],
                                                        modality, picture))
            return records
        volume, labels = case.primary, case.labels
        ids = label_ids(labels)
        for axis in self.config.axes:
            n_slices = slice_index_count(volume, axis)
            labelled = any_present(slice_presence(labels, axis, ids), ids, n_slices)
            slices = [index for index, _ in choose_slices(labelled, per_case, 1.0, rng)]
            pictures = [self.images.add(render_slice(volume, axis, index, modality)) for index in slices]
            for kind in kinds:
                answer, key = ((answers["modality"][modality], modality) if kind == "modality"
                               else (answers["plane"][axis], axis))
                questions = self.pools.draw_distinct("general", kind, rng, len(slices))
                for index, picture, question in zip(slices, pictures, questions, strict=True):
                    records.append(self._general_record(case, kind, question, answer, key, picture, axis, index))
        return records

    def _general_record(self, case: LoadedCase, kind: str, question: str, answer: str, key: str, picture: str,
                        axis: str | None = None, index: int | None = None) -> Record:
        turns = [("human", self.first_turn(case.modality, question)), ("gpt", answer)]
        return Record(turns, [picture], "general", case.modality, kind, key, case.case.source_id, case.split_key,
                      axis, index)
