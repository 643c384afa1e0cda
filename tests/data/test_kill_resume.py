"""SIGKILL a real training process with a 2-worker shuffled loader mid-epoch; the resumed run matches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from tests.shared_reference import session_environment, shared_run

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "dataloader_resume.py"
BATCHES_PER_EPOCH = 12  # 90 samples, batch size 8


def run(run_dir: Path, loader: str, final: Path | None = None, kill_after: int | None = None) -> list[str]:
    cmd = [sys.executable, str(SCRIPT), "--run-dir", str(run_dir), "--loader", loader, "--epochs", "2"]
    if final is not None:
        cmd += ["--final", str(final)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line.strip())
            if kill_after is not None and line.startswith(f"step {kill_after} "):
                os.kill(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    if kill_after is None:
        assert proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
    return [line for line in lines if line.startswith("step ")]


def tensors(path: Path) -> dict[str, torch.Tensor]:
    with safe_open(str(path / "rank00000.safetensors"), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


@pytest.fixture(scope="module")
def references(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], Path]]:
    """One uninterrupted run per loader kind, shared by its kill points on every xdist worker; each
    test also shows it reproducible (the killed run's steps before the kill must equal it)."""
    cache: dict[str, tuple[list[str], Path]] = {}

    def get(loader: str) -> tuple[list[str], Path]:
        if loader not in cache:
            key = {"script": str(SCRIPT), "loader": loader, "epochs": 2, "env": session_environment()}
            base, saved = shared_run(tmp_path_factory, f"dataloader-{loader}", key,
                                     lambda base: {"steps": run(base / "run", loader, final=base / "final")})
            cache[loader] = (saved["steps"], base / "final")
        return cache[loader]

    return get  # type: ignore[return-value]


MID, BOUNDARY, SECOND = 5, BATCHES_PER_EPOCH, BATCHES_PER_EPOCH + 4  # mid-epoch, right at the boundary, epoch 2


@pytest.mark.parametrize("loader, kill_after", [
    ("plain", MID), ("plain", BOUNDARY), ("plain", SECOND),
    ("unbroken", MID), ("unbroken", SECOND),
    ("stateful", MID), ("stateful", BOUNDARY), ("stateful", SECOND),
])
def test_killed_mid_epoch_resumes_the_same_batches(tmp_path: Path, references, loader: str, kill_after: int) -> None:
    if loader == "stateful":
        pytest.importorskip("torchdata.stateful_dataloader")
    reference, reference_final = references(loader)
    assert len(reference) == 2 * BATCHES_PER_EPOCH
    head = run(tmp_path / "run", loader, kill_after=kill_after)
    assert head == reference[:kill_after]  # the first run is the reference run up to the kill
    rest = run(tmp_path / "run", loader, final=tmp_path / "final")
    resumed_at = int(rest[0].split()[1]) - 1
    assert resumed_at <= kill_after
    assert rest == reference[resumed_at:]  # same batches (crc of bytes) and same losses, bit for bit
    ref_t, got_t = tensors(reference_final), tensors(tmp_path / "final")
    assert ref_t.keys() == got_t.keys()
    for name in ref_t:
        assert torch.equal(ref_t[name].reshape(-1).view(torch.uint8), got_t[name].reshape(-1).view(torch.uint8)), name
