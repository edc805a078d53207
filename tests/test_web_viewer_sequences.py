"""The web viewer's grouping of datastore images into four-sequence MRI studies (no browser needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "slicer_extension" / "VILAM3Chat"), str(REPO / "web")]
pytest.importorskip("trame_slicer", reason="the web extra is missing (pip install -e '.[web]')")

from vila_m3_viewer.brats import sequence_groups  # noqa: E402


def test_four_sequences_named_alike_form_one_study_whatever_their_aliases():
    images = ["brain_mri_t1c", "brain_mri_t1", "brain_mri_t2", "brain_mri_flair", "ct_abdomen",
              "case7_T1ce", "case7_t1w", "case7-T2W", "case7_t2flair"]
    assert sequence_groups(images) == {
        "brain_mri": {"t1c": "brain_mri_t1c", "t1": "brain_mri_t1", "t2": "brain_mri_t2", "flair": "brain_mri_flair"},
        "case7": {"t1c": "case7_T1ce", "t1": "case7_t1w", "t2": "case7-T2W", "flair": "case7_t2flair"},
    }


def test_a_study_missing_a_sequence_is_not_one():
    assert sequence_groups(["brain_mri_t1c", "brain_mri_t1", "brain_mri_flair", "ct_abdomen", "cxr_chest"]) == {}
