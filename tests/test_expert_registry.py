"""Tests of the expert registry built from configs/experts.yaml and the VISTA3D tables."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vila_m3 import configs
from vila_m3.configs import load_config
from vila_m3.experts import (
    ConfigError,
    ExpertRegistry,
    UnknownArgument,
    UnknownExpert,
    derived_color,
)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
SHARED_REFERENCE = Path("/work/shared/reference")

# EXPERT_PROTOCOL.md §1, written out by hand: each "\n" of the document is a line break here.
GOLDEN_CARD = """Here is a list of available expert models:
<BRATS(args)> Modality: MRI, Task: segmentation, Overview: A pre-trained model for volumetric (3D) segmentation of brain tumor subregions from multimodal MRIs based on BraTS 2018 data, Accuracy: Tumor core (TC): 0.8559 - Whole tumor (WT): 0.9026 - Enhancing tumor (ET): 0.7905 - Average: 0.8518, Valid args are: None
<VISTA3D(args)> Modality: CT, Task: segmentation, Overview: domain-specialized interactive foundation model developed for segmenting and annotating human anatomies with precision, Accuracy: 127 organs: 0.792 Dice on average, Valid args are: 'everything', 'hepatic tumor', 'pancreatic tumor', 'lung tumor', 'bone lesion', 'organs', 'cardiovascular', 'gastrointestinal', 'skeleton', or 'muscles'
<VISTA2D(args)> Modality: cell imaging, Task: segmentation, Overview: model for cell segmentation, which was trained on a variety of cell imaging outputs, including brightfield, phase-contrast, fluorescence, confocal, or electron microscopy, Accuracy: Good accuracy across several cell imaging datasets, Valid args are: None
<CXR(args)> Modality: chest x-ray (CXR), Task: classification, Overview: pre-trained model which are trained on large cohorts of data, Accuracy: Good accuracy across several diverse chest x-rays datasets, Valid args are: None
Give the model <NAME(args)> when selecting a suitable expert model.
"""

BRATS_LINE = "<BRATS(args)> Modality: MRI, Task: segmentation, Overview: A pre-trained model for volumetric (3D) segmentation of brain tumor subregions from multimodal MRIs based on BraTS 2018 data, Accuracy: Tumor core (TC): 0.8559 - Whole tumor (WT): 0.9026 - Enhancing tumor (ET): 0.7905 - Average: 0.8518, Valid args are: None\n"

VISTA3D_ARGS = (
    "everything",
    "hepatic tumor",
    "pancreatic tumor",
    "lung tumor",
    "bone lesion",
    "organs",
    "cardiovascular",
    "gastrointestinal",
    "skeleton",
    "muscles",
)
# EXPERT_PROTOCOL.md §4: number of labels per argument group
GROUP_SIZES = {
    "hepatic tumor": 2,
    "pancreatic tumor": 2,
    "lung tumor": 7,
    "bone lesion": 1,
    "organs": 27,
    "cardiovascular": 18,
    "gastrointestinal": 6,
    "skeleton": 65,
    "muscles": 10,
}
XRV_WEIGHTS = (
    "xrv_densenet121_res224_all",
    "xrv_densenet121_res224_chex",
    "xrv_densenet121_res224_mimic_ch",
    "xrv_densenet121_res224_mimic_nb",
    "xrv_densenet121_res224_nih",
    "xrv_densenet121_res224_pc",
    "xrv_densenet121_res224_rsna",
    "xrv_resnet50_res512_all",
)


@pytest.fixture(scope="module")
def registry() -> ExpertRegistry:
    return ExpertRegistry.from_config()


@pytest.fixture(scope="module")
def experts_config() -> dict:
    return load_config("experts.yaml")


def _tables() -> tuple[dict, dict]:
    classes = json.loads((CONFIGS / "vista3d_classes.json").read_text(encoding="utf-8"))
    groups = json.loads((CONFIGS / "vista3d_label_groups.json").read_text(encoding="utf-8"))
    return classes, groups


# ------------------------------------------------------------------------------------------ model card


def test_model_card_is_the_trained_card_byte_for_byte(registry):
    card = registry.model_card()
    assert card == GOLDEN_CARD
    assert card.encode("utf-8") == GOLDEN_CARD.encode("utf-8")
    assert card.count("\n") == 6 and card.endswith("selecting a suitable expert model.\n")


def test_card_with_an_explicit_all_available_check_is_the_same(experts_config):
    registry = ExpertRegistry.from_config(experts_config, available=lambda spec: None)
    assert registry.model_card() == GOLDEN_CARD
    assert registry.unavailable == {}


def test_unavailable_expert_is_left_out_of_the_card_and_reported(experts_config):
    def available(spec):
        return "weights brats_mri_segmentation are not staged" if spec.name == "BRATS" else None

    registry = ExpertRegistry.from_config(experts_config, available=available)
    assert registry.model_card() == GOLDEN_CARD.replace(BRATS_LINE, "")
    assert "<BRATS(args)>" not in registry.model_card()
    assert dict(registry.unavailable) == {"BRATS": "weights brats_mri_segmentation are not staged"}
    assert registry.names == ("VISTA3D", "VISTA2D", "CXR")
    assert "BRATS" not in registry and "VISTA3D" in registry
    assert registry.is_configured("BRATS")
    with pytest.raises(KeyError, match="not staged"):
        registry.get("BRATS")
    assert registry.configured_spec("BRATS").runner == "vila_m3.experts.brats:BratsExpert"


def test_a_failing_availability_check_marks_only_that_expert_unavailable(experts_config):
    def available(spec):
        if spec.name == "CXR":
            raise OSError("models dir unreadable")
        return None

    registry = ExpertRegistry.from_config(experts_config, available=available)
    assert set(registry.unavailable) == {"CXR"}
    assert "models dir unreadable" in registry.unavailable["CXR"]
    assert "<CXR(args)>" not in registry.model_card()


def test_card_is_empty_when_no_expert_is_available(experts_config):
    registry = ExpertRegistry.from_config(experts_config, available=lambda spec: "off")
    assert registry.model_card() == ""
    assert registry.experts == ()


def test_get_is_case_sensitive_and_lists_valid_names(registry):
    assert registry.get("VISTA3D").name == "VISTA3D"
    with pytest.raises(UnknownExpert) as info:
        registry.get("vista3d")
    assert isinstance(info.value, KeyError)
    assert "BRATS, VISTA3D, VISTA2D, CXR" in str(info.value)
    with pytest.raises(KeyError, match="unknown expert 'TOTALSEG'"):
        registry.get("TOTALSEG")


# ------------------------------------------------------------------------------------------ experts


def test_experts_in_card_order_with_runners_weights_and_outputs(registry):
    assert [s.name for s in registry.configured] == ["BRATS", "VISTA3D", "VISTA2D", "CXR"]
    by_name = {s.name: s for s in registry.configured}
    assert by_name["VISTA3D"].weights == ("vista3d",)
    assert by_name["BRATS"].weights == ("brats_mri_segmentation",)
    assert by_name["CXR"].weights == XRV_WEIGHTS
    assert by_name["VISTA2D"].weights == ()
    assert {n: s.runner for n, s in by_name.items()} == {
        "BRATS": "vila_m3.experts.brats:BratsExpert",
        "VISTA3D": "vila_m3.experts.vista3d:Vista3DExpert",
        "VISTA2D": None,
        "CXR": "vila_m3.experts.cxr:CxrExpert",
    }
    assert {n: s.input_modality for n, s in by_name.items()} == {
        "BRATS": "MRI",
        "VISTA3D": "CT",
        "VISTA2D": "cell",
        "CXR": "CXR",
    }
    assert {n: s.output for n, s in by_name.items()} == {
        "BRATS": "segmentation",
        "VISTA3D": "segmentation",
        "VISTA2D": "segmentation",
        "CXR": "classification",
    }
    assert by_name["VISTA3D"].args == VISTA3D_ARGS
    assert by_name["BRATS"].args == by_name["CXR"].args == ()


def test_brats_labels(registry):
    brats = registry.get("BRATS")
    assert dict(brats.labels) == {1: "tumor core", 2: "edema", 4: "enhancing tumor"}
    resolved = brats.resolve_argument(None)
    assert resolved.group is None and resolved.label_ids == ()
    assert dict(resolved.labels) == {"tumor core": 1, "edema": 2, "enhancing tumor": 4}


def test_vista3d_labels_are_the_class_table(registry):
    classes, _ = _tables()
    vista = registry.get("VISTA3D")
    expected = {int(k): v for k, v in classes["classes"].items() if k != "0"}
    assert dict(vista.labels) == expected
    assert len(vista.labels) == 132
    assert vista.subclasses[2] == (14, 5)
    assert len(vista.subclasses[20]) == 5


def test_cxr_pathologies_and_voting_table(registry):
    cxr = registry.get("CXR").classification
    assert cxr is not None and cxr.threshold == 0.5
    assert cxr.pathologies == (
        "Atelectasis", "Consolidation", "Infiltration", "Pneumothorax", "Edema", "Emphysema",
        "Fibrosis", "Effusion", "Pneumonia", "Pleural_Thickening", "Cardiomegaly", "Nodule",
        "Mass", "Hernia", "Lung Lesion", "Fracture", "Lung Opacity", "Enlarged Cardiomediastinum",
    )  # fmt: skip
    all_chex_pc_resnet = {
        "xrv_densenet121_res224_all",
        "xrv_densenet121_res224_chex",
        "xrv_densenet121_res224_pc",
        "xrv_resnet50_res512_all",
    }
    assert cxr.voters("Pneumothorax") == ("xrv_resnet50_res512_all",)
    assert set(cxr.voters("Lung Opacity")) == set(XRV_WEIGHTS)
    assert set(cxr.voters("Fracture")) == {
        "xrv_densenet121_res224_all",
        "xrv_densenet121_res224_nih",
        "xrv_densenet121_res224_chex",
        "xrv_resnet50_res512_all",
    }
    for pathology in ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Effusion"):
        assert set(cxr.voters(pathology)) == all_chex_pc_resnet, pathology
    mean_of_all = [p for p in cxr.pathologies if set(cxr.voters(p)) == set(XRV_WEIGHTS)]
    assert len(mean_of_all) == 11  # the 10 "other" classes + Lung Opacity


# ------------------------------------------------------------------------------------------ arguments


def test_every_group_matches_the_label_group_table(registry):
    _, groups = _tables()
    vista = registry.get("VISTA3D")
    for group, members in groups["groups"].items():
        assert dict(vista.groups[group]) == members, group
    for group in VISTA3D_ARGS[1:]:
        resolved = vista.resolve_argument(group)
        assert resolved.group == group
        assert resolved.label_ids == tuple(groups["groups"][group].values())
        assert dict(resolved.labels) == groups["groups"][group]
        assert len(resolved.label_ids) == GROUP_SIZES[group]


def test_everything_is_the_117_everything_ids(registry):
    classes, _ = _tables()
    vista = registry.get("VISTA3D")
    for arg in (None, "", "   ", "everything", " Everything ", "'everything'", "None"):
        resolved = vista.resolve_argument(arg)
        assert resolved.group == "everything", arg
        assert len(resolved.label_ids) == 117
        assert resolved.label_ids == tuple(sorted(classes["everything_label_ids"]))
    labels = vista.resolve_argument(None).labels
    assert labels["liver"] == 1 and "kidney" not in labels and "hepatic tumor" not in labels


def test_hepatoma_is_an_alias_of_hepatic_tumor(registry):
    vista = registry.get("VISTA3D")
    resolved = vista.resolve_argument("hepatoma")
    assert resolved.group == "hepatic tumor"
    assert resolved.label_ids == (1, 26)
    assert dict(resolved.labels) == {"liver": 1, "hepatic tumor": 26}
    assert vista.resolve_argument("Hepatoma").group == "hepatic tumor"


def test_argument_matching_ignores_case_quotes_and_extra_spaces(registry):
    vista = registry.get("VISTA3D")
    assert vista.resolve_argument("  'Hepatic  Tumor' ").group == "hepatic tumor"
    assert vista.resolve_argument('"MUSCLES"').group == "muscles"


def test_unknown_argument_names_it_and_lists_the_valid_ones(registry):
    vista = registry.get("VISTA3D")
    with pytest.raises(UnknownArgument) as info:
        vista.resolve_argument("liver tumour")
    err = info.value
    assert err.expert == "VISTA3D" and err.argument == "liver tumour" and err.valid == VISTA3D_ARGS
    message = str(err)
    assert "'liver tumour'" in message
    assert "'everything', 'hepatic tumor'" in message and "'muscles'" in message
    assert "hepatoma" in message
    with pytest.raises(UnknownArgument):
        vista.resolve_argument("hepatic tumors")  # no guessing of plurals


@pytest.mark.parametrize("name", ["BRATS", "CXR"])
def test_experts_without_arguments_reject_any_argument(registry, name):
    spec = registry.get(name)
    assert spec.resolve_argument(None).group is None
    assert spec.resolve_argument("").group is None
    assert spec.resolve_argument(" ").group is None
    with pytest.raises(UnknownArgument, match=f"{name} takes no argument, but got 'tumor'"):
        spec.resolve_argument("tumor")
    with pytest.raises(UnknownArgument):
        spec.resolve_argument("everything")


# ------------------------------------------------------------------------------------------ tables and colours


def test_config_tables_keep_the_shared_reference_content():
    if not SHARED_REFERENCE.is_dir():
        pytest.skip("no shared reference tables on this machine; the configs copies are the source of truth")
    for name in ("vista3d_classes.json", "vista3d_label_groups.json"):
        ours = json.loads((CONFIGS / name).read_text(encoding="utf-8"))
        reference = json.loads((SHARED_REFERENCE / name).read_text(encoding="utf-8"))
        ours.pop("source", None)
        reference.pop("source", None)
        assert ours == reference, name


def test_every_vista3d_label_has_a_valid_display_color(registry):
    vista = registry.get("VISTA3D")
    assert set(vista.display_colors) == set(range(1, 133))
    for label_id, rgb in vista.display_colors.items():
        assert len(rgb) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in rgb), label_id
    ids = vista.ids_by_name
    assert vista.label_color(ids["liver"]) == (221, 130, 101)
    assert vista.label_color(ids["spleen"]) == (157, 108, 162)
    assert vista.label_color(ids["hepatic tumor"]) != vista.label_color(ids["liver"])
    # a label without a configured colour gets the derived one
    assert vista.label_color(ids["vertebrae L3"]) == derived_color(ids["vertebrae L3"])
    lobes = [
        ids[f"{side} lung {part} lobe"]
        for side, part in [
            ("left", "upper"),
            ("left", "lower"),
            ("right", "upper"),
            ("right", "middle"),
            ("right", "lower"),
        ]
    ]
    assert len({vista.label_color(i) for i in lobes}) == 5


def test_derived_colors_are_deterministic_and_distinct_for_neighbours():
    assert derived_color(40) == derived_color(40)
    assert len({derived_color(i) for i in range(33, 57)}) == 24  # the vertebrae


# ------------------------------------------------------------------------------------------ config errors


def test_group_entry_that_disagrees_with_the_class_table_is_rejected(experts_config):
    config = copy.deepcopy(experts_config)
    vista = next(e for e in config["experts"] if e["name"] == "VISTA3D")
    vista.pop("groups_file")
    vista["groups"] = {"hepatic tumor": {"liver": 2, "hepatic tumor": 26}}
    vista["args"] = ["everything", "hepatic tumor"]
    with pytest.raises(ConfigError, match="label 2 is 'kidney'"):
        ExpertRegistry.from_config(config)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda c: c["experts"].append(copy.deepcopy(c["experts"][0])), "repeated: BRATS"),
        (lambda c: c["experts"][1]["aliases"].update({"liver cancer": "liver"}), "alias 'liver cancer'"),
        (lambda c: c["experts"][1]["args"].append("kidneys"), "'kidneys' has no label group"),
        (
            lambda c: c["experts"][3]["classification"]["voting"].update({"Mass": ["densenet"]}),
            "subset of its weights",
        ),
        (lambda c: c["experts"][0]["display_colors"].update({"necrosis": [1, 2, 3]}), "'necrosis'"),
        (lambda c: c["experts"][0]["display_colors"].update({"edema": [1, 2, 300]}), "0..255"),
        (lambda c: c.pop("card"), "'card'"),
        (lambda c: c["experts"][0].update(output="detection"), "output must be one of"),
    ],
)
def test_invalid_configs_are_rejected_with_a_message(experts_config, change, message):
    config = copy.deepcopy(experts_config)
    change(config)
    with pytest.raises(ConfigError, match=message):
        ExpertRegistry.from_config(config)


# ------------------------------------------------------------------------------------------ configs helper


def test_config_dir_is_the_repository_configs_folder():
    assert configs.DEFAULT_CONFIG_DIR == CONFIGS
    assert "models" in load_config("models.yaml")


def test_config_dir_can_be_overridden_by_the_environment(tmp_path, monkeypatch):
    (tmp_path / "site.yaml").write_text("answer: 42\n")
    (tmp_path / "table.json").write_text('{"a": [1, 2]}')
    monkeypatch.setenv("VILA_M3_CONFIG_DIR", str(tmp_path))
    assert configs.config_dir() == tmp_path
    assert load_config("site.yaml") == {"answer": 42}
    assert load_config("table.json") == {"a": [1, 2]}
    with pytest.raises(FileNotFoundError, match="VILA_M3_CONFIG_DIR"):
        load_config("experts.yaml")


def test_load_config_rejects_bad_files(tmp_path):
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ValueError, match="mapping"):
        load_config(tmp_path / "list.yaml")
    with pytest.raises(ValueError, match="unsupported extension"):
        load_config(tmp_path / "notes.txt")
    with pytest.raises(ValueError, match="cannot be parsed"):
        load_config(tmp_path / "broken.json")


def test_registry_reads_tables_from_an_overridden_config_dir(tmp_path, monkeypatch):
    for name in ("experts.yaml", "vista3d_classes.json", "vista3d_label_groups.json"):
        (tmp_path / name).write_text((CONFIGS / name).read_text(encoding="utf-8"), encoding="utf-8")
    groups = json.loads((tmp_path / "vista3d_label_groups.json").read_text(encoding="utf-8"))
    groups["groups"]["muscles"] = {"left iliopsoas": 106}
    (tmp_path / "vista3d_label_groups.json").write_text(json.dumps(groups))
    monkeypatch.setenv("VILA_M3_CONFIG_DIR", str(tmp_path))
    registry = ExpertRegistry.from_config()
    assert registry.get("VISTA3D").resolve_argument("muscles").label_ids == (106,)


def test_importing_the_experts_package_does_not_import_monai_label():
    code = "import sys, vila_m3.experts; print(sorted(m for m in sys.modules if m.split('.')[0] in ('monailabel', 'torch', 'monai')))"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, encoding="utf-8", errors="replace", env=env, check=True)
    assert result.stdout.strip() == "[]"
