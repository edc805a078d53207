"""Sliding-window inferer of the VISTA3D stand-in bundle (``inferer`` in configs/inference.json)."""

from __future__ import annotations

import torch
from monai.apps.vista3d.inferer import point_based_window_inferer
from monai.inferers import Inferer, SlidingWindowInfererAdapt


class Vista3dInferer(Inferer):
    """Class prompts: sliding windows over the whole image (``SlidingWindowInfererAdapt``, patch
    coordinates passed to the network). Point prompts with ``use_point_window``: windows around the
    points only (``point_based_window_inferer``). The network output is (1, B, H, W, D) logits.
    """

    def __init__(self, roi_size, overlap, use_point_window=False, sw_batch_size=1) -> None:
        super().__init__()
        self.roi_size = roi_size
        self.overlap = overlap
        self.use_point_window = use_point_window
        self.sw_batch_size = sw_batch_size

    def __call__(self, inputs, network, point_coords=None, point_labels=None, class_vector=None,
                 labels=None, label_set=None, prev_mask=None):
        prompt_class = None if class_vector is None else class_vector.clone()
        head = getattr(network, "point_head", None) or network.module.point_head
        if class_vector is not None and bool(torch.any(class_vector > head.last_supported)):
            class_vector = None  # classes the class head was not trained on go through the point head
        extra = dict(point_coords=point_coords, point_labels=point_labels, class_vector=class_vector,
                     prompt_class=prompt_class, prev_mask=prev_mask, labels=labels, label_set=label_set)
        if self.use_point_window and point_coords is not None:
            return point_based_window_inferer(
                inputs=inputs, roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, transpose=True,
                with_coord=True, predictor=network, mode="gaussian", sw_device=inputs.device,
                device=inputs.device, overlap=self.overlap, **extra)
        window = SlidingWindowInfererAdapt(
            roi_size=self.roi_size, sw_batch_size=self.sw_batch_size, overlap=self.overlap, with_coord=True)
        return window(inputs, network, transpose=True, **extra)
