"""Tiny VISTA3D and BRATS bundles with RANDOM weights, in the on-disk layout of the real MONAI bundles.

The real bundles (MONAI model zoo ``vista3d`` 0.5.4, ``brats_mri_segmentation`` 0.5.2) cannot be
downloaded here. These stand-ins let the real loading code (:mod:`vila_m3.experts.bundle`) and the
expert runners be tested, and the product be demonstrated offline. They are not medical models:
their labelmaps are random. ``configs/metadata.json`` says so in the field ``vila_m3_stand_in``, the
runners report ``stand_in=True``, and ``docs/README.md`` repeats it.

Layout written (as the model zoo ships the bundles)::

    configs/inference.json   the real bundle's keys: network_def, preprocessing, inferer, postprocessing,
                             evaluator, checkpointloader, initialize, run, ...
    configs/metadata.json    the real version, label dictionaries and network_data_format
    models/model.pt          the network's state dict (torch.save of a plain dict of tensors)
    docs/README.md
    scripts/                 VISTA3D only, because its inference.json names ``scripts.inferer`` and
                             ``scripts.evaluator``: a small inferer and evaluator of our own, so that
                             ``python -m monai.bundle run`` works on the stand-in as on the real bundle
                             (copied from ``vila_m3/standins/bundle_scripts/vista3d/``).

What differs from the real bundles, on purpose:

- ``network_def`` builds the same classes with far fewer weights: VISTA3D from
  ``SegResNetDS2`` (3 levels, 8 filters) + ``ClassMappingClassify`` + ``PointMappingSAM``
  (feature size 8); BRATS ``SegResNet`` with 4 initial filters (group norm of 4 groups).
- Window sizes and (VISTA3D) resampling are scaled down so that a sample study runs in a few
  seconds on two CPU cores: VISTA3D resamples to 4 mm with 56 × 56 × 40 windows (real: 1.5 mm, 128³;
  the sample CT at 4 mm, 52 × 50 × 40 voxels, fits one window, which the demo trains on), BRATS
  uses 144 × 144 × 96 windows (real: 240 × 240 × 160; the sample MRI, 128 × 128 × 96, is still
  padded to the window as real BraTS volumes are). Everything else — transforms and their order,
  intensity scaling, orientation, overlap, label prompts, post-processing — is the real bundles'.
  ``real_sizes=True`` writes the real sizes instead (to check the full-size pipeline on a GPU).
"""

from __future__ import annotations

import copy
import json
from importlib import resources
from pathlib import Path
from typing import Any

import monai
import numpy as np
import torch
from monai.bundle import ConfigParser

from vila_m3.configs import load_config
from vila_m3.experts.bundle import STAND_IN_FIELD
from vila_m3.models.manifest import ModelManifest

__all__ = [
    "STAND_IN_FIELD",
    "STAND_IN_NOTE",
    "brats_inference_config",
    "make_tiny_brats_bundle",
    "make_tiny_vista3d_bundle",
    "vista3d_inference_config",
]

STAND_IN_NOTE = "tiny random weights for tests; not a medical model"

VISTA3D_MODEL_ID = "vista3d"
BRATS_MODEL_ID = "brats_mri_segmentation"
_FEATURES = 8  # VISTA3D stand-in feature size (the point head's attention needs at least 8)

# Ids VISTA3D's "everything" leaves out (as the real inference.json writes them).
_VISTA3D_NOT_EVERYTHING = [2, 16, 18, 20, 21, 23, 24, 25, 26, 27, 128, 129, 130, 131, 132]


def _bundle_version(model_id: str) -> str:
    """The real bundle's version, as ``configs/models.yaml`` records it (``source.version``)."""
    return str(ModelManifest.load()[model_id].source["version"])


