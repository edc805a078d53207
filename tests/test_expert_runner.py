"""The ExpertRunner interface: runner classes named in the experts config, extra experts files, and a toy
expert from a temporary folder run through the real expert service (no model weights needed)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from expert_plugin import TOY_NAME, expected_toy_labels, toy_experts_text, write_toy_expert
from test_expert_registry import GOLDEN_CARD

from vila_m3.experts.feedback import segmentation_feedback
from vila_m3.experts.registry import EXPERTS_ENV, ConfigError, ExpertRegistry, UnknownArgument
from vila_m3.experts.result import ExpertInputError, SegmentationResult
from vila_m3.experts.runner import REQUIRED_METHODS, ExpertStudy, load_runner_class, study_from_paths
from vila_m3.experts.service import ExpertService
from vila_m3.imaging import read_volume

REPO = Path(__file__).resolve().parents[1]
TOY_LINE = ("<TOY(args)> Modality: CT, Task: segmentation, Overview: thresholds a CT in Hounsfield units "
            "(a plug-in example), Accuracy: exact by construction, Valid args are: 'bone', or 'air'\n")
FOOTER = "Give the model <NAME(args)> when selecting a suitable expert model.\n"


@pytest.fixture(scope="module")
def toy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_toy_expert(tmp_path_factory.mktemp("toy-expert"))


@pytest.fixture(scope="module")
def toy_registry(toy_file: Path) -> ExpertRegistry:
    return ExpertRegistry.from_config(experts_files=[toy_file])


def test_the_shipped_experts_name_runner_classes_that_implement_the_interface():
    registry = ExpertRegistry.from_config()
    for spec in registry.configured:
        if spec.runner is None:
            continue
        runner_class = registry.runner_class(spec.name)
        assert spec.runner == f"{runner_class.__module__}:{runner_class.__name__}"
        assert all(callable(getattr(runner_class, method)) for method in REQUIRED_METHODS)
    with pytest.raises(ConfigError, match="VISTA2D has no runner"):
        registry.runner_class("VISTA2D")


def test_an_extra_experts_file_appends_its_expert_to_the_card_after_the_four(toy_registry, toy_file):
    assert [spec.name for spec in toy_registry.configured] == ["BRATS", "VISTA3D", "VISTA2D", "CXR", TOY_NAME]
    assert toy_registry.model_card() == GOLDEN_CARD.replace(FOOTER, TOY_LINE + FOOTER)
    spec = toy_registry.get(TOY_NAME)
    assert spec.python_path == (str((toy_file.parent / "plugins").resolve()),)
    assert toy_registry.runner_class(TOY_NAME).__name__ == "ThresholdExpert"
    assert spec.resolve_argument(None).group == "bone" and spec.resolve_argument("AIR").label_ids == (2,)


def test_the_environment_variable_adds_experts_files(toy_file, monkeypatch):
    monkeypatch.setenv(EXPERTS_ENV, str(toy_file))
    assert ExpertRegistry.from_config().names[-1] == TOY_NAME
    monkeypatch.delenv(EXPERTS_ENV)
    assert TOY_NAME not in ExpertRegistry.from_config().names


def test_the_card_of_the_four_shipped_experts_is_unchanged_without_extra_files(monkeypatch):
    monkeypatch.delenv(EXPERTS_ENV, raising=False)
    assert ExpertRegistry.from_config().model_card() == GOLDEN_CARD


@pytest.mark.parametrize(
    ("runner", "source", "message"),
    [
        ("no_such_module_xyz:Thing", "", r"expert BROKEN: runner 'no_such_module_xyz:Thing' cannot be imported: "
                                         r"ModuleNotFoundError"),
        ("broken_missing_class:Absent", "X = 1\n", r"module broken_missing_class has no class Absent"),
        ("broken_not_runner:Half", "class Half:\n    def run(self, study, argument):\n        return None\n",
         r"runner 'broken_not_runner:Half' is not an expert runner: it has no check, feedback, answer, "
         r"request_argument, release"),
        ("broken_raises:Thing", "raise RuntimeError('site package missing')\n",
         r"cannot be imported: RuntimeError: site package missing"),
    ],
    ids=["no-module", "no-class", "not-a-runner", "import-fails"],
)
def test_a_runner_class_that_cannot_be_used_is_a_clear_error_naming_the_expert_and_class(tmp_path, runner, source,
                                                                                        message):
    module = runner.split(":")[0]
    path = write_toy_expert(tmp_path, runner_source=None, experts_text=toy_experts_text("BROKEN", runner))
    if source:
        (tmp_path / "plugins" / f"{module}.py").write_text(source, encoding="utf-8")
    registry = ExpertRegistry.from_config(experts_files=[path])  # reading the config imports nothing
    with pytest.raises(ConfigError, match=message):
        registry.runner_class("BROKEN")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("experts: []\n", "needs a non-empty list 'experts'"),
        ("card: {}\nexperts: [{name: X}]\n", "unknown keys card"),
        ("experts:\n  - {name: X, modality: CT, task: t, overview: o, accuracy: a, input_modality: CT, "
         "runner: 'not a class', output: segmentation}\n", "package.module:Class"),
        ("experts:\n  - {name: VISTA3D, modality: CT, task: t, overview: o, accuracy: a, input_modality: CT, "
         "runner: 'a.b:C', output: segmentation}\n", "repeated: VISTA3D"),
    ],
    ids=["empty", "own-card", "bad-runner", "same-name"],
)
def test_a_bad_experts_file_is_refused_with_a_message(tmp_path, text, message):
    path = tmp_path / "extra.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=message):
        ExpertRegistry.from_config(experts_files=[path])


def test_a_missing_experts_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="experts file nowhere.yaml"):
        ExpertRegistry.from_config(experts_files=[tmp_path / "nowhere.yaml"])


def test_the_toy_runs_through_the_expert_service_checks_its_study_and_writes_its_feedback(
        toy_registry, sample_data, tmp_path):
    ct_path = tmp_path / "ct.nii.gz"
    shutil.copyfile(sample_data / "studies" / "ct_abdomen.nii.gz", ct_path)
    service = ExpertService(tmp_path / "no-models", registry=toy_registry, idle_release_s=0)
    try:
        study = service.open_study({"image": ct_path}, TOY_NAME)
        assert study.modality == "CT"  # a NIfTI does not say; /infer/<expert> takes the expert's modality
        first = service.run_expert(TOY_NAME, study, "air")
        result = first.result
        assert isinstance(result, SegmentationResult) and not first.cached
        ct = read_volume(ct_path)
        assert result.labels.geometry.allclose(ct.geometry, atol=1e-6)
        assert np.array_equal(result.labels.array, expected_toy_labels(ct.array, "air"))
        assert 0 < int((result.labels.array == 2).sum()) < result.labels.array.size  # the threshold is not trivial
        assert service.run_expert(TOY_NAME, study, "air").cached
        bone = service.run_expert(TOY_NAME, study, None)  # the default argument
        assert not bone.cached and bone.result.argument == "bone"
        assert np.array_equal(bone.result.labels.array, expected_toy_labels(ct.array, "bone"))

        text = service.feedback(TOY_NAME, result, "Where is the air?", [2])
        assert text == segmentation_feedback([2], {2: "air"}, "Where is the air?")
        assert text.startswith("The results are <image>. The colors in this image describe red: air. ")

        mri = ExpertStudy(study.paths, study.volumes, study.keys, "MRI")
        with pytest.raises(ExpertInputError, match="TOY runs on CT images; this study is MRI"):
            service.run_expert(TOY_NAME, mri, "bone")
        with pytest.raises(UnknownArgument, match="'bone', 'air'"):
            service.run_expert(TOY_NAME, study, "lung")
    finally:
        service.close()


def test_a_study_from_files_takes_the_dicom_modality_over_the_hint(sample_data):
    def load(path):
        return str(path), read_volume(path)

    dicom = study_from_paths({"image": sample_data / "dicom" / "ct_abdomen"}, load, "CXR")
    assert dicom.modality == "CT"
    nifti = study_from_paths({"image": sample_data / "studies" / "ct_abdomen.nii.gz"}, load, "MRI")
    assert nifti.modality == "MRI"


def test_no_runner_kind_is_compared_outside_the_runner_modules():
    """The service, the chat loop, the app and its infer tasks reach every expert through its runner."""
    kinds = re.compile(r"""runner\s*==|spec\.runner\s*==|["'](cxr|brats|vista3d)["']""")
    for relative in ("src/vila_m3/experts/service.py", "src/vila_m3/chat/loop.py", "apps/vila_m3/main.py",
                     "apps/vila_m3/lib/infers.py"):
        found = [line for line in (REPO / relative).read_text(encoding="utf-8").splitlines() if kinds.search(line)]
        assert found == [], f"{relative}: {found}"


def test_load_runner_class_refuses_an_expert_without_a_runner():
    spec = ExpertRegistry.from_config().configured_spec("VISTA2D")
    with pytest.raises(ConfigError, match="VISTA2D has no runner"):
        load_runner_class(spec)
