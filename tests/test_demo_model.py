"""The demo model pipeline (``vila-m3 models demo``): phantom studies -> data engine -> fine-tuning ->
held-out trigger evaluation -> a checkpoint in the released layout that says what it is, staged only
where no real weights are. Run here with a shortened recipe (one phantom, a few steps); the full
recipe is ``configs/demo_model.yaml``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from vila_m3.models.manifest import ModelManifest
from vila_m3.training.demo import DEMO_BUILD, DEMO_EVALUATION, DemoError, load_demo_recipe, stage_demo_vlm
from vila_m3.training.record import read_record
from vila_m3.vlm.generation import VilaChat

QUICK_RECIPE = Path(__file__).parent / "data" / "demo_quick.yaml"
QUICK = load_demo_recipe(QUICK_RECIPE)


@pytest.fixture(scope="module")
def staged(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    models = tmp_path_factory.mktemp("demo") / "models"
    line = stage_demo_vlm(models, progress=False, log=lambda text: None, overrides=QUICK)
    return models, line


def test_the_demo_pipeline_writes_a_labelled_evaluated_checkpoint(staged):
    models, line = staged
    location = ModelManifest.load()["vila_m3_8b"].location(models)
    assert "demo model built" in line and "held-out phrasings" in line

    chat = VilaChat.from_pretrained(location, device="cpu")
    assert chat.is_stand_in and "demo model trained on synthetic" in chat.stand_in_note
    evaluation = json.loads((location / DEMO_EVALUATION).read_text(encoding="utf-8"))
    assert evaluation["needs_call"] > 0 and evaluation["needs_no_call"] > 0
    assert 0.0 <= evaluation["trigger_accuracy"] <= 1.0 and evaluation["evaluation_study_seeds"] == [0]
    assert "DEMO MODEL - NOT A MEDICAL MODEL" in (location / "README.txt").read_text(encoding="utf-8")
    llm_config = json.loads((location / "llm" / "config.json").read_text(encoding="utf-8"))
    assert llm_config["rope_theta"] == 10000.0  # the recipe's rotary base reaches the checkpoint
    record = read_record(location)
    assert record["metrics"]["steps"] == 3
    assert record["base_checkpoint"]["path"].endswith("base")

    # the two exports of the build: training phrasings and held-out ones never share a question frame
    work = models / ".demo-build"
    train = set(_first_questions(work / "export_train"))
    heldout = set(_first_questions(work / "export_heldout"))
    assert train and heldout and not (train & heldout)


def _first_questions(export: Path) -> list[str]:
    records = json.loads((export / "train.json").read_text(encoding="utf-8"))
    records += json.loads((export / "val.json").read_text(encoding="utf-8"))
    return [r["conversations"][0]["value"].rsplit("\n", 1)[-1] for r in records]


def test_staging_again_reuses_the_build_and_never_touches_real_weights(staged, tmp_path):
    models, _ = staged
    location = ModelManifest.load()["vila_m3_8b"].location(models)
    built = (location / DEMO_BUILD).read_text(encoding="utf-8")
    line = stage_demo_vlm(models, progress=False, overrides=QUICK)
    assert "already built" in line and (location / DEMO_BUILD).read_text(encoding="utf-8") == built

    real = ModelManifest.load()["vila_m3_8b"].location(tmp_path / "models")
    real.mkdir(parents=True)
    (real / "config.json").write_text('{"model_type": "llava_llama"}', encoding="utf-8")
    line = stage_demo_vlm(tmp_path / "models", progress=False, overrides=QUICK)
    assert "real weights staged" in line
    assert [p.name for p in real.iterdir()] == ["config.json"]


def test_experts_without_weights_get_random_stand_ins_that_say_so(tmp_path):
    from vila_m3.tasks import select_tasks, task_statuses
    from vila_m3.training.demo import stage_demo_experts

    lines = stage_demo_experts(tmp_path / "models", overrides={"vista3d": {"train": False}, "brats": {"train": False}})
    assert len(lines) == 3 and all("RANDOM stand-in" in line for line in lines)
    statuses = task_statuses(select_tasks("vista3d,brats,cxr"), tmp_path / "models")
    assert all(status.available and status.stand_in for status in statuses)
    assert all("not a medical model" in " ".join(status.stand_in_notes) for status in statuses)


def test_the_demo_vista3d_and_brats_are_trained_on_phantoms_once_and_say_so(tmp_path):
    """With the recipe's ``experts`` section, the VISTA3D and BRATS stand-ins are trained (two steps
    here), measured on the sample study they never saw, labelled as what they are, and reused while
    their recipe is unchanged; the CXR ensemble stays random and says so."""
    from vila_m3.tasks import select_tasks, task_statuses
    from vila_m3.training.demo import stage_demo_experts
    from vila_m3.training.vista3d_stand_in import TRAINING_RECORD

    models = tmp_path / "models"
    lines = stage_demo_experts(models, overrides=QUICK["experts"], log=lambda text: None)
    assert lines[0].startswith("vista3d: tiny stand-in trained on synthetic phantom CTs")
    assert "Dice on the sample CT" in lines[0] and "hepatic tumor" in lines[0]
    assert lines[1].startswith("brats: tiny stand-in trained on synthetic phantom brain MRIs")
    assert "Dice on the sample MRI" in lines[1] and "whole tumor" in lines[1]
    assert lines[2] == "cxr: tiny RANDOM stand-in weights (its results say so)"
    bundle = ModelManifest.load()["vista3d"].location(models)
    record = json.loads((bundle / TRAINING_RECORD).read_text(encoding="utf-8"))
    assert len(record["losses"]) == 2 and record["recipe"]["study_seeds"] == [1]
    assert set(record["learned"].values()) == {"liver", "spleen", "right kidney", "left kidney", "hepatic tumor"}
    status = task_statuses(select_tasks("vista3d"), models)[0]
    assert status.available and status.stand_in
    assert "trained on synthetic phantom CTs" in " ".join(status.stand_in_notes)
    brats = ModelManifest.load()["brats_mri_segmentation"].location(models)
    record = json.loads((brats / TRAINING_RECORD).read_text(encoding="utf-8"))
    assert len(record["losses"]) == 2 and list(record["learned"].values()) == ["tumor core", "whole tumor",
                                                                                "enhancing tumor"]
    status = task_statuses(select_tasks("brats"), models)[0]
    assert status.available and status.stand_in
    assert "trained on synthetic phantom brain MRIs" in " ".join(status.stand_in_notes)

    weights = (bundle / "models" / "model.pt").read_bytes()
    again = stage_demo_experts(models, overrides=QUICK["experts"], log=lambda text: None)
    assert again[:2] == ["vista3d: demo stand-in already trained on synthetic phantom CTs",
                         "brats: demo stand-in already trained on synthetic phantom brain MRIs"]
    assert (bundle / "models" / "model.pt").read_bytes() == weights


def test_make_run_stages_nothing_beside_real_weights(tmp_path):
    """``vila-m3 models demo --if-no-weights`` (what ``make run`` calls) leaves a models directory with real
    weights of any model exactly as it is, and names them."""
    import subprocess
    import sys

    models = tmp_path / "models"
    bundle = ModelManifest.load()["vista3d"].location(models)
    (bundle / "configs").mkdir(parents=True)
    (bundle / "configs" / "metadata.json").write_text('{"version": "0.5.4"}', encoding="utf-8")
    before = sorted(str(p.relative_to(models)) for p in models.rglob("*"))

    done = subprocess.run([sys.executable, "-m", "vila_m3.cli", "models", "demo", "--if-no-weights", "--models-dir",
                           str(models), "--no-progress"], capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stderr
    assert "real weights staged" in done.stdout and "vista3d" in done.stdout
    assert sorted(str(p.relative_to(models)) for p in models.rglob("*")) == before


def test_make_run_checks_its_settings_before_building_the_demo(tmp_path):
    """``vila-m3 serve --demo-if-no-weights`` (``make run``) refuses a bad setting at once, before any build."""
    import subprocess
    import sys

    models = tmp_path / "models"
    done = subprocess.run([sys.executable, "-m", "vila_m3.cli", "serve", "--demo-if-no-weights", "--studies",
                           str(tmp_path / "no-such-folder"), "--models-dir", str(models)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2 and "does not exist" in done.stderr
    assert not models.exists()


@pytest.mark.parametrize(("text", "problem"), [
    ("training: [1, 2", "is not valid YAML"),
    ("- 3\n", "must be a mapping"),
    ("trainig:\n  max_steps: 3\n", "unknown keys: trainig"),
    ("experts:\n  cxr:\n    steps: 3\n", "unknown experts keys: cxr .*has vista3d, brats"),
    ("experts:\n  brats:\n    crop: [8, 8, 8]\n", "experts brats: crop must be three voxel counts"),
    ("experts:\n  vista3d:\n    steps: 0\n", "experts vista3d: .*steps >= 1"),
    ("experts:\n  vista3d:\n    epochs: 2\n", "unknown VISTA3D stand-in training keys: epochs"),
    ("cpu_threads: 0\n", r"recipe.yaml: cpu_threads must be a whole number >= 1, got 0"),
    ("cpu_threads: two\n", r"cpu_threads must be a whole number >= 1, got 'two'"),
])
def test_a_bad_demo_recipe_is_named(tmp_path, text, problem):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(text, encoding="utf-8")
    with pytest.raises(DemoError, match=problem):
        load_demo_recipe(recipe)


def test_a_missing_demo_recipe_is_named(tmp_path):
    with pytest.raises(DemoError, match="missing.yaml cannot be read"):
        load_demo_recipe(tmp_path / "missing.yaml")


def test_make_run_refuses_a_bad_demo_recipe_before_building(tmp_path, sample_data):
    """A demo recipe with a typo stops ``vila-m3 serve`` in one line, with nothing staged."""
    import subprocess
    import sys

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("trainig:\n  max_steps: 3\n", encoding="utf-8")
    models = tmp_path / "models"
    done = subprocess.run([sys.executable, "-m", "vila_m3.cli", "serve", "--demo-if-no-weights", "--demo-recipe",
                           str(recipe), "--studies", str(sample_data / "studies"), "--models-dir", str(models)],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 2, done.stdout
    assert done.stderr.strip().splitlines() == [f"error: demo recipe {recipe} has unknown keys: trainig"]
    assert not models.exists()


def test_a_change_of_training_code_retrains_the_stand_ins(monkeypatch):
    """A stand-in build is cached by its fingerprint; a new revision of the training code (which can
    change what an unchanged recipe learns) gives a new one, and ``train`` alone does not."""
    from vila_m3.training import stand_in_training
    from vila_m3.training.demo import TRAINABLE_EXPERTS

    for expert in TRAINABLE_EXPERTS.values():
        before = expert.fingerprint({"steps": 2})
        assert expert.fingerprint({"steps": 2, "train": True}) == before
        assert expert.fingerprint({"steps": 3}) != before
        with monkeypatch.context() as patch:
            patch.setattr(stand_in_training, "TRAINING_REVISION", stand_in_training.TRAINING_REVISION + 1)
            assert expert.fingerprint({"steps": 2}) != before


def test_the_demo_model_is_the_same_whatever_the_machine_s_thread_count(staged, tmp_path):
    """The fine-tuning runs on the recipe's fixed CPU thread count: a build on a machine whose torch
    uses another number of threads gives the same weights, to the bit, and the caller's setting is kept."""
    import torch
    from safetensors.torch import load_file

    from vila_m3.training.demo import build_demo_vlm

    models, _ = staged
    first = ModelManifest.load()["vila_m3_8b"].location(models)
    threads = torch.get_num_threads()
    other = 1 if threads > 1 else 3
    torch.set_num_threads(other)
    try:
        second = build_demo_vlm(tmp_path / "again", tmp_path / "work", overrides=QUICK, progress=False,
                                log=lambda text: None).checkpoint
        assert torch.get_num_threads() == other
    finally:
        torch.set_num_threads(threads)
    for part in ("llm", "mm_projector", "vision_tower"):
        files = sorted(p.name for p in (first / part).glob("*.safetensors"))
        assert files == sorted(p.name for p in (second / part).glob("*.safetensors")) and files
        for name in files:
            a, b = load_file(first / part / name), load_file(second / part / name)
            assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a), f"{part}/{name}"
