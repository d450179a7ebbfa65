"""A training run with gradual pruning, killed with SIGKILL at random steps and resumed from
its last checkpoint each time, ends bit for bit where an uninterrupted run ends."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import safetensors.torch
import torch

from secateurs import checkpoint

SCRIPT = Path(__file__).parent / "scripts" / "crash_train.py"
STEPS = 60
KILLS = 3
TIMEOUT = 90.0


def _launch(out: Path) -> subprocess.Popen[str]:
    cmd = [sys.executable, str(SCRIPT), str(out), "--steps", str(STEPS), "--every", "2",
           "--delay", "0.01"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)


def _run_until(proc: subprocess.Popen[str], target: int, rng: random.Random) -> int:
    """Read ``step N`` lines until ``N >= target``, wait a random moment, SIGKILL."""
    watchdog = threading.Timer(TIMEOUT, proc.kill)
    watchdog.start()
    last = -1
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            last = int(line.split()[1])
            if last >= target:
                break
        # Land anywhere: inside the next step, inside a checkpoint write, or in the sleep.
        threading.Event().wait(rng.uniform(0.0, 0.01))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
    return last


def _bytes_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().reshape(-1).view(torch.uint8), b.contiguous().reshape(-1).view(torch.uint8))


@pytest.mark.slow
def test_sigkilled_run_resumes_bit_for_bit(tmp_path: Path) -> None:
    seed = random.randrange(2**32)
    rng = random.Random(seed)
    reference_dir, crashed_dir = tmp_path / "reference", tmp_path / "crashed"
    reference_dir.mkdir()
    crashed_dir.mkdir()
    reference = _launch(reference_dir)  # runs alongside the crashing ones
    killed_at = []
    for target in sorted(rng.sample(range(3, STEPS - 3), KILLS)):
        proc = _launch(crashed_dir)
        killed_at.append(_run_until(proc, target, rng))
        assert proc.returncode == -signal.SIGKILL, (seed, proc.stderr and proc.stderr.read())
    final = _launch(crashed_dir)
    _, err = final.communicate(timeout=TIMEOUT)
    assert final.returncode == 0, err
    _, err = reference.communicate(timeout=TIMEOUT)
    assert reference.returncode == 0, err

    assert all(0 < k < STEPS for k in killed_at), killed_at
    # A kill inside a write leaves its temporary file, never a damaged checkpoint; the
    # next save to that path removes it.
    assert checkpoint.read_info(crashed_dir / "last.safetensors").sections[0] == "model"
    assert not list(crashed_dir.glob(".*.tmp")), sorted(crashed_dir.iterdir())
    ref = safetensors.torch.load_file(reference_dir / "final.safetensors")
    got = safetensors.torch.load_file(crashed_dir / "final.safetensors")
    assert sorted(ref) == sorted(got)
    assert any(k.startswith("masks/") and not bool(v.all()) for k, v in ref.items())
    differ = [k for k in ref if not _bytes_equal(ref[k], got[k])]
    assert not differ, f"kills at steps {killed_at} (seed {seed}) changed {differ}"
