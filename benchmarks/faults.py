"""Fault campaigns against checkpoints: SIGKILLs, hostile files, a data-parallel resume.

Three campaigns, each small and bounded, each run in fresh processes:

- **Crash campaign.** (a) A gradual-pruning run (``tests/scripts/crash_train.py``,
  checkpoint every 2 steps) is SIGKILLed at random steps and resumed from its last
  checkpoint each time; after every kill the checkpoint is verified (hash included),
  and the final weights and masks are compared bit for bit with an uninterrupted run.
  (b) A loop saving a large model (``tests/scripts/save_loop.py``) is SIGKILLed at random
  moments, most inside a write; after every kill the file at the path must verify, and
  the temporary file a killed write leaves must be gone after the next save. Orphans
  left counts the temporary files in the folders at the end.
- **Hostile files.** ``tests/scripts/hostile_files.py``: every crafted file loaded into
  a live model, pruner and optimizer; refused (``CheckpointError``), worst time and worst
  peak RSS growth over the repeats, live objects unchanged.
- **DDP resume.** ``tests/scripts/ddp_train.py`` under ``torchrun`` (2 processes, gloo):
  runs resumed from a checkpoint taken between two mask updates against uninterrupted
  ones (``contribution``, with ``distributed.step`` and with a plain ``pruner.step()``),
  and a save whose writing rank fails.

Usage: ``python benchmarks/faults.py [--quick] [--results-dir DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from secateurs import checkpoint

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tests" / "scripts"
RESULTS = Path(__file__).resolve().parent / "results"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _verified(path: Path) -> bool:
    try:
        checkpoint.read_info(path)
    except checkpoint.CheckpointError:
        return False
    return True


def _orphans(folder: Path) -> int:
    return len(list(folder.glob(".*.tmp")))


def _kill_after_line(cmd: list[str], wait: float, rng: random.Random, until: int = 1,
                     timeout: float = 120.0) -> int:
    """Start ``cmd``, read ``until`` lines, wait up to ``wait`` s at random, SIGKILL.

    Returns the number read from the last line's second field.
    """
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                            env=ENV)
    watchdog = threading.Timer(timeout, proc.kill)
    watchdog.start()
    last = -1
    try:
        assert proc.stdout is not None
        for n, line in enumerate(proc.stdout, 1):
            last = int(line.split()[1])
            if n >= until:
                break
        time.sleep(rng.uniform(0.0, wait))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        watchdog.cancel()
    return last


def crash_training(kills: int, rng: random.Random, tmp: Path) -> dict[str, Any]:
    steps = 60
    crashed, reference = tmp / "crashed", tmp / "reference"
    crashed.mkdir()
    reference.mkdir()
    cmd = [sys.executable, str(SCRIPTS / "crash_train.py"), "--steps", str(steps), "--every",
           "2", "--delay", "0.01"]
    subprocess.run([*cmd[:2], str(reference), *cmd[2:]], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)
    verified = 0
    for _ in range(kills):  # about 2 steps per life: the run outlives every kill
        _kill_after_line([*cmd[:2], str(crashed), *cmd[2:]], 0.01, rng,
                         until=rng.randint(1, 3))
        verified += _verified(crashed / "last.safetensors")
    subprocess.run([*cmd[:2], str(crashed), *cmd[2:]], check=True, env=ENV,
                   stdout=subprocess.DEVNULL)
    ref = safetensors.torch.load_file(reference / "final.safetensors")
    got = safetensors.torch.load_file(crashed / "final.safetensors")
    exact = sorted(ref) == sorted(got) and all(
        ref[k].dtype == got[k].dtype and torch.equal(ref[k].view(torch.uint8).reshape(-1),
                                                     got[k].view(torch.uint8).reshape(-1))
        for k in ref)
    return {"kills": kills, "verified": verified, "exact": exact,
            "orphans": _orphans(crashed)}


def crash_saves(kills: int, params: int, rng: random.Random, tmp: Path) -> dict[str, Any]:
    out = tmp / "saves"
    out.mkdir()
    cmd = [sys.executable, str(SCRIPTS / "save_loop.py"), str(out), "--params", str(params)]
    start = time.perf_counter()
    _kill_after_line(cmd, 0.0, rng, until=2)  # a first complete checkpoint, timed
    save_s = (time.perf_counter() - start) / 2
    verified = inside = swept = 0
    for _ in range(kills):
        _kill_after_line(cmd, save_s * 1.5, rng, until=1)
        verified += _verified(out / "last.safetensors")
        inside += _orphans(out) > 0  # the kill landed inside a write
        before = _orphans(out)
        _kill_after_line(cmd, 0.0, rng, until=1)  # one complete save: sweeps what was left
        swept += before - _orphans(out) if before else 0
    _kill_after_line(cmd, 0.0, rng, until=1)
    size = (out / "last.safetensors").stat().st_size
    return {"kills": kills, "inside_write": inside, "verified": verified,
            "orphans": _orphans(out), "swept": swept, "bytes": size}


def hostile(repeat: int, tmp: Path) -> list[dict[str, Any]]:
    proc = subprocess.run([sys.executable, str(SCRIPTS / "hostile_files.py"), str(tmp / "h"),
                           "--repeat", str(repeat)], capture_output=True, text=True,
                          env=ENV, timeout=600, check=True)
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def ddp(tmp: Path) -> list[dict[str, Any]]:
    out = tmp / "ddp"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    "--nproc_per_node=2", str(SCRIPTS / "ddp_train.py"), str(out)],
                   check=True, env=ENV, capture_output=True, timeout=600)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


def section(args: argparse.Namespace, train: dict[str, Any], saves: dict[str, Any],
            files: list[dict[str, Any]], ranks: list[dict[str, Any]], load: float) -> str:
    flags = " --quick" if args.quick else ""
    refused = sum(r["outcome"] == "refused" and r["unchanged"] for r in files)
    slowest = max(files, key=lambda r: r["seconds"])
    largest = max(files, key=lambda r: r["rss_growth_mb"] or 0.0)
    resume = [(case, [r["resume"][case] for r in ranks])
              for case in ("contribution", "contribution_plain")]
    fail = [r["writer_fails"] for r in ranks]
    lines = [
        "## Fault campaigns: kills, hostile files, a data-parallel resume",
        "",
        f"Command: `python benchmarks/faults.py{flags}`. Machine: {os.cpu_count()} cores, "
        f"{platform.machine()}, torch {torch.__version__}, load average {load:.1f} when it "
        "started. Each campaign runs in fresh processes; kill moments are random (seed "
        f"{args.seed}).",
        "",
        "### Crash campaign (SIGKILL)",
        "",
        "| campaign | kills | kills inside a write | checkpoints verified after a kill | "
        "bit-exact resume | orphans left |",
        "|---|---|---|---|---|---|",
        f"| gradual pruning, checkpoint every 2 steps (`crash_train.py`) | {train['kills']} | "
        f"- | {train['verified']}/{train['kills']} | {'yes' if train['exact'] else 'NO'} | "
        f"{train['orphans']} |",
        f"| saves of a {saves['bytes'] / 2**20:.0f} MiB checkpoint in a loop "
        f"(`save_loop.py`) | {saves['kills']} | {saves['inside_write']} | "
        f"{saves['verified']}/{saves['kills']} | - | {saves['orphans']} |",
        "",
        f"Every temporary file a kill left inside a write ({saves['swept']} of them) was "
        "removed by the next save to the same path.",
        "",
        "### Hostile files",
        "",
        f"{refused} of {len(files)} crafted files refused with `CheckpointError`, live "
        f"objects unchanged; slowest refusal {slowest['seconds'] * 1e3:.1f} ms "
        f"({slowest['case']}), largest peak RSS growth {largest['rss_growth_mb'] or 0:.1f} MB "
        f"({largest['case']}); worst of {args.repeat} loads each.",
        "",
        "| case | outcome | time | peak RSS growth |",
        "|---|---|---|---|",
        *[f"| {r['case']} | {r['outcome']} | {r['seconds'] * 1e3:.1f} ms | "
          f"{r['rss_growth_mb'] or 0:.1f} MB |" for r in files],
        "",
        "### DDP resume (torchrun, 2 processes, gloo)",
        "",
        "A `contribution` run with `update_every=2`, checkpointed after step 4 (each rank's "
        "statistics then hold a batch no mask update has seen), resumed into fresh objects "
        "on both ranks, against the uninterrupted run:",
        "",
        "| stepping | weights bit-exact (rank 0, 1) | masks bit-exact (rank 0, 1) | "
        "mask elements that differ |",
        "|---|---|---|---|",
        *[f"| {'`distributed.step`' if case == 'contribution' else 'plain `pruner.step()`'} | "
          f"{', '.join('yes' if r['weights_equal'] else 'NO' for r in rows)} | "
          f"{', '.join('yes' if r['masks_equal'] else 'NO' for r in rows)} | "
          f"{sum(r['mask_elements_differ'] for r in rows)} |" for case, rows in resume],
        "",
        f"A save whose writing rank fails (no such folder): rank 0 raised "
        f"`{fail[0]['raised']}` after {fail[0]['seconds'] * 1e3:.0f} ms, rank 1 "
        f"`{fail[1]['raised']}` naming it after {fail[1]['seconds'] * 1e3:.0f} ms.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="few kills, small model")
    parser.add_argument("--results-dir", type=Path, default=RESULTS)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    args.repeat = 1 if args.quick else 3
    rng = random.Random(args.seed)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        train = crash_training(3 if args.quick else 20, rng, tmp)
        print("crash_train:", train, flush=True)
        saves = crash_saves(3 if args.quick else 12, 2_000_000 if args.quick else 25_000_000,
                            rng, tmp)
        print("save_loop:", saves, flush=True)
        files = hostile(args.repeat, tmp)
        print(f"hostile files: {len(files)} cases", flush=True)
        ranks = ddp(tmp)
    text = section(args, train, saves, files, ranks, load)
    print(text)
    args.results_dir.mkdir(parents=True, exist_ok=True)
    (args.results_dir / "faults.md").write_text(text)


if __name__ == "__main__":
    main()
