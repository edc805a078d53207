"""``vila-m3 vlm inspect | ask`` on tiny checkpoints of both templates, as a user runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import isolated_env
from vlm_fixtures import tiny_llama3, tiny_vicuna  # noqa: F401  (session fixtures)


def vila_m3(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vila_m3.cli", "vlm", *args], capture_output=True, text=True, encoding="utf-8", errors="replace",
                          timeout=300, env=isolated_env(tmp_path))


@pytest.mark.parametrize("checkpoint", ["tiny_llama3", "tiny_vicuna"])
def test_inspect_describes_the_parts_and_says_it_is_a_stand_in(tmp_path, request, checkpoint):
    folder = request.getfixturevalue(checkpoint)
    result = vila_m3(tmp_path, "inspect", str(folder))
    assert result.returncode == 0, result.stderr
    assert "projector: mlp_downsample" in result.stdout
    assert "NOTE: tiny random weights for tests; not a medical model" in result.stdout


@pytest.mark.parametrize("checkpoint", ["tiny_llama3", "tiny_vicuna"])
def test_ask_answers_about_a_picture_and_a_volume_and_warns_about_random_weights(tmp_path, request, sample_data,
                                                                                  checkpoint):
    folder = request.getfixturevalue(checkpoint)
    result = vila_m3(tmp_path, "ask", str(folder), "What is shown?", "--image", str(sample_data / "studies/cxr_chest.png"),
                     "--image", str(sample_data / "studies/ct_abdomen.nii.gz"), "--experts", "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr
    assert "tiny random weights for tests; its words mean nothing" in result.stderr
    assert "tokens," in result.stderr.splitlines()[-1]


def test_ask_with_a_broken_checkpoint_is_one_line_naming_the_file(tmp_path, request):
    checkpoint = request.getfixturevalue("tiny_vicuna")
    broken = tmp_path / "broken"
    subprocess.run(["cp", "-r", str(checkpoint), str(broken)], check=True)
    (broken / "mm_projector" / "config.json").unlink()
    result = vila_m3(tmp_path, "ask", str(broken), "Hello?")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "mm_projector/config.json" in result.stderr.strip().splitlines()[-1]


def test_ask_with_too_many_images_for_the_placeholders_is_a_clear_error(tmp_path, request, sample_data):
    checkpoint = request.getfixturevalue("tiny_llama3")
    png = str(sample_data / "studies/cxr_chest.png")
    result = vila_m3(tmp_path, "ask", str(checkpoint), "<image> only one placeholder", "--image", png, "--image", png)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "image" in result.stderr.lower()
