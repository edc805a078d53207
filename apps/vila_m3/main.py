"""The VILA-M3 MONAI Label app: ``monailabel start_server --app apps/vila_m3 --studies <folder>``.

A thin shell over the ``vila_m3`` package. App settings (``--conf KEY VALUE``):

- ``models``: ``all`` (default) or a comma list of infer tasks (``vila_m3``, ``vista3d``, ``brats``, ``cxr``);
- ``models_dir``: where weights are staged (default ``$VILA_M3_MODELS_DIR`` or ``./models``);
- ``vlm``: the VILA-M3 checkpoint of ``configs/models.yaml`` the chat task uses;
- ``expert_idle_release_s``: seconds after which an unused expert frees its weights (default 600; 0 = never).

A task whose weights are missing is not registered; the log says why, once, at start.
"""

from __future__ import annotations

import logging
import os

# Nothing is downloaded at run time: weights are staged beforehand.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from lib.infers import BratsInferTask, CxrInferTask, Vista3DInferTask
from monailabel.interfaces.app import MONAILabelApp
from monailabel.interfaces.tasks.infer_v2 import InferTask, InferType

import vila_m3
from vila_m3.experts.registry import ExpertRegistry
from vila_m3.experts.service import DEFAULT_IDLE_RELEASE_S, ExpertService
from vila_m3.models.manifest import resolve_models_dir
from vila_m3.tasks import TaskStatus, format_statuses, select_tasks, task_catalogue, task_statuses

logger = logging.getLogger(__name__)


class VilaM3App(MONAILabelApp):
    """VILA-M3 chat and its experts (VISTA3D, BRATS, CXR) as MONAI Label infer tasks."""

    def __init__(self, app_dir: str, studies: str, conf: dict[str, str]):
        self.models_dir = resolve_models_dir(conf.get("models_dir"))
        self.task_statuses: list[TaskStatus] = task_statuses(
            select_tasks(conf.get("models")), self.models_dir, vlm_id=conf.get("vlm")
        )
        logger.info("VILA-M3 infer tasks (models dir %s):\n%s", self.models_dir, format_statuses(self.task_statuses))
        super().__init__(
            app_dir=app_dir,
            studies=studies,
            conf=conf,
            name="VILA-M3",
            description="VILA-M3 medical vision-language chat that calls expert models on the whole volume",
            version=vila_m3.__version__,
        )

    def init_infers(self) -> dict[str, InferTask]:
        """The infer tasks whose weights are staged."""
        available = {status.name for status in self.task_statuses if status.available}
        registry = ExpertRegistry.from_config()
        self.experts = ExpertService(
            self.models_dir,
            registry=registry,
            idle_release_s=float(self.conf.get("expert_idle_release_s", DEFAULT_IDLE_RELEASE_S)),
        )
        catalogue = task_catalogue()
        infers: dict[str, InferTask] = {}
        for name in available:
            task = catalogue[name]
            if not task.get("expert"):
                logger.warning("%s: weights are staged, but this version has no infer task for it yet", name)
                continue
            spec = registry.configured_spec(task["expert"])
            description = str(task.get("description", ""))
            if spec.runner == "vista3d":
                infers[name] = Vista3DInferTask(self.experts, spec, InferType.SEGMENTATION, 3, description)
            elif spec.runner == "brats":
                infers[name] = BratsInferTask(self.experts, spec, self.datastore(), description)
            elif spec.runner == "cxr":
                infers[name] = CxrInferTask(self.experts, spec, description)
        return infers
