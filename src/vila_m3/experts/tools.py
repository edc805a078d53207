"""Experts as OpenAI-compatible function tools, and tool calls back to expert requests.

:func:`expert_tools` builds the ``tools`` list of a chat request from the registry: one function per
available expert, named as the expert, described by its model-card fields (``configs/tools.yaml``),
with a JSON schema of its arguments: VISTA3D one optional string ``argument`` whose ``enum`` is its
card arguments (the label groups) or, instead, ``classes``: an array of its class names (an ``enum`` of
the 132 labels of its class table; for an expert whose entry names ``tool_classes``); BRATS and CXR an
empty object. Exactly one of ``argument`` and ``classes`` is meant (neither: the default argument).

:func:`resolve_tool_call` maps a call the model made (tool name, JSON arguments string) to the same
:class:`~vila_m3.experts.triggers.Trigger` the trigger parser gives for the text ``<VISTA3D(hepatic
tumor)>``: argument matching is the registry's (case, spaces, quotes and aliases as for triggers).
A ``classes`` call has no trigger in text (the trigger protocol takes groups only): its request carries
the classes' label ids as the prompt, no group, and an argument text naming the classes
(``classes: liver, spleen``), so it runs through the same runner and is never taken for a group.
A call that cannot run raises :class:`ToolCallError` whose message names the problem (unknown tool,
arguments that are not JSON or not an object, an argument the expert does not take, an unknown class
with the nearest class names); the chat loop sends it back to the model as the tool's result, as it
does for an expert failure.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from functools import lru_cache
from typing import Any

from vila_m3.configs import load_config
from vila_m3.experts.feedback import IMAGE_TOKEN
from vila_m3.experts.registry import ExpertRegistry, ExpertSpec, UnknownArgument, UnknownClass
from vila_m3.experts.triggers import Trigger

TOOLS_CONFIG = "tools.yaml"

__all__ = ["TOOLS_CONFIG", "ToolCallError", "classes_argument_text", "expert_tools", "overlay_message_text",
           "resolve_tool_call", "tool_argument_name", "tool_classes_name", "tool_result_text"]


class ToolCallError(ValueError):
    """A tool call that cannot run; the message is what the model is told (it names the problem)."""


@lru_cache(maxsize=1)
def _settings() -> dict[str, Any]:
    return load_config(TOOLS_CONFIG)


def tool_argument_name() -> str:
    """The name of the argument property (``argument``), from ``configs/tools.yaml``."""
    return str(_settings()["argument"]["name"])


def tool_classes_name() -> str:
    """The name of the class-list property (``classes``), from ``configs/tools.yaml``."""
    return str(_settings()["classes"]["name"])


def classes_argument_text(names: list[str] | tuple[str, ...]) -> str:
    """The argument text of a ``classes`` request (``classes: liver, spleen``): shown and kept with the result,
    never a card argument."""
    return str(_settings()["classes"]["as_argument"]).format(names=", ".join(names))


def _runnable(registry: ExpertRegistry) -> list[ExpertSpec]:
    """The experts a model may call: usable now and run by this product."""
    return [spec for spec in registry.experts if spec.runner is not None]


def _parameters(spec: ExpertSpec) -> dict[str, Any]:
    """The JSON schema of ``spec``'s arguments (an object; empty for experts without arguments)."""
    if not spec.takes_argument:
        return {"type": "object", "properties": {}, "additionalProperties": False}
    argument, classes = _settings()["argument"], _settings()["classes"]
    prop = {"type": "string", "enum": list(spec.args),
            "description": str(argument["description"]).format(default=spec.default_arg)}
    properties: dict[str, Any] = {str(argument["name"]): prop}
    if spec.class_names:
        prop["description"] += " " + str(classes["instead"]).format(classes=classes["name"])
        properties[str(classes["name"])] = {
            "type": "array", "items": {"type": "string", "enum": list(spec.class_names)}, "minItems": 1,
            "uniqueItems": True, "description": str(classes["description"]).format(argument=argument["name"])}
    schema: dict[str, Any] = {"type": "object", "properties": properties, "additionalProperties": False}
    if spec.default_arg is None and not spec.class_names:
        schema["required"] = [str(argument["name"])]
    return schema


def expert_tools(registry: ExpertRegistry) -> list[dict[str, Any]]:
    """The OpenAI ``tools`` list for ``registry``'s runnable experts, in card order.

    Each entry is ``{"type": "function", "function": {"name", "description", "parameters"}}``.
    """
    template = str(_settings()["description"])
    tools = []
    for spec in _runnable(registry):
        description = template.format(name=spec.name, modality=spec.modality, task=spec.task,
                                      overview=spec.overview.rstrip("."), accuracy=spec.accuracy,
                                      valid_args=spec.valid_args_text())
        tools.append({"type": "function",
                      "function": {"name": spec.name, "description": description, "parameters": _parameters(spec)}})
    return tools


