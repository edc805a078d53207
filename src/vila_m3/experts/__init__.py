"""Expert models: the registry built from ``configs/experts.yaml``, the runner interface every expert
implements, the trigger grammar, the result texts.

Importing this package loads no model and needs no GPU; the runners live in their own modules.
"""

from vila_m3.experts.colors import (
    NAMED_COLORS_RGB,
    OVERLAY_COLOR_NAMES,
    OVERLAY_COLORS_RGB,
    RGB,
    derived_color,
    overlay_colors_float,
    present_labels,
    slice_label_colors,
    slice_legend,
)
from vila_m3.experts.feedback import (
    IMAGE_TOKEN,
    brats_feedback,
    classification_feedback,
    error_feedback,
    expert_feedback,
    segmentation_feedback,
)
from vila_m3.experts.registry import (
    CardFormat,
    ClassificationSpec,
    ConfigError,
    ExpertRegistry,
    ExpertSpec,
    ResolvedArgument,
    UnknownArgument,
    UnknownExpert,
    normalize_argument,
)
from vila_m3.experts.runner import BaseExpertRunner, ExpertRunner, ExpertStudy, NetworkExpertRunner, StudyView
from vila_m3.experts.triggers import DEFAULT_MAX_TRIGGERS, Trigger, TriggerScan, find_triggers

__all__ = [
    "DEFAULT_MAX_TRIGGERS",
    "IMAGE_TOKEN",
    "NAMED_COLORS_RGB",
    "OVERLAY_COLORS_RGB",
    "OVERLAY_COLOR_NAMES",
    "RGB",
    "BaseExpertRunner",
    "NetworkExpertRunner",
    "CardFormat",
    "ClassificationSpec",
    "ConfigError",
    "ExpertRegistry",
    "ExpertRunner",
    "ExpertSpec",
    "ExpertStudy",
    "ResolvedArgument",
    "StudyView",
    "Trigger",
    "TriggerScan",
    "UnknownArgument",
    "UnknownExpert",
    "brats_feedback",
    "classification_feedback",
    "derived_color",
    "error_feedback",
    "expert_feedback",
    "find_triggers",
    "normalize_argument",
    "overlay_colors_float",
    "present_labels",
    "segmentation_feedback",
    "slice_label_colors",
    "slice_legend",
]
