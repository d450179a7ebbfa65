"""``secateurs tune`` and ``secateurs sensitivity`` with tiny settings: report folders,
metrics.json's chosen configuration, resuming, and argument errors."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from secateurs.cli import build_parser, main

TINY = ["--epochs", "1", "--finetune-epochs", "2", "--no-progress", "--threads", "1"]


def only_folder(base: Path) -> Path:
    (folder,) = [p for p in base.iterdir() if p.is_dir()]
    return folder


@pytest.mark.parametrize("command", ["tune", "sensitivity"])
def test_help_lists_the_options(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--task", "--option", "--epochs", "--out", "--no-progress", "--sparsities"):
        assert option in out
    if command == "tune":
        assert all(o in out for o in ("--budget", "--relative", "--folds", "--resume"))
    else:
        assert all(o in out for o in ("--overall", "--weights"))


@pytest.mark.slow
def test_tune_writes_a_report_whose_metrics_state_the_choice_and_resumes(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["tune", "--task", "digits", "--budget", "0.05", "--methods", "budget,gradual",
            "--sparsities", "0.5", "--out", str(tmp_path), *TINY]
    assert main(argv) == 0
    folder = only_folder(tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    chosen, baseline = metrics["chosen"], metrics["baseline"]
    assert set(chosen) >= {"config", "sparsity", "val", "test", "weights"}
    assert chosen["val"] >= metrics["limit"] == pytest.approx(baseline["val"] - 0.05)
    assert 0.0 <= chosen["sparsity"] < 1.0 and (folder / chosen["weights"]).is_file()
    assert metrics["command"].startswith("secateurs tune --task digits")
    for name in ("report.md", "pareto_sparsity.png", "pareto_macs.png", "sensitivity.png",
                 "trials.jsonl"):
        assert (folder / name).is_file()
    report = (folder / "report.md").read_text()
    assert "**Chosen**" in report and "## Sensitivity" in report
    lines = (folder / "trials.jsonl").read_text().splitlines()
    assert len(lines) == 3  # dense, budget, gradual 50%
    out = capsys.readouterr().out
    assert "Chosen:" in out and "budget criterion=magnitude" in out
    assert main([*argv, "--resume", str(folder)]) == 0
    assert (folder / "trials.jsonl").read_text().splitlines() == lines  # nothing rerun
    assert json.loads((folder / "metrics.json").read_text())["chosen"] == chosen


def test_tune_accepts_a_user_task_and_cross_validation(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "user_tasks.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn
        from secateurs.tasks import ClassificationTask
        from secateurs.train import Split, Splits

        def blobs(seed=0):
            g = torch.Generator().manual_seed(1)
            y = torch.arange(200) % 2
            x = torch.randn(200, 6, generator=g) + 2.0 * (2 * y[:, None] - 1).float()
            data = Splits(Split(x[:120], y[:120]), Split(x[120:160], y[120:160]),
                          Split(x[160:], y[160:]))
            return ClassificationTask("blobs", data, lambda: nn.Sequential(
                nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2)), 2, lr=0.05,
                batch_size=20, epochs=2, seed=seed)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "runs"
    assert main(["tune", "--task", "user_tasks:blobs", "--folds", "2", "--methods",
                 "oneshot,clipping", "--sparsities", "0.5", "--thresholds", "0.05",
                 "--out", str(out), *TINY]) == 0
    folder = only_folder(out)
    assert {f.name for f in folder.glob("dense-fold*.pt")} == \
        {"dense-fold1.pt", "dense-fold2.pt", "dense-fold0.pt"}
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["settings"]["folds"] == 2 and "search_val" in metrics["chosen"]


def test_sensitivity_prints_and_reports_the_allocation(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["sensitivity", "--task", "digits", "--sparsities", "0.5,0.9", "--overall",
                 "0.6", "--out", str(tmp_path), "--epochs", "1", "--no-progress"]) == 0
    folder = only_folder(tmp_path)
    metrics = json.loads((folder / "metrics.json").read_text())
    chosen = metrics["chosen"]
    assert chosen["sparsity"] == 0.6 and set(chosen["allocation"]) == {
        "features.0.weight", "features.2.weight", "classifier.1.weight", "classifier.3.weight"}
    assert 0.0 <= chosen["metric"] <= 1.0 and 0.0 <= chosen["baseline"] <= 1.0
    assert (folder / "sensitivity.png").is_file() and (folder / "allocation.png").is_file()
    assert "allocated" in capsys.readouterr().out


@pytest.mark.parametrize(("argv", "message"), [
    (["tune", "--methods", "everything"], "unknown methods ['everything']"),
    (["tune", "--task", "cifar"], "cannot build task 'cifar'"),
    (["tune", "--option", "channels"], "expected KEY=VALUE"),
    (["tune", "--sparsities", "a,b"], "expected comma-separated numbers"),
    (["sensitivity", "--overall", "0.99", "--sparsities", "0.5"], "above 0.5"),
])
def test_bad_arguments_exit_with_a_message(argv: list[str], message: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out", str(tmp_path), *TINY[:2], "--no-progress"])
    assert exit_info.value.code != 0
    caught = capsys.readouterr().err + str(exit_info.value.code)
    assert message in caught


def test_option_values_are_read_as_json() -> None:
    args = build_parser().parse_args(["tune", "--option", "channels=64", "--option",
                                      "name=abc", "--budget", "0.02", "--relative"])
    assert args.option == [("channels", 64), ("name", "abc")]
    assert (args.budget, args.relative, args.folds, args.resume) == (0.02, True, 1, None)
