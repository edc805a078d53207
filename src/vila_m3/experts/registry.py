"""The expert registry: which experts exist, what the model is told about them, what their arguments mean.

Everything comes from ``configs/experts.yaml`` (and the VISTA3D class and group tables it names);
nothing about a particular expert is written in code. ``ExpertRegistry.from_config`` builds the
registry; an ``available`` callable decides which configured experts may be used now (weights staged,
runner present), and only those are advertised in the model card and accepted as triggers.

Each expert's ``runner`` names its runner class as ``package.module:Class`` (vila_m3.experts.runner);
the class is imported only when the expert runs (``ExpertRegistry.runner_class``), so reading the
registry loads no model code.

Extra experts come from other YAML files, without editing the repository: ``experts_files`` (or the
environment variable ``VILA_M3_EXPERTS``, paths separated by ``os.pathsep``). Each has an ``experts:``
list, appended to experts.yaml's in file order, and may list ``python_path:`` folders (relative to the
file) from which its runner modules are imported, and a ``models:`` mapping of its own weights in the format
of ``configs/models.yaml`` (read by :class:`vila_m3.models.manifest.ModelManifest`).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from types import MappingProxyType
from typing import Any

from vila_m3.configs import load_config
from vila_m3.experts.colors import RGB, derived_color
from vila_m3.models.manifest import EXPERTS_ENV, env_experts_files  # noqa: F401  (re-exported: the env variable and its reader)

EXPERTS_CONFIG = "experts.yaml"
OUTPUT_KINDS = ("segmentation", "classification")
FEEDBACK_KINDS = ("label_colors", "tumor_regions", "predictions", "none")
INPUT_MODALITIES = ("CT", "MRI", "CXR", "cell")
EVERYTHING = "everything"
_NAME_RE = re.compile(r"[A-Za-z][A-Za-z0-9_]*\Z")
_QUOTES = ("'", '"', "`")
_RUNNER_RE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*\Z")


class ConfigError(ValueError):
    """The experts configuration is invalid; the message says which entry and why."""


class UnknownExpert(KeyError):
    """No usable expert of that name; the message lists the valid names."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "unknown expert"


class UnknownArgument(ValueError):
    """An expert was given an argument it does not accept.

    Attributes:
        expert: the expert's name.
        argument: the argument as written.
        valid: the arguments the expert accepts (empty: it takes none).
    """

    def __init__(
        self, expert: str, argument: str, valid: tuple[str, ...], aliases: Mapping[str, str] | None = None
    ):
        self.expert = expert
        self.argument = argument
        self.valid = valid
        if valid:
            listed = ", ".join(f"'{a}'" for a in valid)
            alias_text = "".join(f" ('{a}' means '{t}')" for a, t in (aliases or {}).items())
            message = f"{expert} does not accept the argument '{argument}'; valid arguments are: {listed}{alias_text}"
        else:
            message = f"{expert} takes no argument, but got '{argument}'; write <{expert}()>"
        super().__init__(message)


class UnknownClass(ValueError):
    """An expert was asked for classes (label names) it does not have, or for none.

    Attributes:
        expert: the expert's name.
        unknown: the names as written that are not classes of the expert.
        near: ``{name as written: the closest class names}`` (may be empty for a name).
    """

    def __init__(self, expert: str, unknown: tuple[str, ...], near: Mapping[str, tuple[str, ...]]):
        self.expert = expert
        self.unknown = unknown
        self.near = near
        if not unknown:
            message = f"{expert}: give at least one class name"
        else:
            parts = []
            for name in unknown:
                close = near.get(name) or ()
                hint = f" (did you mean {', '.join(repr(c) for c in close)}?)" if close else ""
                parts.append(f"'{name}'{hint}")
            message = f"{expert} has no class {'; '.join(parts)}; the valid names are the tool's list of classes"
        super().__init__(message)


@dataclass(frozen=True)
class ResolvedArgument:
    """What an expert argument means.

    Attributes:
        group: canonical argument (``"hepatic tumor"`` for ``hepatoma``, ``"everything"`` for none),
            or None for an expert without arguments.
        label_ids: the label ids given to the network as its class prompt, in table order
            (``everything``: ascending); empty when the expert takes no prompt (BRATS, CXR).
        labels: ``{label name: id}`` of the labels this run produces (BRATS: its three labels; CXR: empty).
    """

    group: str | None
    label_ids: tuple[int, ...]
    labels: Mapping[str, int]


