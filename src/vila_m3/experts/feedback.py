"""The texts that carry an expert's result back to the model (EXPERT_PROTOCOL.md §3), to the byte.

Each text is the expert part of the next user turn. ``question`` is the user's original question,
verbatim; pass None when the answer was segmentation-only (``TriggerScan.segmented_only``): the text
then stops after the result, without the instruction to answer again.

Segmentation texts contain one ``<image>`` placeholder, which stands for the overlay of the labelmap
on the slice the model saw. The colour names in the text are those the overlay uses: labels present
on that slice, ranked by ascending id, coloured along ``colors.OVERLAY_COLOR_NAMES`` (see
``colors.py`` for the matching ``label2rgb`` call). Always compute ``present_ids`` from the same 2D
label slice that is rendered (``colors.present_labels``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from vila_m3.experts.colors import slice_label_colors
from vila_m3.experts.registry import ExpertSpec

IMAGE_TOKEN = "<image>"
SEGMENTATION_INSTRUCTION = "Use this result to respond to this prompt:\n"
CLASSIFICATION_INSTRUCTION = (
    "Analyze the image and take these predictions into account when responding to this prompt:\n"
)
ERROR_PREFIX = "Sorry I met an error: "
NO_STRUCTURE_TEXT = "nothing, as no segmented structure is on this slice"
NO_TUMOR_TEXT = "nothing, as no tumor is on this slice"
BRATS_TUMOR_CORE, BRATS_EDEMA, BRATS_ENHANCING = 1, 2, 4


def segmentation_feedback(
    present_ids: Iterable[int], label_names: Mapping[int, str], question: str | None
) -> str:
    """Result text of a labelmap (VISTA3D).

    Example: ``"The results are <image>. The colors in this image describe red: liver, blue: hepatic
    tumor. Use this result to respond to this prompt:\\n" + question``.

    Args:
        present_ids: label ids present on the rendered slice (background 0 ignored).
        label_names: ``{label id: name}``; an id without a name is called ``label <id>``.
        question: the original question, or None for segmentation-only answers.

    A slice without any label says ``describe nothing, as no segmented structure is on this slice.``
    (the protocol leaves that case open).
    """
    colors = slice_label_colors(present_ids)
    items = ", ".join(
        f"{color}: {label_names.get(label_id, f'label {label_id}')}" for label_id, color in colors.items()
    )
    text = f"The results are {IMAGE_TOKEN}. The colors in this image describe {items or NO_STRUCTURE_TEXT}. "
    return _finish(text, SEGMENTATION_INSTRUCTION, question)


def brats_feedback(present_ids: Iterable[int], question: str | None) -> str:
    """Result text of a BRATS labelmap (1 tumor core, 2 edema, 4 enhancing tumor).

    With all three labels on the slice (colours red, blue, yellow by rank)::

        The results are <image>. The colors in this image describe
        red and yellow: tumor core, only yellow: enhancing tumor, all colors: whole tumor
        Use this result to respond to this prompt:
        {question}

    Parts whose labels are absent are left out; with label 1 but no 4 the text says
    ``{c1}: tumor core, ``; a slice without tumour says ``nothing, as no tumor is on this slice``.
    """
    colors = slice_label_colors(present_ids)
    core, enhancing = colors.get(BRATS_TUMOR_CORE), colors.get(BRATS_ENHANCING)
    text = f"The results are {IMAGE_TOKEN}. The colors in this image describe\n"
    if core and enhancing:
        text += f"{core} and {enhancing}: tumor core, "
    elif core:
        text += f"{core}: tumor core, "
    if enhancing:
        text += f"only {enhancing}: enhancing tumor, "
    if colors:
        text += "all colors: whole tumor\n"
    else:
        text += NO_TUMOR_TEXT + "\n"
    return _finish(text, SEGMENTATION_INSTRUCTION, question)


def classification_feedback(
    predictions: Mapping[str, float | bool], question: str | None, threshold: float = 0.5
) -> str:
    """Result text of a classifier (CXR).

    Example (two classes)::

        The resulting predictions are:
        effusion: no
        pleural thickening: yes
        . Analyze the image and take these predictions into account when responding to this prompt:
        {question}

    Names are lower-cased with ``_`` replaced by a space and sorted; a probability ``>= threshold``
    (or True) is ``yes``, anything else (including NaN) ``no``. The last line starts with ``.`` and,
    when there is a question, continues with one space and the instruction, as in the training data.

    Args:
        predictions: ``{class name: probability in [0, 1] or bool}``.
        question: the original question, or None for no instruction (then the text ends with ``.``).
        threshold: probability at or above which a class is ``yes``.
    """
    lines = []
    for name, value in predictions.items():
        if isinstance(value, bool):
            positive = value
        else:
            probability = float(value)
            positive = not math.isnan(probability) and probability >= threshold
        lines.append((name.lower().replace("_", " "), "yes" if positive else "no"))
    body = "".join(f"{name}: {answer}\n" for name, answer in sorted(lines))
    text = "The resulting predictions are:\n" + body + "."
    if question is None:
        return text
    return text + " " + CLASSIFICATION_INSTRUCTION + question


def error_feedback(message: str) -> str:
    """Text returned in place of a result when an expert failed: ``Sorry I met an error: {message}``."""
    return ERROR_PREFIX + message


def expert_feedback(
    spec: ExpertSpec,
    question: str | None,
    present_ids: Iterable[int] | None = None,
    predictions: Mapping[str, float | bool] | None = None,
) -> str:
    """The result text for ``spec``'s feedback kind.

    Args:
        spec: the expert that ran.
        question: the original question, or None for segmentation-only answers.
        present_ids: segmentation experts: label ids present on the rendered slice.
        predictions: classification experts: ``{class: probability}``.

    Raises:
        ValueError: the input the kind needs is missing, or the expert has no feedback text.
    """
    if spec.feedback == "label_colors":
        if present_ids is None:
            raise ValueError(f"{spec.name}: segmentation feedback needs the label ids present on the slice")
        return segmentation_feedback(present_ids, spec.labels, question)
    if spec.feedback == "tumor_regions":
        if present_ids is None:
            raise ValueError(f"{spec.name}: tumor region feedback needs the label ids present on the slice")
        return brats_feedback(present_ids, question)
    if spec.feedback == "predictions":
        if predictions is None:
            raise ValueError(f"{spec.name}: classification feedback needs the predictions")
        threshold = spec.classification.threshold if spec.classification else 0.5
        return classification_feedback(predictions, question, threshold)
    raise ValueError(f"{spec.name} has no result text (feedback: {spec.feedback})")


def _finish(result: str, instruction: str, question: str | None) -> str:
    """``result + instruction + question``; without a question, the result with trailing whitespace removed."""
    if question is None:
        return result.rstrip()
    return result + instruction + question
