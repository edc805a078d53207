"""Tests of the result texts sent back to the model and of the overlay colours they name."""

from __future__ import annotations

import numpy as np
import pytest

from vila_m3.experts import (
    NAMED_COLORS_RGB,
    OVERLAY_COLOR_NAMES,
    OVERLAY_COLORS_RGB,
    ExpertRegistry,
    brats_feedback,
    classification_feedback,
    error_feedback,
    expert_feedback,
    overlay_colors_float,
    present_labels,
    segmentation_feedback,
    slice_label_colors,
    slice_legend,
)

XRV_PATHOLOGIES = (
    "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
    "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
    "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
)  # fmt: skip


@pytest.fixture(scope="module")
def registry() -> ExpertRegistry:
    return ExpertRegistry.from_config()


# ------------------------------------------------------------------------------------------ colours


def test_overlay_cycle_names_and_matplotlib_values():
    assert OVERLAY_COLOR_NAMES == (
        "red", "blue", "yellow", "magenta", "green", "indigo", "darkorange", "cyan",
        "pink", "brown", "orange", "lime", "orange", "gold", "yellowgreen", "darkgreen",
    )  # fmt: skip
    assert OVERLAY_COLORS_RGB[:6] == (
        (255, 0, 0),
        (0, 0, 255),
        (255, 255, 0),
        (255, 0, 255),
        (0, 128, 0),
        (75, 0, 130),
    )
    assert NAMED_COLORS_RGB["darkorange"] == (255, 140, 0)
    assert NAMED_COLORS_RGB["pink"] == (255, 192, 203)
    assert NAMED_COLORS_RGB["brown"] == (165, 42, 42)
    assert NAMED_COLORS_RGB["orange"] == (255, 165, 0)
    assert NAMED_COLORS_RGB["lime"] == (0, 255, 0)
    assert NAMED_COLORS_RGB["gold"] == (255, 215, 0)
    assert NAMED_COLORS_RGB["yellowgreen"] == (154, 205, 50)
    assert NAMED_COLORS_RGB["darkgreen"] == (0, 100, 0)
    assert OVERLAY_COLORS_RGB[10] == OVERLAY_COLORS_RGB[12] == (255, 165, 0)
    floats = overlay_colors_float()
    assert len(floats) == 16 and floats[1] == (0.0, 0.0, 1.0) and floats[4][1] == pytest.approx(128 / 255)


def test_colors_follow_the_rank_of_present_labels():
    assert slice_label_colors([26, 1]) == {1: "red", 26: "blue"}
    assert slice_label_colors([0, 5, 5, 3]) == {3: "red", 5: "blue"}
    many = slice_label_colors(range(1, 19))
    assert many[16] == "darkgreen" and many[17] == "red" and many[18] == "blue"
    assert slice_label_colors([]) == {}


def test_present_labels_of_a_slice():
    label_slice = np.zeros((4, 5), dtype=np.uint8)
    label_slice[1, 1] = 26
    label_slice[2, 3] = 1
    assert present_labels(label_slice) == [1, 26]
    assert present_labels(np.zeros((3, 3))) == []


def test_legend_pairs_names_colours_and_rgb():
    legend = slice_legend([26, 1, 999], {1: "liver", 26: "hepatic tumor"})
    assert legend == [
        (1, "liver", "red", (255, 0, 0)),
        (26, "hepatic tumor", "blue", (0, 0, 255)),
        (999, "label 999", "yellow", (255, 255, 0)),
    ]


def test_overlay_painted_by_label2rgb_has_the_colours_the_text_names():
    color = pytest.importorskip("skimage.color")
    label_slice = np.zeros((6, 6), dtype=np.int32)
    label_slice[0, :] = 7
    label_slice[2, :] = 30
    label_slice[4, :] = 130
    grey = np.full((6, 6), 0.5)
    overlay = color.label2rgb(
        label_slice, image=grey, colors=overlay_colors_float(), bg_label=0, bg_color=None, alpha=1.0
    )
    named = slice_label_colors(present_labels(label_slice))
    for label_id, name in named.items():
        painted = overlay[label_slice == label_id][0]
        assert tuple(np.round(painted * 255).astype(int)) == NAMED_COLORS_RGB[name], label_id
    assert np.allclose(overlay[1, 0], 0.5)  # background left grey


# ------------------------------------------------------------------------------------------ segmentation


def test_segmentation_feedback_exact_text():
    text = segmentation_feedback([1, 26], {1: "liver", 26: "hepatic tumor"}, "Is there a liver tumor?")
    assert text == (
        "The results are <image>. The colors in this image describe red: liver, blue: hepatic tumor. "
        "Use this result to respond to this prompt:\nIs there a liver tumor?"
    )


