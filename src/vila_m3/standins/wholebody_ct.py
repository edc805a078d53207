"""A stand-in of MONAI's ``wholeBody_ct_segmentation`` bundle with RANDOM weights, in the real bundle's layout.

Written (as the model zoo ships the bundle)::

    configs/inference.json   the real bundle's keys: displayable_configs (highres, sw_overlap, sw_batch_size),
                             pixdim and modelname chosen by highres, network_def, preprocessing, inferer,
                             postprocessing, evaluator, checkpointloader, initialize, run
    configs/metadata.json    the real version and the 105 output channels' names (channel_def), and the
                             ``vila_m3_stand_in`` field that marks it as a stand-in
    models/model.pt          the 1.5 mm network's state dict (random)
    models/model_lowres.pt   the 3.0 mm network's state dict (random, another seed)
    docs/README.md

What differs from the real bundle, on purpose: ``network_def`` is the same ``SegResNet`` (105 output channels,
the same blocks) with 8 initial filters instead of 32 (~0.3 M parameters instead of ~4.7 M), so that the sample
CT is segmented in seconds on two CPU cores. Transforms, spacing, sliding windows (96³, overlap 0.25, gaussian,
replicate padding) and post-processing are the real bundle's. The label names and the version come from
``configs/experts_wholebody_ct.yaml``, the expert's own config.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from vila_m3.configs import load_config
from vila_m3.standins.tiny_bundles import (
    STAND_IN_FIELD,
    STAND_IN_NOTE,
    _common_metadata,
    _save_random_network,
    _write_bundle,
)

__all__ = ["EXPERTS_FILE", "MODEL_ID", "make_stand_in_wholebody_ct_bundle", "wholebody_ct_inference_config"]

EXPERTS_FILE = "experts_wholebody_ct.yaml"
MODEL_ID = "wholebody_ct_segmentation"
EXPERT_NAME = "WholeBodyCT"
STAND_IN_FILTERS = 8  # the real network has 32


def _expert_config() -> tuple[dict[str, Any], dict[int, str]]:
    """The model entry and the label names (``{id: name}``, background 0 included) of the expert's config."""
    config = load_config(EXPERTS_FILE)
    entry = config["models"][MODEL_ID]
    expert = next(e for e in config["experts"] if e["name"] == EXPERT_NAME)
    labels = {0: "background", **{int(k): str(v) for k, v in expert["labels"].items()}}
    return entry, labels


def wholebody_ct_inference_config(init_filters: int = STAND_IN_FILTERS) -> dict[str, Any]:
    """``configs/inference.json`` of the stand-in: the real bundle's keys and transforms, ``init_filters``
    initial filters (32 writes the real network's size)."""
    _, labels = _expert_config()
    cuda = "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')"
    return {
        "displayable_configs": {"highres": True, "sw_overlap": 0.25, "sw_batch_size": 1},
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$numpy.float32",
        "output_postfix": "trans",
        "separate_folder": True,
        "load_pretrain": True,
        "dataset_dir": "sampledata",
        "datalist": "$list(sorted(glob.glob(@dataset_dir + '/imagesTs/*.nii.gz')))",
        "device": cuda,
        "pixdim": "$[1.5, 1.5, 1.5] if @displayable_configs#highres else [3.0, 3.0, 3.0]",
        "modelname": "$'model.pt' if @displayable_configs#highres else 'model_lowres.pt'",
        "network_def": {
            "_target_": "SegResNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": len(labels),
            "init_filters": init_filters,
            "blocks_down": [1, 2, 2, 4],
            "blocks_up": [1, 1, 1],
            "dropout_prob": 0.2,
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureTyped", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@pixdim", "mode": "bilinear"},
                {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True},
                {"_target_": "ScaleIntensityd", "keys": "@image_key", "minv": -1.0, "maxv": 1.0},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "$[{'image': i} for i in @datalist]", "transform": "@preprocessing"},
        "dataloader": {"_target_": "DataLoader", "dataset": "@dataset", "batch_size": 1, "shuffle": False,
                       "num_workers": 1},
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": [96, 96, 96],
            "sw_batch_size": "@displayable_configs#sw_batch_size",
            "overlap": "@displayable_configs#sw_overlap",
            "padding_mode": "replicate",
            "mode": "gaussian",
            "device": cuda,
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
                {"_target_": "Invertd", "keys": "pred", "transform": "@preprocessing", "orig_keys": "@image_key",
                 "nearest_interp": True, "to_tensor": True},
                {"_target_": "SaveImaged", "keys": "pred", "output_dir": "@output_dir", "output_ext": "@output_ext",
                 "output_dtype": "@output_dtype", "output_postfix": "@output_postfix",
                 "separate_folder": "@separate_folder"},
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {"_target_": "SupervisedEvaluator", "device": "@device", "val_data_loader": "@dataloader",
                      "network": "@network", "inferer": "@inferer", "postprocessing": "@postprocessing",
                      "val_handlers": "@handlers", "amp": True},
        "checkpointloader": {"_target_": "CheckpointLoader",
                             "load_path": "$@bundle_root + '/models/' + @modelname",
                             "load_dict": {"model": "@network"}},
        "initialize": ["$setattr(torch.backends.cudnn, 'benchmark', True)",
                       "$@checkpointloader(@evaluator) if @load_pretrain else None"],
        "run": ["$@evaluator.run()"],
    }


def _metadata() -> dict[str, Any]:
    """``configs/metadata.json``: the real version, name and channel names; marked as a stand-in."""
    entry, labels = _expert_config()
    channels = {str(i): name for i, name in sorted(labels.items())}
    patch = [96, 96, 96]
    return {
        **_common_metadata(MODEL_ID, str(entry["source"]["version"])),
        "name": "Whole body CT segmentation",
        "task": "TotalSegmentator Segmentation",
        "description": "STAND-IN with random weights of the 104-structure whole-body CT SegResNet",
        "data_source": "TotalSegmentator",
        "intended_use": "Tests and offline demos of the plumbing only; its labelmaps are random",
        STAND_IN_FIELD: STAND_IN_NOTE,
        "network_data_format": {
            "inputs": {"image": {"type": "image", "format": "hounsfield", "modality": "CT", "num_channels": 1,
                                 "spatial_shape": patch, "dtype": "float32", "value_range": [0, 1],
                                 "is_patch_data": True, "channel_def": {"0": "image"}}},
            "outputs": {"pred": {"type": "image", "format": "segmentation", "num_channels": len(channels),
                                 "spatial_shape": patch, "dtype": "float32", "value_range": [0, len(channels) - 1],
                                 "is_patch_data": True, "channel_def": channels}},
        },
    }


def make_stand_in_wholebody_ct_bundle(out_dir: str | Path, seed: int = 0,
                                      init_filters: int = STAND_IN_FILTERS) -> Path:
    """Write the stand-in bundle (random weights from ``seed``; ``seed + 1`` for the 3.0 mm model) into
    ``out_dir``; return ``out_dir``. model.pt and model_lowres.pt are ≈ 1.3 MB each with 8 filters."""
    inference = wholebody_ct_inference_config(init_filters)
    root = _write_bundle(out_dir, MODEL_ID, inference, _metadata(), seed)
    _save_random_network(inference, root / "models" / "model_lowres.pt", seed + 1)
    return root
