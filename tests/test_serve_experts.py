"""``vila-m3 serve`` knows the experts of extra experts files (``--conf experts_file``, ``$VILA_M3_EXPERTS``) as the
server does: its pre-start task list offers their tasks, and the server is told the files by absolute path."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from expert_plugin import write_toy_expert
from server_harness import free_port, isolated_env

from vila_m3.experts.registry import EXPERTS_ENV
from vila_m3.serve import plan_server


def run_serve(tmp_path: Path, *args: str, cwd: Path | None = None, env: dict[str, str] | None = None):
    command = [sys.executable, "-m", "vila_m3.cli", "serve", "--models-dir", str(tmp_path / "models"), *args]
    return subprocess.run(command, capture_output=True, text=True, encoding="utf-8", errors="replace", timeout=120,
                          env=env or isolated_env(tmp_path), cwd=cwd)


def test_serve_check_lists_the_toy_expert_of_an_experts_file_as_available(tmp_path, sample_data):
    experts_file = write_toy_expert(tmp_path / "site")
    result = run_serve(tmp_path, "--studies", str(sample_data / "studies"), "--port", str(free_port()), "--check",
                       "models", "toy,brats", "experts_file", experts_file.name, cwd=experts_file.parent)
    assert result.returncode == 0, result.stderr
    assert "Infer tasks (1 of 2 available)" in result.stdout, result.stdout
    lines = [line.split() for line in result.stdout.splitlines()]
    assert ["toy", "available"] in lines, result.stdout
    assert ["brats", "not", "available:", "weights", "not", "found:"] in [line[:6] for line in lines]


def test_serve_check_reads_experts_files_from_the_environment(tmp_path, sample_data):
    experts_file = write_toy_expert(tmp_path / "site")
    env = {**isolated_env(tmp_path), EXPERTS_ENV: str(experts_file)}
    result = run_serve(tmp_path, "--studies", str(sample_data / "studies"), "--port", str(free_port()), "--check",
                       "models", "toy", env=env)
    assert result.returncode == 0, result.stderr
    assert "Infer tasks (1 of 1 available)" in result.stdout, result.stdout


def test_serve_refuses_a_missing_experts_file_in_one_line(tmp_path, sample_data):
    result = run_serve(tmp_path, "--studies", str(sample_data / "studies"), "--port", str(free_port()), "--check",
                       "experts_file", str(tmp_path / "none.yaml"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "experts file none.yaml" in lines[0], result.stderr


def test_the_plan_passes_the_experts_file_on_by_absolute_path(tmp_path, sample_data, monkeypatch):
    experts_file = write_toy_expert(tmp_path / "site")
    monkeypatch.delenv(EXPERTS_ENV, raising=False)
    monkeypatch.chdir(experts_file.parent)
    plan = plan_server("127.0.0.1", free_port(), str(sample_data / "studies"), str(tmp_path / "models"),
                       {"models": "toy", "experts_file": experts_file.name})
    assert [status.name for status in plan.statuses if status.available] == ["toy"]
    assert plan.experts_files == (str(experts_file.resolve()),)
    command = plan.command()
    at = command.index("experts_file")
    assert command[at - 1] == "--conf" and command[at + 1] == str(experts_file.resolve())
    assert EXPERTS_ENV not in os.environ, "planning must not leave the experts files in this process's environment"
