"""llm-compressor's SparseGPT and Wanda on all-MiniLM-L6-v2, for the side-by-side rows of
``benchmarks/oneshot_llm.py --llmc PYTHON``.

Runs in llm-compressor's own environment (``PYTHON``, e.g. a venv under /tmp with
``pip install torch==2.13.0 llmcompressor==0.14.*``), never in this project's: it reads
the sentence split and the model folder from a JSON file written by the benchmark and
prints one JSON line. The same batches as ours (16 sentences of similar length, padded)
calibrate it; the same held-out batches measure it.

Usage: ``PYTHON benchmarks/_llmc_minilm.py SPEC.json sparsegpt|wanda 0.5|2:4``
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def main() -> int:
    import torch
    import transformers
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    spec = json.loads(Path(sys.argv[1]).read_text())
    method, sparsity = sys.argv[2], sys.argv[3]
    torch.set_num_threads(spec["threads"])
    transformers.logging.set_verbosity_error()
    tok = transformers.AutoTokenizer.from_pretrained(spec["path"])
    model = transformers.AutoModel.from_pretrained(spec["path"]).eval()

    def batches(texts: list[str], size: int) -> list[dict]:
        ordered = sorted(texts, key=len)
        return [dict(tok(ordered[i:i + size], padding=True, return_tensors="pt"))
                for i in range(0, len(ordered), size)]

    @torch.no_grad()
    def embed(m: torch.nn.Module, data: list[dict]) -> torch.Tensor:
        out = []
        for b in data:
            hidden = m(**b).last_hidden_state
            mask = b["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1))
        return torch.nn.functional.normalize(torch.cat(out), dim=-1)

    held = batches(spec["held"], 64)
    dense = embed(model, held)
    calib = batches(spec["calib"], 16)

    class Batches(torch.utils.data.Dataset):
        def __len__(self) -> int:
            return len(calib)

        def __getitem__(self, i: int) -> dict:
            return calib[i]

    # Each item is already a padded batch: the loader hands it over as it is.
    loader = torch.utils.data.DataLoader(Batches(), batch_size=None)
    nm = sparsity == "2:4"
    cls = SparseGPTModifier if method == "sparsegpt" else WandaPruningModifier
    modifier = cls(sparsity=0.5, mask_structure="2:4" if nm else "0:0", targets=["Linear"],
                   ignore=["re:.*pooler.*"])
    cpu, wall = time.process_time(), time.perf_counter()
    oneshot(model=model, dataset=loader, recipe=modifier, pipeline="sequential",
            sequential_targets=["BertLayer"], num_calibration_samples=len(calib))
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    cos = (embed(model, held) * dense).sum(1)
    weights = [m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith("encoder.")]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    print(json.dumps({"method": f"llm-compressor {method}", "sparsity": sparsity,
                      "mean_cos": float(cos.mean()), "min_cos": float(cos.min()),
                      "seconds": wall, "cpu_seconds": cpu, "sparsity_realised": zeros}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