def _vista3d_network_def() -> dict[str, Any]:
    """The VISTA3D classes of ``vista3d132`` with a feature size of 8 and a 3-level encoder."""
    return {
        "_target_": "monai.networks.nets.vista3d.VISTA3D",
        "image_encoder": {
            "_target_": "monai.networks.nets.segresnet_ds.SegResNetDS2",
            "in_channels": "@input_channels",
            "blocks_down": [1, 1, 1],
            "norm": "instance",
            "out_channels": _FEATURES,
            "init_filters": _FEATURES,
            "dsdepth": 1,
        },
        "class_head": {
            "_target_": "monai.networks.nets.vista3d.ClassMappingClassify",
            "n_classes": 512,
            "feature_size": _FEATURES,
            "use_mlp": True,
        },
        "point_head": {
            "_target_": "monai.networks.nets.vista3d.PointMappingSAM",
            "feature_size": _FEATURES,
            "n_classes": 512,
            "last_supported": 132,
        },
    }


def vista3d_inference_config(real_sizes: bool = False) -> dict[str, Any]:
    """``configs/inference.json`` of the VISTA3D stand-in: the real bundle's keys and transforms."""
    spacing = [1.5, 1.5, 1.5] if real_sizes else [4.0, 4.0, 4.0]
    patch = [128, 128, 128] if real_sizes else [56, 56, 40]
    subclass = load_config("vista3d_classes.json")["subclass"]
    return {
        "imports": [
            "$import glob",
            "$import os",
            "$import scripts",
            "$import numpy as np",
            "$import copy",
            "$import json",
            "$import pathlib",
        ],
        "bundle_root": "./",
        "image_key": "image",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "$np.float32",
        "output_postfix": "trans",
        "separate_folder": True,
        "input_dict": "${'image': '/data/Task09_Spleen/imagesTr/spleen_10.nii.gz', 'label_prompt': [3]}",
        "everything_labels": f"$list(set([i+1 for i in range(132)]) - set({_VISTA3D_NOT_EVERYTHING}))",
        "metadata_path": "$@bundle_root + '/configs/metadata.json'",
        "metadata": "$json.loads(pathlib.Path(@metadata_path).read_text())",
        "labels_dict": "$@metadata['network_data_format']['outputs']['pred']['channel_def']",
        "subclass": {
            "2": subclass["2"],
            "20": subclass["20"],
            "21": "$list(range(33, 57)) + list(range(63, 98)) + [114, 120, 122]",
        },
        "input_channels": 1,
        "resample_spacing": spacing,
        "sw_batch_size": 1,
        "patch_size": patch,
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "use_point_window": True,
        "network_def": _vista3d_network_def(),
        "network": "$@network_def.to(@device)",
        "preprocessing_transforms": [
            {"_target_": "LoadImaged", "keys": "@image_key", "image_only": True},
            {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
            {"_target_": "EnsureTyped", "keys": "@image_key", "device": "@device", "track_meta": True},
            {"_target_": "Spacingd", "keys": "@image_key", "pixdim": "@resample_spacing", "mode": "bilinear"},
            {
                "_target_": "CropForegroundd",
                "keys": "@image_key",
                "allow_smaller": True,
                "margin": 10,
                "source_key": "@image_key",
            },
            {
                "_target_": "monai.apps.vista3d.transforms.VistaPreTransformd",
                "keys": "@image_key",
                "subclass": "@subclass",
                "labels_dict": "@labels_dict",
            },
            {
                "_target_": "ScaleIntensityRanged",
                "keys": "@image_key",
                "a_min": -963.8247715525971,
                "a_max": 1053.678477684517,
                "b_min": 0,
                "b_max": 1,
                "clip": True,
            },
            {"_target_": "Orientationd", "keys": "@image_key", "axcodes": "RAS"},
            {"_target_": "CastToTyped", "keys": "@image_key", "dtype": "$torch.float32"},
        ],
        "preprocessing": {"_target_": "Compose", "transforms": "$@preprocessing_transforms "},
        "dataset": {"_target_": "Dataset", "data": "$[@input_dict]", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "ThreadDataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {
            "_target_": "scripts.inferer.Vista3dInferer",
            "roi_size": "@patch_size",
            "overlap": 0.3,
            "sw_batch_size": "@sw_batch_size",
            "use_point_window": "@use_point_window",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "ToDeviced", "keys": "pred", "device": "cpu", "_disabled_": True},
                {"_target_": "monai.apps.vista3d.transforms.VistaPostTransformd", "keys": "pred"},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "$copy.deepcopy(@preprocessing)",
                    "orig_keys": "@image_key",
                    "nearest_interp": True,
                    "to_tensor": True,
                },
                {"_target_": "Lambdad", "func": "$lambda x: torch.nan_to_num(x, nan=255)", "keys": "pred"},
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "resample": False,
                    "output_dir": "@output_dir",
                    "output_ext": "@output_ext",
                    "output_dtype": "@output_dtype",
                    "output_postfix": "@output_postfix",
                    "separate_folder": "@separate_folder",
                },
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
        },
        "evaluator": {
            "_target_": "scripts.evaluator.Vista3dEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": True,
            "hyper_kwargs": {"user_prompt": True, "everything_labels": "@everything_labels"},
        },
        "initialize": ["$monai.utils.set_determinism(seed=123)", "$@checkpointloader(@evaluator)"],
        "run": ["$@evaluator.run()"],
    }


