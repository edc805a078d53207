"""The expert service: runners built once, released when idle, results cached until the study changes."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from vila_m3.experts.service import ExpertService, LruCache
from vila_m3.standins.stand_ins import stage_stand_ins


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("service-models")
    stage_stand_ins(root, ("vista3d",))
    return root


def test_an_idle_runner_frees_its_weights_and_reloads_on_the_next_request(models_dir, sample_data, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    shutil.copyfile(sample_data / "studies" / "ct_abdomen.nii.gz", ct)
    service = ExpertService(models_dir, idle_release_s=0.3)
    try:
        first = service.segment_ct(ct, argument="hepatic tumor")
        runner = service._runners["VISTA3D"]
        assert not first.cached and runner.loaded and runner.load_count == 1
        deadline = time.monotonic() + 10
        while runner.loaded and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not runner.loaded, "the idle runner was not released"
        second = service.segment_ct(ct, argument="organs")
        assert not second.cached and runner.loaded and runner.load_count == 2
    finally:
        service.close()


def test_results_are_cached_until_the_file_changes(models_dir, sample_data, tmp_path):
    ct = tmp_path / "ct.nii.gz"
    shutil.copyfile(sample_data / "studies" / "ct_abdomen.nii.gz", ct)
    service = ExpertService(models_dir, idle_release_s=0)
    try:
        assert not service.segment_ct(ct, argument="skeleton").cached
        assert service.segment_ct(ct, argument="skeleton").cached
        assert not service.segment_ct(ct, label_ids=[21]).cached  # another prompt is another result
        stat = ct.stat()
        os.utime(ct, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert not service.segment_ct(ct, argument="skeleton").cached, "a changed study must be run again"
    finally:
        service.close()


def test_an_expert_without_a_runner_is_refused(models_dir):
    service = ExpertService(models_dir, idle_release_s=0)
    with pytest.raises(ValueError, match="VISTA2D has no runner"):
        service.run("VISTA2D", ("key",), lambda runner: None)


def test_the_lru_cache_keeps_the_most_recently_used():
    cache = LruCache(2)
    cache.put("a", 1)
    cache.put("b", 2)
    assert cache.get("a") == 1
    cache.put("c", 3)
    assert cache.get("b") is None and cache.get("a") == 1 and cache.get("c") == 3 and len(cache) == 2