@dataclass(frozen=True)
class CardFormat:
    """The model card's fixed text: ``header`` + one ``line`` per available expert + ``footer``.

    ``line`` is a ``str.format`` template with the fields name, modality, task, overview, accuracy, valid_args.
    """

    header: str
    line: str
    footer: str


@dataclass(frozen=True)
class ClassificationSpec:
    """A classification expert's classes and ensemble voting.

    Attributes:
        pathologies: class names in the models' output order.
        voting: ``{class: model ids whose mean probability decides it}``; complete for every class.
        threshold: probability at or above which a class is reported ``yes``.
    """

    pathologies: tuple[str, ...]
    voting: Mapping[str, tuple[str, ...]]
    threshold: float

    def voters(self, pathology: str) -> tuple[str, ...]:
        """The model ids whose probabilities are averaged for ``pathology``."""
        return self.voting[pathology]


@dataclass(frozen=True, eq=False)
class ExpertSpec:
    """One configured expert (an entry of ``configs/experts.yaml``).

    Attributes:
        name: trigger name, case-sensitive (``<VISTA3D(...)>``).
        modality, task, overview, accuracy: card texts, verbatim.
        input_modality: what it runs on: ``CT``, ``MRI``, ``CXR`` or ``cell``.
        runner: the runner class as ``package.module:Class`` (``vila_m3.experts.vista3d:Vista3DExpert``),
            or None when this product does not run it.
        weights: model ids of ``configs/models.yaml`` the expert needs.
        output: ``segmentation`` or ``classification``.
        feedback: result text shape: ``label_colors``, ``tumor_regions``, ``predictions`` or ``none``.
        args: valid arguments in card order (empty: takes none).
        default_arg: the argument meant by ``<NAME>`` / ``<NAME()>`` (None: no argument).
        aliases: ``{alias: argument}``.
        labels: ``{label id: name}`` of the output labelmap, background (0) excluded.
        groups: ``{argument: {label name: id}}``.
        subclasses: ``{label id: ids it expands to}`` (VISTA3D: kidney, lung, bone).
        display_colors: ``{label id: RGB 0..255}`` for every label, for 3D Slicer segments.
        classification: classes and voting of a classification expert, else None.
        python_path: folders from which the runner's module is imported (an extra experts file's
            ``python_path``), absolute.
        tool_classes: the ``/infer`` parameter that takes a list of label ids (VISTA3D: ``label_prompt``): its
            tools (chat and MCP) then also take ``classes``, label names, instead of a card argument; None: not.
    """

    name: str
    modality: str
    task: str
    overview: str
    accuracy: str
    input_modality: str
    runner: str | None
    weights: tuple[str, ...]
    output: str
    feedback: str
    args: tuple[str, ...] = ()
    default_arg: str | None = None
    aliases: Mapping[str, str] = field(default_factory=dict)
    labels: Mapping[int, str] = field(default_factory=dict)
    groups: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    subclasses: Mapping[int, tuple[int, ...]] = field(default_factory=dict)
    display_colors: Mapping[int, RGB] = field(default_factory=dict)
    classification: ClassificationSpec | None = None
    python_path: tuple[str, ...] = ()
    tool_classes: str | None = None

    @property
    def takes_argument(self) -> bool:
        """Whether the expert accepts arguments at all."""
        return bool(self.args)

    @property
    def ids_by_name(self) -> dict[str, int]:
        """``{label name: id}`` for every output label."""
        return {name: label_id for label_id, name in self.labels.items()}

    def label_color(self, label_id: int) -> RGB:
        """Display colour of a label (RGB 0..255); ids outside the table get a derived colour."""
        return self.display_colors.get(int(label_id)) or derived_color(int(label_id))

    def valid_args_text(self) -> str:
        """The card's "Valid args are:" value: ``None``, ``'a'``, or ``'a', 'b', or 'c'``."""
        if not self.args:
            return "None"
        quoted = [f"'{a}'" for a in self.args]
        if len(quoted) == 1:
            return quoted[0]
        return ", ".join(quoted[:-1]) + ", or " + quoted[-1]

    def card_line(self, template: str) -> str:
        """This expert's line of the model card, from the card's line template."""
        return template.format(
            name=self.name,
            modality=self.modality,
            task=self.task,
            overview=self.overview,
            accuracy=self.accuracy,
            valid_args=self.valid_args_text(),
        )

    def resolve_argument(self, arg: str | None) -> ResolvedArgument:
        """What a trigger argument means for this expert.

        Matching rules: surrounding whitespace and one pair of surrounding quotes (``'``, ``"``, a
        backquote) are dropped, runs of whitespace count as one space, and case is ignored
        (``"  'Hepatic  Tumor' "`` is ``hepatic tumor``). None, ``""`` and the word ``None`` mean "no
        argument": the default argument (VISTA3D: ``everything``), or nothing for BRATS/CXR.
        Aliases (``hepatoma``) resolve to their argument.

        Raises:
            UnknownArgument: the argument is not valid (an expert without arguments rejects any).
        """
        key = normalize_argument(arg)
        if key is None:
            if self.default_arg is None:
                return ResolvedArgument(group=None, label_ids=(), labels=MappingProxyType(self.ids_by_name))
            key = self.default_arg
        if not self.args:
            raise UnknownArgument(self.name, str(arg).strip(), ())
        group = self._argument_lookup.get(key.casefold())
        if group is None:
            raise UnknownArgument(self.name, str(arg).strip(), self.args, self.aliases)
        members = self.groups[group]
        return ResolvedArgument(
            group=group, label_ids=tuple(members.values()), labels=MappingProxyType(dict(members))
        )

    @property
    def class_names(self) -> tuple[str, ...]:
        """The label names a tool call may ask for one by one (``classes``), in id order: every label of the
        expert's table when it takes label ids (``tool_classes``), else none."""
        return tuple(self.labels.values()) if self.tool_classes else ()

    def resolve_classes(self, names: Sequence[str]) -> ResolvedArgument:
        """What a list of class names means: their label ids (sorted, repeats removed) as the prompt, no group.

        Names match as arguments do (case, surrounding whitespace and quotes, inner runs of spaces).

        Raises:
            UnknownClass: no names, or names that are not classes of this expert (with the closest ones).
        """
        lookup = {name.casefold(): (name, i) for i, name in self.labels.items()} if self.tool_classes else {}
        found: dict[str, int] = {}
        unknown: list[str] = []
        for written in names:
            key = normalize_argument(written)
            hit = lookup.get(key.casefold()) if key else None
            if hit is None:
                unknown.append(str(written).strip())
            else:
                found[hit[0]] = hit[1]
        if unknown or not found:
            near = {name: tuple(lookup[close][0] for close in difflib.get_close_matches(name.casefold(), lookup, n=3))
                    for name in unknown}
            raise UnknownClass(self.name, tuple(unknown), near)
        ids = tuple(sorted(set(found.values())))
        return ResolvedArgument(group=None, label_ids=ids,
                                labels=MappingProxyType({self.labels[i]: i for i in ids}))

    @cached_property
    def _argument_lookup(self) -> dict[str, str]:
        """``{casefolded argument or alias: argument}``."""
        lookup = {a.casefold(): a for a in self.args}
        lookup.update({alias.casefold(): target for alias, target in self.aliases.items()})
        return lookup


