"""Model staging: list, pull (from a local HTTP server on 127.0.0.1), verify, and offline failures."""

from __future__ import annotations

import functools
import http.server
import io
import json
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import free_port, isolated_env

from vila_m3.models.manifest import ModelManifest
from vila_m3.models.staging import PULL_RECORD, StagingError, pull, verify
from vila_m3.tasks import select_tasks, task_statuses

BUNDLE_FILES = {
    "configs/inference.json": b'{"network_def": {}}',
    "configs/metadata.json": b'{"version": "0.5.4"}',
    "models/model.pt": b"\x80\x02weights",
    "docs/README.md": b"# bundle",
}


@pytest.fixture()
def file_server(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving ``tmp_path/www``; yields (base URL, folder)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", root
    finally:
        server.shutdown()
        server.server_close()


def bundle_zip(files: dict[str, bytes], top: str = "vista3d") -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(f"{top}/{name}", data)
    return buffer.getvalue()


def manifest_for(base_url: str) -> ModelManifest:
    return ModelManifest.load({
        "models": {
            "vista3d": {
                "kind": "monai_bundle",
                "source": {"hub": "monai_model_zoo", "name": "vista3d", "version": "0.5.4",
                           "url": f"{base_url}/vista3d_v0.5.4.zip", "archive": "zip"},
                "path": "bundles/vista3d",
                "required": ["configs/inference.json", "configs/metadata.json", "models/model.pt"],
            },
            "xrv_a": {"kind": "xrv_weights", "source": {"hub": "url", "url": f"{base_url}/a-best.pt"},
                      "path": "torchxrayvision/a-best.pt"},
        }
    })


def test_pull_unpacks_a_bundle_and_records_checksums_that_verify(file_server, tmp_path):
    base_url, www = file_server
    (www / "vista3d_v0.5.4.zip").write_bytes(bundle_zip(BUNDLE_FILES))
    entry = manifest_for(base_url)["vista3d"]
    models = tmp_path / "models"

    assert verify(entry, models).state == "not staged"
    report = pull(entry, models)
    assert report.state == "ready"
    for name, data in BUNDLE_FILES.items():
        assert (models / "bundles/vista3d" / name).read_bytes() == data
    record = json.loads((models / "bundles/vista3d" / PULL_RECORD).read_text(encoding="utf-8"))
    assert set(record["sha256"]) == set(BUNDLE_FILES)

    (models / "bundles/vista3d/models/model.pt").write_bytes(b"truncated")
    broken = verify(entry, models)
    assert broken.state == "corrupt"
    assert broken.problems == [f"checksum mismatch: {models / 'bundles/vista3d/models/model.pt'}"]


def test_pull_of_a_single_weight_file_and_a_second_pull_changes_nothing(file_server, tmp_path):
    base_url, www = file_server
    (www / "a-best.pt").write_bytes(b"x" * 3_000_000)
    entry = manifest_for(base_url)["xrv_a"]
    models = tmp_path / "models"
    assert pull(entry, models).state == "ready"
    target = models / "torchxrayvision/a-best.pt"
    assert target.read_bytes() == b"x" * 3_000_000
    (www / "a-best.pt").unlink()  # a verified model is not fetched again
    assert pull(entry, models).state == "ready"
    assert sorted(p.name for p in target.parent.iterdir()) == ["a-best.pt", "a-best.pt" + PULL_RECORD]


def test_pull_offline_fails_in_one_message_naming_what_to_copy_where(tmp_path):
    entry = manifest_for(f"http://127.0.0.1:{free_port()}")["vista3d"]  # nothing listens there
    models = tmp_path / "models"
    with pytest.raises(StagingError) as failure:
        pull(entry, models)
    message = str(failure.value)
    assert "\n" not in message
    assert "cannot download vista3d from MONAI model zoo vista3d 0.5.4" in message
    assert f"copy <models dir>/bundles/vista3d/ to {models / 'bundles/vista3d'}" in message
    assert not (models / "bundles/vista3d").exists(), "a failed pull leaves nothing behind"


def test_pull_rejects_an_archive_that_escapes_its_folder(file_server, tmp_path):
    base_url, www = file_server
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("../../evil.txt", b"x")
    (www / "vista3d_v0.5.4.zip").write_bytes(buffer.getvalue())
    with pytest.raises(StagingError, match="outside"):
        pull(manifest_for(base_url)["vista3d"], tmp_path / "models")
    assert not (tmp_path / "evil.txt").exists()


def test_hand_copied_files_are_reported_unverified_and_a_missing_file_incomplete(tmp_path):
    entry = manifest_for("http://127.0.0.1:9")["vista3d"]
    models = tmp_path / "models"
    for name, data in BUNDLE_FILES.items():
        (models / "bundles/vista3d" / name).parent.mkdir(parents=True, exist_ok=True)
        (models / "bundles/vista3d" / name).write_bytes(data)
    assert verify(entry, models).state == "unverified"
    (models / "bundles/vista3d/models/model.pt").unlink()
    report = verify(entry, models)
    assert report.state == "incomplete"
    assert report.problems == [f"missing {models / 'bundles/vista3d/models/model.pt'}"]


def test_pinned_checksums_take_precedence(tmp_path):
    manifest = ModelManifest.load({"models": {"xrv_a": {
        "kind": "xrv_weights", "source": {"url": "http://127.0.0.1:9/a.pt"}, "path": "a.pt",
        "sha256": {"a.pt": "0" * 64}}}})
    (tmp_path / "a.pt").write_bytes(b"weights")
    report = verify(manifest["xrv_a"], tmp_path)
    assert report.state == "corrupt"
    assert report.problems == [f"checksum mismatch: {tmp_path / 'a.pt'}"]


def test_staged_bundle_makes_its_task_available(tmp_path):
    models = tmp_path / "models"
    statuses = {s.name: s for s in task_statuses(select_tasks("vista3d,brats"), models)}
    assert not statuses["vista3d"].available
    for name, data in BUNDLE_FILES.items():
        (models / "bundles/vista3d" / name).parent.mkdir(parents=True, exist_ok=True)
        (models / "bundles/vista3d" / name).write_bytes(data)
    statuses = {s.name: s for s in task_statuses(select_tasks("vista3d,brats"), models)}
    assert statuses["vista3d"].available
    assert not statuses["brats"].available
    assert "bundles/brats_mri_segmentation" in statuses["brats"].reason


def run_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    env = isolated_env(tmp_path)
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{free_port()}"  # never the real hub
    return subprocess.run([sys.executable, "-m", "vila_m3.cli", "models", *args, "--models-dir", str(tmp_path / "m")],
                          capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120, env=env)


def test_cli_list_shows_every_manifest_model_and_where_it_goes(tmp_path):
    result = run_cli(tmp_path, "list")
    assert result.returncode == 0, result.stderr
    for model_id in ModelManifest.load().entries:
        assert model_id in result.stdout
    assert str(tmp_path / "m" / "bundles" / "vista3d") in result.stdout


def test_cli_verify_fails_for_a_named_model_that_is_not_staged(tmp_path):
    result = run_cli(tmp_path, "verify", "vista3d")
    assert result.returncode == 1
    assert result.stdout.startswith("vista3d: not staged")


def test_cli_pull_offline_is_one_line_per_model_and_no_traceback(tmp_path):
    result = run_cli(tmp_path, "pull", "vila_m3_3b")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot download vila_m3_3b from huggingface"), lines
    assert "vila-m3 models pull vila_m3_3b" in lines[0]


def test_cli_rejects_unknown_model_ids(tmp_path):
    result = run_cli(tmp_path, "pull", "llava")
    assert result.returncode == 2
    assert "unknown model id llava; valid ids are: vila_m3_3b" in result.stderr


def test_cli_pull_by_task_names_the_task_and_fails_offline_without_traceback(tmp_path):
    result = run_cli(tmp_path, "pull", "--task", "vila_m3", "--vlm", "vila_m3_3b")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert result.stderr.startswith("error: cannot download vila_m3_3b from huggingface MONAI/Llama3-VILA-M3-3B")
    unknown = run_cli(tmp_path, "pull", "--task", "segment")
    assert unknown.returncode == 2
    assert "unknown model 'segment' in --task; valid names are: all, vila_m3, vista3d, brats, cxr" in unknown.stderr


def test_stand_ins_are_flagged_in_the_task_report(tmp_path):
    from vila_m3.standins.stand_ins import stage_stand_ins
    from vila_m3.tasks import format_statuses

    stage_stand_ins(tmp_path / "models", ("brats",))
    statuses = task_statuses(select_tasks("brats,vista3d"), tmp_path / "models")
    assert statuses[0].available and statuses[0].stand_in
    assert "brats    available (STAND-IN weights: tiny random weights for tests; not a medical model)" in \
        format_statuses(statuses)
    assert not statuses[1].available and not statuses[1].stand_in


def test_stand_ins_never_overwrite_real_weights(tmp_path):
    from vila_m3.standins.stand_ins import stage_stand_ins

    real = tmp_path / "models" / "bundles" / "vista3d" / "configs"
    real.mkdir(parents=True)
    (real / "metadata.json").write_text('{"version": "0.5.4"}', encoding="utf-8")
    with pytest.raises(ValueError, match="not a stand-in; not overwriting it"):
        stage_stand_ins(tmp_path / "models", ("vista3d",))
    assert (real / "metadata.json").read_text(encoding="utf-8") == '{"version": "0.5.4"}'
