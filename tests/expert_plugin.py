"""A toy expert written the way a site adds one: a runner module and an experts file in a folder outside
the repository (nothing of the repository changes). Used by the runner and plug-in tests.

The toy thresholds the CT in Hounsfield units: ``bone`` marks voxels >= 300 HU as label 1, ``air`` voxels
<= -500 HU as label 2, on the CT's own grid.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

TOY_NAME = "TOY"
BONE_HU, AIR_HU = 300.0, -500.0
TOY_OVERVIEW = "thresholds a CT in Hounsfield units (a plug-in example)"

RUNNER_MODULE = '''
"""A toy CT expert: a Hounsfield threshold, labels on the CT's grid."""

import numpy as np

from vila_m3.experts.result import SegmentationResult
from vila_m3.experts.runner import BaseExpertRunner, primary_volume
from vila_m3.imaging import labelmap_like

THRESHOLDS = {"bone": (1, lambda hu: hu >= 300.0), "air": (2, lambda hu: hu <= -500.0)}


class ThresholdExpert(BaseExpertRunner):
    """``bone``: label 1 where HU >= 300; ``air``: label 2 where HU <= -500."""

    def run(self, study, argument):
        volume = primary_volume(study)
        label_id, rule = THRESHOLDS[argument.group]
        labels = np.where(rule(np.asarray(volume.array, dtype=np.float32)), label_id, 0).astype(np.uint8)
        return SegmentationResult(labels=labelmap_like(volume, labels), label_names={label_id: argument.group},
                                  expert=self.spec.name, argument=argument.group)
'''

def toy_experts_text(name: str = TOY_NAME, runner: str = "toy_threshold:ThresholdExpert") -> str:
    """The experts file of the toy (another ``name`` / ``runner`` for the error cases)."""
    return f'''
python_path: [plugins]
experts:
  - name: {name}
    modality: "CT"
    task: "segmentation"
    overview: "{TOY_OVERVIEW}"
    accuracy: "exact by construction"
    args: [bone, air]
    default_arg: bone
    input_modality: CT
    runner: {runner}
    weights: []
    output: segmentation
    feedback: label_colors
    labels:
      1: bone
      2: air
    groups:
      bone: {{bone: 1}}
      air: {{air: 2}}
'''


def write_toy_expert(folder: Path, runner_source: str | None = RUNNER_MODULE, experts_text: str | None = None) -> Path:
    """Write the toy's runner module (``plugins/toy_threshold.py``; None: none) and experts file into ``folder``;
    returns the experts file's path."""
    (folder / "plugins").mkdir(parents=True, exist_ok=True)
    if runner_source is not None:
        (folder / "plugins" / "toy_threshold.py").write_text(textwrap.dedent(runner_source), encoding="utf-8")
    path = folder / "toy_experts.yaml"
    path.write_text(experts_text if experts_text is not None else toy_experts_text(), encoding="utf-8")
    return path


def expected_toy_labels(hu: np.ndarray, group: str) -> np.ndarray:
    """The toy's labelmap computed here, independently: (z, y, x) uint8."""
    hu = np.asarray(hu, dtype=np.float32)
    if group == "bone":
        return np.where(hu >= BONE_HU, 1, 0).astype(np.uint8)
    return np.where(hu <= AIR_HU, 2, 0).astype(np.uint8)
