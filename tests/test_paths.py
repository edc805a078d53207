"""The path rules of client-named ids, tags and upload names (vila_m3.security.paths)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vila_m3.security.paths import (
    MAX_ID_LENGTH,
    OutsideRootError,
    UnsafeNameError,
    check_id,
    contained,
    is_valid_id,
    is_within,
    upload_stem,
    upload_suffix,
)

pytestmark = pytest.mark.security

GOOD_IDS = ["ct_abdomen", "brain_mri_t1c", "1.2.840.113619.2.55", "_scratch", "case 12", "a+b", "x-1", "a" * MAX_ID_LENGTH]
BAD_IDS = ["", ".", "..", "../../x/", ".bashrc", "a/b", "a\\b", "/etc/passwd", "x..y", "ct\n", "ct\x00", "-rf",
           "trailing ", " leading", "dot.", "a" * (MAX_ID_LENGTH + 1), "tab\there", "ünïcode"]


@pytest.mark.parametrize("value", GOOD_IDS)
def test_plain_ids_are_accepted_as_they_are(value):
    assert is_valid_id(value)
    assert check_id(value) == value


@pytest.mark.parametrize("value", BAD_IDS)
def test_ids_with_separators_dots_or_control_characters_are_refused(value):
    assert not is_valid_id(value)
    with pytest.raises(UnsafeNameError, match="tag .* is not a valid id"):
        check_id(value, "tag")


@pytest.mark.parametrize("value", [None, 5, ["ct"], {"a": 1}])
def test_non_strings_are_refused_by_type_name(value):
    with pytest.raises(UnsafeNameError, match=type(value).__name__):
        check_id(value)


def test_a_trailing_newline_does_not_pass_the_anchor():
    assert not is_valid_id("ct_abdomen\n")  # `$` would have matched before the newline


def test_contained_resolves_inside_the_base(tmp_path):
    assert contained(tmp_path, "labels", "final", "ct.nii.gz") == tmp_path.resolve() / "labels" / "final" / "ct.nii.gz"


@pytest.mark.parametrize("parts", [("..", "x"), ("../../x/.bashrc",), ("labels", "../../../x", "evil.nii.gz"),
                                   ("/etc/passwd",), (".",), ("labels", "..")])
def test_contained_refuses_what_resolves_outside_or_onto_the_base(tmp_path, parts):
    with pytest.raises(OutsideRootError) as caught:
        contained(tmp_path / "studies", *parts)
    assert str(tmp_path) not in str(caught.value)  # the message names no path


def test_contained_follows_symbolic_links(tmp_path):
    base = tmp_path / "studies"
    base.mkdir()
    outside = tmp_path / "outside"
    outside.mkdir()
    (base / "link").symlink_to(outside, target_is_directory=True)
    with pytest.raises(OutsideRootError):
        contained(base, "link", "ct.nii.gz")
    (base / "inner").mkdir()
    (base / "inner_link").symlink_to(base / "inner", target_is_directory=True)
    assert contained(base, "inner_link", "ct.nii.gz") == base.resolve() / "inner" / "ct.nii.gz"


def test_a_symlinked_base_is_resolved_once(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    alias = tmp_path / "alias"
    alias.symlink_to(real, target_is_directory=True)
    assert contained(alias, "ct.nii.gz") == real.resolve() / "ct.nii.gz"


def test_is_within_the_allowed_roots(tmp_path):
    studies, sessions = tmp_path / "studies", tmp_path / "sessions"
    for folder in (studies, sessions):
        folder.mkdir()
    inside = sessions / "abc" / "volume.nrrd"
    assert is_within(inside, [studies, sessions])
    assert not is_within(tmp_path / "other.nii.gz", [studies, sessions])
    assert not is_within(studies, [studies])  # the root itself is not a file inside it
    assert not is_within(f"{studies}/../other", [studies])
    assert not is_within("", [studies])
    assert not is_within("/", [studies, sessions])
    os.symlink(tmp_path / "other.nii.gz", studies / "escape.nii.gz")
    assert not is_within(studies / "escape.nii.gz", [studies])


def test_upload_suffix_takes_the_longest_allowed_suffix_only():
    allowed = [".nii.gz", ".nii", ".nrrd"]
    assert upload_suffix("scan.v2.NII.GZ", allowed) == ".nii.gz"
    assert upload_suffix("dir/../scan.nrrd", allowed) == ".nrrd"
    for name in ("a.bashrc", ".nii.gz", "", None, "scan.nii.gz/"):
        with pytest.raises(UnsafeNameError, match="must end in one of"):
            upload_suffix(name, allowed)


def test_upload_stem_is_a_checked_id():
    assert upload_stem("ct_abdomen.nii.gz", ".nii.gz") == "ct_abdomen"
    with pytest.raises(UnsafeNameError):
        upload_stem("..nii.gz", ".nii.gz")
    with pytest.raises(UnsafeNameError):
        upload_stem(".hidden.nii.gz", ".nii.gz")


def test_paths_module_needs_no_web_framework():
    source = (Path(__file__).resolve().parents[1] / "src" / "vila_m3" / "security" / "paths.py").read_text()
    assert "fastapi" not in source and "monailabel" not in source


def test_scrub_paths_names_known_files_by_their_ids_and_others_by_file_name():
    from vila_m3.security.paths import scrub_paths

    known = {"/srv/studies/my scans/ct_abdomen.nii.gz": "ct_abdomen"}
    assert scrub_paths("/srv/studies/my scans/ct_abdomen.nii.gz: the file is empty", known) == "ct_abdomen: the file is empty"
    assert scrub_paths("/work/app: no DICOM series in this folder") == "app: no DICOM series in this folder"
    assert scrub_paths("read 'C:\\data\\ct.nii.gz' failed") == "read 'ct.nii.gz' failed"
    untouched = "expected one of .nii.gz, .nii or a DICOM folder; t1c/t1 and/or 3/4"
    assert scrub_paths(untouched) == untouched