def brats_inference_config(real_sizes: bool = False) -> dict[str, Any]:
    """``configs/inference.json`` of the BRATS stand-in: the real bundle's keys and transforms."""
    roi = [240, 240, 160] if real_sizes else [144, 144, 96]
    return {
        "imports": ["$import glob", "$import numpy", "$import os"],
        "bundle_root": ".",
        "image_key": "image",
        "ckpt_dir": "$@bundle_root + '/models'",
        "output_dir": "$@bundle_root + '/eval'",
        "output_ext": ".nii.gz",
        "output_dtype": "uint8",
        "output_postfix": "seg",
        "separate_folder": True,
        "load_pretrain": True,
        "data_list_file_path": "$@bundle_root + '/configs/datalist.json'",
        "dataset_dir": "/workspace/data/medical/brats2018challenge",
        "test_datalist": "$monai.data.load_decathlon_datalist(@data_list_file_path, data_list_key='testing', "
        "base_dir=@dataset_dir)",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "amp": True,
        "network_def": {
            "_target_": "SegResNet",
            "blocks_down": [1, 2, 2, 4],
            "blocks_up": [1, 1, 1],
            "init_filters": 4,
            "in_channels": 4,
            "out_channels": 3,
            "dropout_prob": 0.2,
            "norm": ["GROUP", {"num_groups": 4}],
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key", "image_only": False},
                {"_target_": "NormalizeIntensityd", "keys": "@image_key", "nonzero": True, "channel_wise": True},
            ],
        },
        "dataset": {"_target_": "Dataset", "data": "@test_datalist", "transform": "@preprocessing"},
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@dataset",
            "batch_size": 1,
            "shuffle": True,
            "num_workers": 4,
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": roi, "sw_batch_size": 1, "overlap": 0.5},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "sigmoid": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "@image_key",
                    "meta_keys": "pred_meta_dict",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "threshold": 0.5},
                {
                    "_target_": "Lambdad",
                    "keys": "pred",
                    "func": "$lambda x: torch.where(x[[2]] > 0, 4, torch.where(x[[0]] > 0, 1, "
                    "torch.where(x[[1]] > 0, 2, 0)))",
                },
                {
                    "_target_": "SaveImaged",
                    "keys": "pred",
                    "meta_keys": "pred_meta_dict",
                    "output_dir": "@output_dir",
                    "output_ext": "@output_ext",
                    "output_dtype": "@output_dtype",
                    "output_postfix": "@output_postfix",
                    "separate_folder": "@separate_folder",
                    "resample": False,
                    "squeeze_end_dims": True,
                },
            ],
        },
        "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@dataloader",
            "network": "@network",
            "inferer": "@inferer",
            "postprocessing": "@postprocessing",
            "val_handlers": "@handlers",
            "amp": True,
        },
        "checkpointloader": {
            "_target_": "CheckpointLoader",
            "load_path": "$@bundle_root + '/models/model.pt'",
            "load_dict": {"model": "@network"},
        },
        "initialize": [
            "$setattr(torch.backends.cudnn, 'benchmark', True)",
            "$@checkpointloader(@evaluator) if @load_pretrain else None",
        ],
        "run": ["$@evaluator.run()"],
    }