def _arguments(name: str, arguments: str | Mapping[str, Any] | None) -> dict[str, Any]:
    """The call's arguments as a dict; ToolCallError when they are not a JSON object."""
    if arguments is None or (isinstance(arguments, str) and not arguments.strip()):
        return {}
    if isinstance(arguments, Mapping):
        return dict(arguments)
    try:
        parsed = json.loads(arguments)
    except ValueError as err:
        raise ToolCallError(f"the arguments of the {name} call are not valid JSON ({err})") from None
    if parsed is None:
        return {}
    if not isinstance(parsed, dict):
        raise ToolCallError(f"the arguments of the {name} call must be a JSON object, got {type(parsed).__name__}")
    return parsed


def resolve_tool_call(name: str, arguments: str | Mapping[str, Any] | None, registry: ExpertRegistry) -> Trigger:
    """The expert request a tool call stands for, as :func:`~vila_m3.experts.triggers.find_triggers` gives it.

    Args:
        name: the function name the model called (an expert name, case-sensitive).
        arguments: the call's JSON arguments string (a dict is taken as parsed; empty means ``{}``).
        registry: the experts; only usable experts with a runner may be called.

    Returns:
        A trigger with the canonical argument (``hepatic tumor`` for ``hepatoma``, ``everything`` for
        ``{}``, None for BRATS/CXR); ``span`` is ``(0, 0)``, ``raw`` is ``NAME(<arguments>)``. A
        ``classes`` call: ``resolved`` holds the classes' label ids and names with no group, and the
        argument is :func:`classes_argument_text` of the class names (table spelling, id order).

    Raises:
        ToolCallError: unknown or unavailable tool, malformed arguments, an argument not allowed.
    """
    usable = {spec.name: spec for spec in _runnable(registry)}
    spec = usable.get(name)
    if spec is None:
        listed = ", ".join(usable) or "none"
        if registry.is_configured(name) and name in registry.unavailable:
            raise ToolCallError(f"the tool {name} is not available ({registry.unavailable[name]}); tools: {listed}")
        raise ToolCallError(f"unknown tool {name!r}; the tools are: {listed}")
    values = _arguments(name, arguments)
    key, classes_key = tool_argument_name(), tool_classes_name()
    taken = {key, classes_key} if spec.class_names else {key}
    strangers = sorted(set(values) - taken)
    if strangers:
        takes = " or ".join(f"'{k}'" for k in sorted(taken, key=[key, classes_key].index))
        takes = f"only {takes}" if spec.takes_argument else "no arguments"
        raise ToolCallError(f"{name} does not take the argument(s) {', '.join(map(repr, strangers))}; it takes {takes}")
    raw = arguments if isinstance(arguments, str) else json.dumps(values)
    if values.get(classes_key) is not None:
        return _classes_call(spec, values, f"{name}({raw or ''})")
    value = values.get(key)
    if value is not None and not isinstance(value, str):
        raise ToolCallError(f"the '{key}' of {name} must be a string, got {type(value).__name__}")
    try:
        resolved = spec.resolve_argument(value)
    except UnknownArgument as err:
        if not err.valid:
            raise ToolCallError(f"{name} takes no argument, but got '{err.argument}'; call it with {{}}") from None
        raise ToolCallError(str(err)) from None
    return Trigger(name, resolved.group, (0, 0), f"{name}({raw or ''})", False, resolved)


def _classes_call(spec: ExpertSpec, values: Mapping[str, Any], raw: str) -> Trigger:
    """The request of a call with ``classes`` (ToolCallError: also an argument, not a list of names, unknown names)."""
    key, classes_key = tool_argument_name(), tool_classes_name()
    if values.get(key) not in (None, ""):
        raise ToolCallError(f"{spec.name}: give either '{key}' or '{classes_key}', not both")
    names = values[classes_key]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ToolCallError(f"{spec.name}: '{classes_key}' must be a non-empty list of class names")
    try:
        resolved = spec.resolve_classes(names)
    except UnknownClass as err:
        raise ToolCallError(str(err)) from None
    return Trigger(spec.name, classes_argument_text(tuple(resolved.labels)), (0, 0), raw, False, resolved)


def tool_result_text(feedback: str) -> str:
    """An expert's feedback text as a ``tool`` message carries it: ``<image>`` named in words (the
    overlay follows as a user message; tool messages hold text only)."""
    return feedback.replace(IMAGE_TOKEN, str(_settings()["result_image"]))


def overlay_message_text(name: str, call_id: str) -> str:
    """The text before an overlay image in the user message that follows the tool results."""
    return str(_settings()["overlay_message"]).format(name=name, call_id=call_id)