def normalize_argument(arg: str | None) -> str | None:
    """Trim whitespace and one pair of surrounding quotes, collapse inner whitespace; None if nothing is left.

    The literal ``None`` (any case) also counts as no argument, as the card shows ``Valid args are: None``.
    """
    if arg is None:
        return None
    text = arg.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in _QUOTES:
        text = text[1:-1].strip()
    text = " ".join(text.split())
    if not text or text.casefold() == "none":
        return None
    return text


@dataclass(frozen=True, eq=False)
class ExpertRegistry:
    """All configured experts, and which of them are usable now.

    Attributes:
        configured: every configured expert, in card order (usable or not).
        unavailable: ``{name: reason}`` of configured experts that may not be used now.
        card: the card's fixed texts.
    """

    configured: tuple[ExpertSpec, ...]
    unavailable: Mapping[str, str]
    card: CardFormat

    @classmethod
    def from_config(
        cls,
        config: dict[str, Any] | None = None,
        available: Callable[[ExpertSpec], str | None] | None = None,
        experts_files: list[str | os.PathLike[str]] | tuple[str | os.PathLike[str], ...] | None = None,
    ) -> ExpertRegistry:
        """Build the registry from a parsed experts config.

        Args:
            config: the parsed ``experts.yaml``; None reads it from the configs folder. Table files it
                names (``classes_file``, ``groups_file``) are read from the configs folder.
            experts_files: extra experts files whose ``experts`` are appended (see the module doc); None:
                those of ``$VILA_M3_EXPERTS`` when ``config`` is None, else none.
            available: called once per expert; returns None when the expert is usable, else the reason
                it is not (e.g. "weights vista3d are not staged"). An exception counts as unavailable
                with its message. None: every configured expert is usable.

        Raises:
            ConfigError: an entry is missing a field or is inconsistent (the message names it).
        """
        if experts_files is None and config is None:
            experts_files = env_experts_files()
        if config is None:
            config = load_config(EXPERTS_CONFIG)
        if not isinstance(config, Mapping):
            raise ConfigError("the experts config must be a mapping with 'card' and 'experts'")
        card = _parse_card(config.get("card"))
        entries = config.get("experts")
        if not isinstance(entries, list) or not entries:
            raise ConfigError("the experts config needs a non-empty list 'experts'")
        specs = tuple(_parse_expert(entry, index) for index, entry in enumerate(entries))
        for path in experts_files or ():
            specs += _read_experts_file(Path(path), len(specs))
        names = [spec.name for spec in specs]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ConfigError(f"expert names must be unique; repeated: {', '.join(duplicates)}")
        unavailable: dict[str, str] = {}
        if available is not None:
            for spec in specs:
                try:
                    reason = available(spec)
                except Exception as err:  # a broken check must not take the other experts down
                    reason = f"availability check failed: {type(err).__name__}: {err}"
                if reason is not None:
                    unavailable[spec.name] = str(reason) or "unavailable"
        return cls(configured=specs, unavailable=MappingProxyType(unavailable), card=card)

    @property
    def experts(self) -> tuple[ExpertSpec, ...]:
        """The usable experts, in card order."""
        return tuple(spec for spec in self.configured if spec.name not in self.unavailable)

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the usable experts, in card order."""
        return tuple(spec.name for spec in self.experts)

    def is_configured(self, name: str) -> bool:
        """Whether ``name`` (case-sensitive) is a configured expert, usable or not."""
        return any(spec.name == name for spec in self.configured)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names

    def get(self, name: str) -> ExpertSpec:
        """The usable expert called ``name`` (case-sensitive, as written in triggers).

        Raises:
            UnknownExpert: (a KeyError) not configured, or configured but unavailable; the message
                lists the usable names and, for an unavailable one, the reason.
        """
        for spec in self.experts:
            if spec.name == name:
                return spec
        valid = ", ".join(self.names) or "none"
        if name in self.unavailable:
            raise UnknownExpert(
                f"expert {name!r} is not available ({self.unavailable[name]}); usable experts: {valid}"
            )
        raise UnknownExpert(f"unknown expert {name!r}; usable experts: {valid}")

    def configured_spec(self, name: str) -> ExpertSpec:
        """The configured expert called ``name`` whether usable or not; UnknownExpert if not configured."""
        for spec in self.configured:
            if spec.name == name:
                return spec
        raise UnknownExpert(
            f"unknown expert {name!r}; configured experts: {', '.join(s.name for s in self.configured)}"
        )

    def runner_class(self, name: str) -> type:
        """The runner class of the configured expert ``name``, imported now.

        Raises:
            UnknownExpert: not configured. ConfigError: no runner, or its class cannot be imported or is
                not an expert runner (the message names the expert and the class).
        """
        from vila_m3.experts.runner import load_runner_class  # imports the runner module only when asked

        return load_runner_class(self.configured_spec(name))

    @staticmethod
    def runner_class_of(spec: ExpertSpec) -> type:
        """The runner class of ``spec``, imported now (ConfigError as :meth:`runner_class`)."""
        from vila_m3.experts.runner import load_runner_class

        return load_runner_class(spec)

    def with_expert_tasks(self, catalogue: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
        """The server's task catalogue (``configs/app.yaml`` tasks) plus one infer task per configured expert with
        a runner that no task names: the expert's name in lower case, described by its card overview (the
        experts of an extra experts file)."""
        named = {task.get("expert") for task in catalogue.values()}
        extra = {spec.name.lower(): {"description": f"{spec.name}: {spec.overview}", "expert": spec.name}
                 for spec in self.configured
                 if spec.runner and spec.name not in named and spec.name.lower() not in catalogue}
        return {**{name: dict(task) for name, task in catalogue.items()}, **extra}

    def model_card(self) -> str:
        """The model card text for the first user turn: only usable experts, in config order.

        With the four default experts usable this is, byte for byte, the card of EXPERT_PROTOCOL.md §1
        (it ends with a newline). With none usable it is the empty string: no card is better than a
        card listing nothing.
        """
        experts = self.experts
        if not experts:
            return ""
        return (
            self.card.header + "".join(spec.card_line(self.card.line) for spec in experts) + self.card.footer
        )


# --------------------------------------------------------------------------------------------- parsing


def _read_experts_file(path: Path, first_index: int) -> tuple[ExpertSpec, ...]:
    """The experts of an extra experts file, with its ``python_path`` folders resolved against its folder."""
    where = f"experts file {path.name}"
    try:
        raw = load_config(path.resolve())
    except (FileNotFoundError, ValueError) as err:
        raise ConfigError(f"{where}: {err}") from err
    entries = raw.get("experts")
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where} needs a non-empty list 'experts'")
    unknown = sorted(set(raw) - {"experts", "python_path", "models"})
    if unknown:
        raise ConfigError(f"{where}: unknown keys {', '.join(unknown)} (an extra file has 'experts', "
                          "'python_path' and 'models'; the card is experts.yaml's)")
    folders = _str_list(raw.get("python_path"), f"{where}: python_path")
    python_path = tuple(str((path.resolve().parent / folder).resolve()) for folder in folders)
    return tuple(_parse_expert(entry, first_index + index, python_path) for index, entry in enumerate(entries))


def _parse_card(raw: Any) -> CardFormat:
    if not isinstance(raw, Mapping):
        raise ConfigError("the experts config needs a 'card' mapping with header, line and footer")
    values = {}
    for key in ("header", "line", "footer"):
        value = raw.get(key)
        if not isinstance(value, str):
            raise ConfigError(f"card.{key} must be a string")
        values[key] = value
    try:
        values["line"].format(name="", modality="", task="", overview="", accuracy="", valid_args="")
    except (KeyError, IndexError, ValueError) as err:
        raise ConfigError(f"card.line is not a valid template: {err}") from err
    return CardFormat(**values)


def _text(entry: Mapping[str, Any], key: str, where: str) -> str:
    value = entry.get(key)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{where}: '{key}' must be a non-empty string")
    return value


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{where} must be a list of non-empty strings")
    if len(set(value)) != len(value):
        raise ConfigError(f"{where} has repeated entries")
    return tuple(value)


def _parse_labels(raw: Any, where: str) -> dict[int, str]:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping of label id to name")
    labels: dict[int, str] = {}
    for key, name in raw.items():
        try:
            label_id = int(key)
        except (TypeError, ValueError) as err:
            raise ConfigError(f"{where}: label id {key!r} is not an integer") from err
        if not isinstance(name, str) or not name:
            raise ConfigError(f"{where}: label {label_id} needs a name")
        if label_id < 0:
            raise ConfigError(f"{where}: label id {label_id} is negative")
        if label_id != 0:  # 0 is the background
            labels[label_id] = name
    names = list(labels.values())
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}: label names must be unique; repeated: {', '.join(repeated)}")
    return dict(sorted(labels.items()))


def _parse_rgb(value: Any, where: str) -> RGB:
    if (
        not isinstance(value, list | tuple)
        or len(value) != 3
        or not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in value)
    ):
        raise ConfigError(f"{where} must be three integers 0..255, got {value!r}")
    return (value[0], value[1], value[2])


def _parse_expert(entry: Any, index: int, python_path: tuple[str, ...] = ()) -> ExpertSpec:
    if not isinstance(entry, Mapping):
        raise ConfigError(f"experts[{index}] must be a mapping")
    name = entry.get("name")
    if not isinstance(name, str) or not _NAME_RE.match(name):
        raise ConfigError(
            f"experts[{index}]: 'name' must be letters, digits or '_', starting with a letter; got {name!r}"
        )
    where = f"expert {name}"
    modality, task = _text(entry, "modality", where), _text(entry, "task", where)
    overview, accuracy = _text(entry, "overview", where), _text(entry, "accuracy", where)

    input_modality = entry.get("input_modality")
    if input_modality not in INPUT_MODALITIES:
        raise ConfigError(
            f"{where}: input_modality must be one of {', '.join(INPUT_MODALITIES)}, got {input_modality!r}"
        )
    runner = entry.get("runner")
    if runner is not None and (not isinstance(runner, str) or not _RUNNER_RE.match(runner)):
        raise ConfigError(f"{where}: runner must be a class as package.module:Class, or null; got {runner!r}")
    output = entry.get("output")
    if output not in OUTPUT_KINDS:
        raise ConfigError(f"{where}: output must be one of {', '.join(OUTPUT_KINDS)}, got {output!r}")
    feedback = entry.get("feedback", "none")
    if feedback not in FEEDBACK_KINDS:
        raise ConfigError(f"{where}: feedback must be one of {', '.join(FEEDBACK_KINDS)}, got {feedback!r}")
    weights = _str_list(entry.get("weights"), f"{where}: weights")
    tool_classes = entry.get("tool_classes")
    if tool_classes is not None and (not isinstance(tool_classes, str) or not tool_classes):
        raise ConfigError(f"{where}: tool_classes must name an /infer parameter")

    # labels, subclasses, groups
    labels: dict[int, str] = {}
    subclasses: dict[int, tuple[int, ...]] = {}
    groups: dict[str, dict[str, int]] = {}
    everything_ids: list[int] | None = None
    if "classes_file" in entry:
        table = load_config(_text(entry, "classes_file", where))
        labels = _parse_labels(table.get("classes"), f"{where}: {entry['classes_file']} classes")
        if "everything_label_ids" in table:
            everything_ids = [int(i) for i in table["everything_label_ids"]]
        for key, ids in (table.get("subclass") or {}).items():
            subclasses[int(key)] = tuple(int(i) for i in ids)
    if "labels" in entry:
        if labels:
            raise ConfigError(f"{where}: give either 'labels' or 'classes_file', not both")
        labels = _parse_labels(entry["labels"], f"{where}: labels")
    names_to_ids = {n: i for i, n in labels.items()}

    raw_groups: Mapping[str, Any] = {}
    if "groups_file" in entry:
        raw_groups = load_config(_text(entry, "groups_file", where)).get("groups") or {}
    if "groups" in entry:
        raw_groups = {**raw_groups, **entry["groups"]}
    for group, members in raw_groups.items():
        if not isinstance(members, Mapping) or not members:
            raise ConfigError(f"{where}: group {group!r} must map label names to ids")
        parsed: dict[str, int] = {}
        for label_name, label_id in members.items():
            if (
                not isinstance(label_id, int)
                or isinstance(label_id, bool)
                or labels.get(label_id) != label_name
            ):
                raise ConfigError(
                    f"{where}: group {group!r} lists {label_name!r} = {label_id}, "
                    f"but label {label_id} is {labels.get(label_id)!r}"
                )
            parsed[label_name] = label_id
        groups[str(group)] = parsed
    if everything_ids is not None:
        missing = [i for i in everything_ids if i not in labels]
        if missing:
            raise ConfigError(f"{where}: everything_label_ids has ids without a class name: {missing}")
        groups[EVERYTHING] = {labels[i]: i for i in sorted(everything_ids)}

    # arguments
    args = _str_list(entry.get("args"), f"{where}: args")
    for arg in args:
        if arg not in groups:
            raise ConfigError(f"{where}: argument {arg!r} has no label group")
    default_arg = entry.get("default_arg")
    if default_arg is not None and default_arg not in args:
        raise ConfigError(f"{where}: default_arg {default_arg!r} is not one of its args")
    aliases_raw = entry.get("aliases") or {}
    if not isinstance(aliases_raw, Mapping):
        raise ConfigError(f"{where}: aliases must map alias to argument")
    aliases: dict[str, str] = {}
    for alias, target in aliases_raw.items():
        if target not in args:
            raise ConfigError(f"{where}: alias {alias!r} points to {target!r}, which is not one of its args")
        if str(alias).casefold() in {a.casefold() for a in args}:
            raise ConfigError(f"{where}: alias {alias!r} is already an argument")
        aliases[str(alias)] = target

    # colours
    colors_raw = entry.get("display_colors") or {}
    if not isinstance(colors_raw, Mapping):
        raise ConfigError(f"{where}: display_colors must map label names to RGB")
    display_colors = {label_id: derived_color(label_id) for label_id in labels}
    for label_name, rgb in colors_raw.items():
        if label_name not in names_to_ids:
            raise ConfigError(f"{where}: display_colors names {label_name!r}, which is not one of its labels")
        display_colors[names_to_ids[label_name]] = _parse_rgb(rgb, f"{where}: display_colors[{label_name!r}]")

    # classification
    classification = None
    if "classification" in entry:
        classification = _parse_classification(entry["classification"], weights, where)
    if output == "classification" and classification is None and runner is not None:
        raise ConfigError(f"{where}: a classification expert needs a 'classification' section")

    return ExpertSpec(
        name=name,
        modality=modality,
        task=task,
        overview=overview,
        accuracy=accuracy,
        input_modality=input_modality,
        runner=runner,
        weights=weights,
        output=output,
        feedback=feedback,
        args=args,
        default_arg=default_arg,
        aliases=MappingProxyType(aliases),
        labels=MappingProxyType(labels),
        groups=MappingProxyType({g: MappingProxyType(m) for g, m in groups.items()}),
        subclasses=MappingProxyType(subclasses),
        display_colors=MappingProxyType(display_colors),
        classification=classification,
        python_path=python_path,
        tool_classes=tool_classes,
    )


def _parse_classification(raw: Any, weights: tuple[str, ...], where: str) -> ClassificationSpec:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: classification must be a mapping")
    pathologies = _str_list(raw.get("pathologies"), f"{where}: classification.pathologies")
    if not pathologies:
        raise ConfigError(f"{where}: classification.pathologies is empty")
    threshold = raw.get("threshold", 0.5)
    if not isinstance(threshold, int | float) or isinstance(threshold, bool) or not 0.0 <= threshold <= 1.0:
        raise ConfigError(f"{where}: classification.threshold must be a number in [0, 1]")
    voting_raw = raw.get("voting") or {}
    if not isinstance(voting_raw, Mapping):
        raise ConfigError(f"{where}: classification.voting must map a class to model ids")
    voting: dict[str, tuple[str, ...]] = {}
    for pathology, voters in voting_raw.items():
        if pathology not in pathologies:
            raise ConfigError(f"{where}: classification.voting names {pathology!r}, which is not a pathology")
        voter_ids = _str_list(voters, f"{where}: classification.voting[{pathology!r}]")
        strangers = [v for v in voter_ids if v not in weights]
        if not voter_ids or strangers:
            raise ConfigError(
                f"{where}: classification.voting[{pathology!r}] must be a non-empty subset of its weights; not weights: {strangers}"
            )
        voting[pathology] = voter_ids
    if not weights:
        raise ConfigError(f"{where}: a classification ensemble needs weights")
    complete = {p: voting.get(p, weights) for p in pathologies}
    return ClassificationSpec(
        pathologies=pathologies, voting=MappingProxyType(complete), threshold=float(threshold)
    )