def _common_metadata(model_id: str, version: str | None = None) -> dict[str, Any]:
    """The metadata.json fields every stand-in has; ``version``: the real bundle's (default: the manifest's)."""
    version = version or _bundle_version(model_id)
    return {
        "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
        "version": version,
        "changelog": {version: "VILA-M3 stand-in with tiny random weights, in this version's layout"},
        "monai_version": monai.__version__,
        "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": np.__version__,
    }


def _vista3d_metadata() -> dict[str, Any]:
    classes = load_config("vista3d_classes.json")["classes"]
    meta = _common_metadata(VISTA3D_MODEL_ID)
    meta.update(
        {
            "required_packages_version": {"einops": "0.7.0", "nibabel": "5.2.1", "pytorch-ignite": "0.4.11"},
            "name": "VISTA3D",
            "task": "Decathlon Spleen segmentation",
            "description": "VISTA3D bundle (VILA-M3 stand-in: tiny network, random weights)",
            "authors": "MONAI team (layout); VILA-M3 for MONAI Label (stand-in weights)",
            "copyright": "Copyright (c) MONAI Consortium",
            "data_source": "none: random weights",
            "data_type": "nibabel",
            "image_classes": "1 channel data, intensity scaled to [0, 1]",
            "label_classes": "single channel data",
            "pred_classes": "2 channels OneHot data",
            "intended_use": "Software tests and offline demonstration only; not for any medical use",
            "references": [],
            "network_data_format": {
                "inputs": {
                    "image": {
                        "type": "image",
                        "format": "hounsfield",
                        "modality": "CT",
                        "num_channels": 1,
                        "spatial_shape": [128, 128, 128],
                        "dtype": "float32",
                        "value_range": [0, 1],
                        "is_patch_data": True,
                        "channel_def": {"0": "image"},
                    }
                },
                "outputs": {
                    "pred": {
                        "type": "image",
                        "format": "segmentation",
                        "num_channels": 1,
                        "spatial_shape": [128, 128, 128],
                        "dtype": "float32",
                        "value_range": [0, 1],
                        "is_patch_data": True,
                        "channel_def": dict(classes),
                    }
                },
            },
            STAND_IN_FIELD: STAND_IN_NOTE,
        }
    )
    return meta


def _brats_metadata() -> dict[str, Any]:
    meta = _common_metadata(BRATS_MODEL_ID)
    meta["schema"] = "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20220324.json"
    shape = ["8*n", "8*n", "8*n"]
    meta.update(
        {
            "optional_packages_version": {"nibabel": "5.2.1", "pytorch-ignite": "0.4.11"},
            "name": "BraTS MRI segmentation",
            "task": "Multimodal Brain Tumor segmentation",
            "description": "A pre-trained model for volumetric (3D) segmentation of brain tumor subregions from "
            "multimodal MRIs based on BraTS 2018 data (VILA-M3 stand-in: tiny network, random weights)",
            "authors": "MONAI team (layout); VILA-M3 for MONAI Label (stand-in weights)",
            "copyright": "Copyright (c) MONAI Consortium",
            "data_source": "none: random weights",
            "data_type": "nibabel",
            "image_classes": "4 channel data, T1c, T1, T2, FLAIR at 1x1x1 mm",
            "label_classes": "3 channel data, channel 0 for Tumor core, channel 1 for Whole tumor, "
            "channel 2 for Enhancing tumor",
            "pred_classes": "3 channels data, same as label_classes",
            "eval_metrics": {},
            "intended_use": "Software tests and offline demonstration only; not for any medical use",
            "references": [],
            "network_data_format": {
                "inputs": {
                    "image": {
                        "type": "image",
                        "format": "magnitude",
                        "modality": "MR",
                        "num_channels": 4,
                        "spatial_shape": shape,
                        "dtype": "float32",
                        "value_range": [],
                        "is_patch_data": True,
                        "channel_def": {"0": "T1c", "1": "T1", "2": "T2", "3": "FLAIR"},
                    }
                },
                "outputs": {
                    "pred": {
                        "type": "image",
                        "format": "segmentation",
                        "num_channels": 3,
                        "spatial_shape": shape,
                        "dtype": "float32",
                        "value_range": [0, 1],
                        "is_patch_data": True,
                        "channel_def": {"0": "Tumor core", "1": "Whole tumor", "2": "Enhancing tumor"},
                    }
                },
            },
            STAND_IN_FIELD: STAND_IN_NOTE,
        }
    )
    return meta


