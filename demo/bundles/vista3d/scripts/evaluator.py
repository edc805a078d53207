"""Evaluator of the VISTA3D stand-in bundle (``evaluator`` in configs/inference.json).

Runs user prompts only: ``label_prompt`` (a list of class ids) from the input dict, or, when none is
given, ``hyper_kwargs["everything_labels"]``. Point prompts are not supported by the stand-in.
"""

from __future__ import annotations

import torch
from monai.engines import SupervisedEvaluator
from monai.engines.utils import IterationEvents
from monai.transforms import reset_ops_id
from monai.utils.enums import CommonKeys


class Vista3dEvaluator(SupervisedEvaluator):
    def __init__(self, *args, hyper_kwargs=None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.hyper_kwargs = dict(hyper_kwargs or {})

    def _iteration(self, engine, batchdata):
        if batchdata is None:
            raise ValueError("no batch data")
        if batchdata.get("points") is not None:
            raise NotImplementedError("the VISTA3D stand-in bundle takes label prompts only")
        prompt = batchdata.get("label_prompt")
        if prompt is None:
            prompt = self.hyper_kwargs.get("everything_labels")
        if prompt is None:
            raise ValueError("a label_prompt is needed")
        inputs = batchdata[CommonKeys.IMAGE].to(engine.state.device)
        ids = torch.as_tensor([int(v) for v in torch.as_tensor(prompt).reshape(-1)], device=inputs.device)
        class_vector = ids.unsqueeze(-1)
        engine.state.output = {CommonKeys.IMAGE: inputs, CommonKeys.LABEL: None}
        with engine.mode(engine.network):
            if engine.amp and inputs.device.type == "cuda":
                with torch.autocast("cuda", **engine.amp_kwargs):
                    pred = engine.inferer(inputs=inputs, network=engine.network, class_vector=class_vector)
            else:
                pred = engine.inferer(inputs=inputs, network=engine.network, class_vector=class_vector)
        reset_ops_id(inputs)  # Invertd undoes the preprocessing with a copy of those transforms
        engine.state.output[CommonKeys.PRED] = pred
        engine.state.output["label_prompt"] = class_vector.unsqueeze(0)
        engine.fire_event(IterationEvents.FORWARD_COMPLETED)
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output