def test_segmentation_feedback_uses_slice_ranks_not_label_ids(registry):
    vista = registry.get("VISTA3D")
    text = segmentation_feedback([3, 14, 5, 1], vista.labels, "Which organs?")
    assert text == (
        "The results are <image>. The colors in this image describe red: liver, blue: spleen, "
        "yellow: right kidney, magenta: left kidney. Use this result to respond to this prompt:\nWhich organs?"
    )


def test_segmentation_feedback_without_question_for_segmentation_only_answers():
    text = segmentation_feedback([1], {1: "liver"}, None)
    assert text == "The results are <image>. The colors in this image describe red: liver."


def test_segmentation_feedback_for_an_empty_slice():
    text = segmentation_feedback([], {1: "liver"}, "Q?")
    assert text == (
        "The results are <image>. The colors in this image describe nothing, as no segmented structure "
        "is on this slice. Use this result to respond to this prompt:\nQ?"
    )


# ------------------------------------------------------------------------------------------ BRATS


def test_brats_feedback_exact_text_with_all_labels():
    text = brats_feedback([1, 2, 4], "Where is the tumor?")
    assert text == (
        "The results are <image>. The colors in this image describe\n"
        "red and yellow: tumor core, only yellow: enhancing tumor, all colors: whole tumor\n"
        "Use this result to respond to this prompt:\nWhere is the tumor?"
    )


@pytest.mark.parametrize(
    ("present", "middle"),
    [
        ([1, 4], "red and blue: tumor core, only blue: enhancing tumor, all colors: whole tumor\n"),
        ([2, 4], "only blue: enhancing tumor, all colors: whole tumor\n"),
        ([1, 2], "red: tumor core, all colors: whole tumor\n"),
        ([2], "all colors: whole tumor\n"),
        ([], "nothing, as no tumor is on this slice\n"),
    ],
)
def test_brats_feedback_with_some_labels(present, middle):
    text = brats_feedback(present, "Q")
    assert text == (
        "The results are <image>. The colors in this image describe\n"
        + middle
        + "Use this result to respond to this prompt:\nQ"
    )


# ------------------------------------------------------------------------------------------ CXR


def test_classification_feedback_exact_text_for_the_18_pathologies():
    predictions = {name: 0.1 for name in XRV_PATHOLOGIES}
    predictions["Pleural_Thickening"] = 0.5
    predictions["Cardiomegaly"] = 0.93
    text = classification_feedback(predictions, "Is there cardiomegaly?")
    assert text == (
        "The resulting predictions are:\n"
        "atelectasis: no\n"
        "cardiomegaly: yes\n"
        "consolidation: no\n"
        "edema: no\n"
        "effusion: no\n"
        "emphysema: no\n"
        "enlarged cardiomediastinum: no\n"
        "fibrosis: no\n"
        "fracture: no\n"
        "hernia: no\n"
        "infiltration: no\n"
        "lung lesion: no\n"
        "lung opacity: no\n"
        "mass: no\n"
        "nodule: no\n"
        "pleural thickening: yes\n"
        "pneumonia: no\n"
        "pneumothorax: no\n"
        ". Analyze the image and take these predictions into account when responding to this prompt:\n"
        "Is there cardiomegaly?"
    )


def test_classification_feedback_threshold_bools_nan_and_no_question():
    text = classification_feedback({"Mass": 0.49999, "Edema": True, "Hernia": float("nan")}, None)
    assert text == "The resulting predictions are:\nedema: yes\nhernia: no\nmass: no\n."
    assert "mass: yes" in classification_feedback({"Mass": 0.3}, None, threshold=0.25)


# ------------------------------------------------------------------------------------------ errors and dispatch


def test_error_feedback():
    assert (
        error_feedback("VISTA3D ran out of GPU memory")
        == "Sorry I met an error: VISTA3D ran out of GPU memory"
    )


def test_expert_feedback_dispatches_on_the_configured_kind(registry):
    vista, brats, cxr = registry.get("VISTA3D"), registry.get("BRATS"), registry.get("CXR")
    assert expert_feedback(vista, "Q", present_ids=[26, 1]) == segmentation_feedback(
        [1, 26], vista.labels, "Q"
    )
    assert "liver" in expert_feedback(vista, "Q", present_ids=[1])
    assert expert_feedback(brats, "Q", present_ids=[1, 2, 4]) == brats_feedback([1, 2, 4], "Q")
    assert (
        expert_feedback(cxr, None, predictions={"Edema": 0.7})
        == "The resulting predictions are:\nedema: yes\n."
    )
    with pytest.raises(ValueError, match="predictions"):
        expert_feedback(cxr, "Q")
    with pytest.raises(ValueError, match="label ids"):
        expert_feedback(vista, "Q")
    with pytest.raises(ValueError, match="no result text"):
        expert_feedback(registry.get("VISTA2D"), "Q", present_ids=[1])