_README = """# {name} — VILA-M3 stand-in bundle

**Not a medical model.** {note}.

This folder has the on-disk layout of the MONAI model-zoo bundle `{model_id}` version {version}
(`configs/inference.json`, `configs/metadata.json`, `models/model.pt`{scripts}), so that the code
which loads the real bundle can be tested and demonstrated without it. The network is the real
bundle's architecture family, made tiny, with random weights (seed {seed}); its output is noise.

Replace this folder with the real bundle to get real results: `vila-m3 models pull {model_id}`.
"""

def bundle_scripts(bundle: str) -> dict[str, bytes]:
    """The ``scripts/`` files of stand-in bundle ``bundle`` (a folder of :mod:`vila_m3.standins.bundle_scripts`):
    file name → its bytes, copied unchanged; empty for a bundle without scripts."""
    folder = resources.files("vila_m3.standins.bundle_scripts") / bundle
    if not folder.is_dir():
        return {}
    return {item.name: item.read_bytes() for item in sorted(folder.iterdir(), key=lambda item: item.name)
            if item.is_file() and item.name.endswith(".py")}


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=4) + "\n", encoding="utf-8")


def _save_random_network(config: dict[str, Any], path: Path, seed: int) -> None:
    """Instantiate ``network_def`` with weights drawn from ``seed`` and save its state dict."""
    parser = ConfigParser({key: config[key] for key in ("network_def", "input_channels") if key in config})
    with torch.random.fork_rng(devices=[]):  # leave the caller's random state alone
        torch.manual_seed(seed)
        network = parser.get_parsed_content("network_def")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.detach().clone().contiguous() for k, v in network.state_dict().items()}, path)


def _write_bundle(
    out_dir: str | Path,
    model_id: str,
    inference: dict[str, Any],
    metadata: dict[str, Any],
    seed: int,
    scripts: dict[str, bytes] | None = None,
) -> Path:
    root = Path(out_dir)
    _write_json(root / "configs" / "inference.json", copy.deepcopy(inference))
    _write_json(root / "configs" / "metadata.json", metadata)
    _save_random_network(inference, root / "models" / "model.pt", seed)
    for name, content in (scripts or {}).items():
        target = root / "scripts" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(content)
    readme = _README.format(
        name=metadata["name"],
        note=STAND_IN_NOTE[0].upper() + STAND_IN_NOTE[1:],
        model_id=model_id,
        version=metadata["version"],
        scripts=", `scripts/`" if scripts else "",
        seed=seed,
    )
    (root / "docs").mkdir(parents=True, exist_ok=True)
    (root / "docs" / "README.md").write_text(readme, encoding="utf-8")
    return root


def make_tiny_vista3d_bundle(out_dir: str | Path, seed: int = 0, real_sizes: bool = False) -> Path:
    """Write a VISTA3D stand-in bundle (random weights from ``seed``) into ``out_dir``; return ``out_dir``.

    The network has ~0.2 M parameters (model.pt ≈ 0.9 MB). With the default sizes the sample CT
    (256 × 256 × 64 voxels) is segmented in a few seconds on two CPU cores; ``real_sizes=True``
    keeps the real bundle's 1.5 mm spacing and 128³ windows.
    """
    return _write_bundle(
        out_dir,
        VISTA3D_MODEL_ID,
        vista3d_inference_config(real_sizes),
        _vista3d_metadata(),
        seed,
        scripts=bundle_scripts("vista3d"),
    )


def make_tiny_brats_bundle(out_dir: str | Path, seed: int = 0, real_sizes: bool = False) -> Path:
    """Write a BRATS stand-in bundle (random weights from ``seed``) into ``out_dir``; return ``out_dir``.

    SegResNet with 4 initial filters (~0.3 M parameters, model.pt ≈ 1.2 MB). ``real_sizes=True`` keeps the real
    240 × 240 × 160 window.
    """
    return _write_bundle(out_dir, BRATS_MODEL_ID, brats_inference_config(real_sizes), _brats_metadata(), seed)
