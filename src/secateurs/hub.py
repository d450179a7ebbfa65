"""Bring your own model: a Hugging Face folder or ``module:function``, text files, batches
and before/after fidelity.

- :func:`load_model`: a folder with a ``config.json`` loads with ``AutoModelForCausalLM``
  when its config names a causal-LM architecture (``...ForCausalLM``,
  ``...LMHeadModel``), else ``AutoModel``, and its own tokenizer; offline, and never with
  ``trust_remote_code``. ``module:function`` calls a function of yours that returns a
  :class:`LoadedModel`, or ``(model, tokenizer)``.
- :func:`read_texts`: ``.txt`` (one sample per paragraph when blank lines separate
  paragraphs, else one per line) or ``.jsonl`` (one JSON object per line, its ``text``).
- :meth:`LoadedModel.batches`: tokenised with the model's tokenizer, truncated, samples of
  similar length batched together (right padding, attention masks; caches off).
- :func:`fidelity`: perplexity for causal LMs, else the mean cosine between the mean-pooled
  outputs of the model and of a reference.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration import model_device, to_device

__all__ = ["KINDS", "LoadedModel", "fidelity", "load_model", "read_texts", "sample_texts"]

#: What a model is, for batching and for its fidelity measure.
KINDS = ("causal", "encoder")

Batch = dict[str, Any]
Tokenize = Callable[[Sequence[str], int], Batch]


@dataclass
class LoadedModel:
    """A model and how text becomes its batches.

    Attributes:
        model: The torch module (eval mode).
        tokenizer: A Hugging Face tokenizer (saved with the pruned model), or ``None``.
        kind: ``causal`` (fidelity: perplexity) or ``encoder`` (fidelity: cosine of
            mean-pooled outputs).
        tokenize: ``tokenize(texts, max_length) -> batch``, used instead of the tokenizer
            when given.
        folder: The Hugging Face folder it came from (``None`` for ``module:function``).
    """

    model: nn.Module
    tokenizer: Any = None
    kind: str = "encoder"
    tokenize: Tokenize | None = None
    folder: Path | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.model, nn.Module):
            raise TypeError(f"the model must be a torch.nn.Module, got "
                            f"{type(self.model).__name__}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if self.tokenizer is None and self.tokenize is None:
            raise ValueError("a model needs a tokenizer or a tokenize(texts, max_length) "
                             "function to turn text into batches")

    def batches(self, texts: Sequence[str], max_length: int, batch_size: int) -> list[Batch]:
        """``texts`` as batches (on the CPU): samples sorted by length (little padding),
        truncated to ``max_length`` tokens."""
        if self.tokenize is not None:
            ordered = sorted(texts, key=len)
            return [self.tokenize(ordered[i:i + batch_size], max_length)
                    for i in range(0, len(ordered), batch_size)]
        ids = [list(self.tokenizer(t, truncation=True, max_length=max_length)["input_ids"])
               for t in texts]
        ids = sorted((x for x in ids if x), key=len)
        if not ids:
            raise ValueError("the tokenizer turned every sample into zero tokens")
        pad = next((v for v in (getattr(self.tokenizer, "pad_token_id", None),
                                getattr(self.tokenizer, "eos_token_id", None)) if v is not None), 0)
        return [_pad(ids[i:i + batch_size], int(pad), self.kind == "causal")
                for i in range(0, len(ids), batch_size)]


def _pad(rows: list[list[int]], pad: int, causal: bool) -> Batch:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        mask[i, : len(r)] = 1
    batch: Batch = {"input_ids": ids, "attention_mask": mask}
    if causal:
        batch["use_cache"] = False  # calibration and evaluation never need a cache
    return batch


# -- models --------------------------------------------------------------------------------

def _transformers() -> Any:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder: never the network
    try:
        import transformers
    except ImportError:
        raise ValueError("loading a Hugging Face folder needs transformers "
                         "(pip install 'secateurs[hf]')") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def is_causal(config: Any) -> bool:
    """Whether a config names a causal-LM architecture."""
    names = getattr(config, "architectures", None) or []
    return any(n.endswith(("ForCausalLM", "LMHeadModel")) for n in names)


def _load_folder(folder: Path) -> LoadedModel:
    tf = _transformers()
    options = {"local_files_only": True, "trust_remote_code": False}
    try:
        config = tf.AutoConfig.from_pretrained(folder, **options)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot read the config of {str(folder)!r} (secateurs loads only "
                         f"architectures that ship with transformers, never remote code): "
                         f"{err}") from None
    causal = is_causal(config)
    cls = tf.AutoModelForCausalLM if causal else tf.AutoModel
    try:
        model = cls.from_pretrained(folder, config=config, **options)
        tokenizer = tf.AutoTokenizer.from_pretrained(folder, **options)
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"cannot load {cls.__name__} and its tokenizer from "
                         f"{str(folder)!r}: {err}") from None
    return LoadedModel(model.eval(), tokenizer, "causal" if causal else "encoder",
                       folder=folder)


def _load_function(spec: str) -> LoadedModel:
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"MODEL must be a Hugging Face folder or 'module:function', got "
                         f"{spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"cannot import module {module_name!r} of {spec!r}: {err}") from err
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise ValueError(f"module {module_name!r} has no function {attr!r}")
    made = factory()
    if isinstance(made, LoadedModel):
        return made
    if isinstance(made, tuple) and len(made) == 2:
        model, text = made
        config = getattr(model, "config", None)
        kind = "causal" if config is not None and is_causal(config) else "encoder"
        if hasattr(text, "save_pretrained") or not callable(text):
            return LoadedModel(model.eval(), text, kind)
        return LoadedModel(model.eval(), None, kind, tokenize=text)
    raise ValueError(f"{spec} returned {type(made).__name__}; it must return a "
                     "secateurs.hub.LoadedModel or (model, tokenizer or tokenize function)")


def load_model(spec: str | os.PathLike[str], *, device: str | torch.device | None = None
               ) -> LoadedModel:
    """Load a model: a Hugging Face folder, or ``module:function`` (see the module
    docstring), in eval mode on ``device`` (default: CUDA when available, else CPU).

    Raises:
        ValueError: for a folder without ``config.json``, an architecture that does not
            ship with ``transformers``, missing tokenizer files, or a function that cannot
            be imported or returns something else.
    """
    path = Path(spec)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ValueError(f"{str(path)!r} is a folder without config.json: not a Hugging "
                             "Face model folder")
        loaded = _load_folder(path)
    elif ":" in str(spec) and not path.exists():
        loaded = _load_function(str(spec))
    else:
        raise ValueError(f"MODEL {str(spec)!r} is neither a Hugging Face model folder nor "
                         "'module:function'")
    loaded.model.to(default_device() if device is None else torch.device(device))
    return loaded


def default_device() -> torch.device:
    """CUDA when available, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


# -- text ----------------------------------------------------------------------------------

def _jsonl(path: Path, text: str) -> list[str]:
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as err:
            raise ValueError(f"{str(path)!r} line {number} is not JSON: {err}") from None
        value = record.get("text") if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise ValueError(f"{str(path)!r} line {number} has no string field 'text' (each "
                             "line must be an object such as {\"text\": \"...\"})")
        if value.strip():
            out.append(value)
    return out


def _txt(text: str) -> list[str]:
    lines = text.splitlines()
    nonblank = [i for i, line in enumerate(lines) if line.strip()]
    paragraphs = any(not lines[i].strip() for i in range(nonblank[0], nonblank[-1])) \
        if nonblank else False
    if not paragraphs:
        return [line.strip() for line in lines if line.strip()]
    blocks = "\n".join(lines).split("\n\n")
    return [" ".join(b.split()) for b in blocks if b.strip()]


def read_texts(path: str | os.PathLike[str]) -> list[str]:
    """The text samples of a ``.txt`` or ``.jsonl`` file (see the module docstring).

    Raises:
        ValueError: for a file that is missing, unreadable, not UTF-8, of another type, or
            holds no sample.
    """
    p = Path(path)
    if p.suffix not in (".txt", ".jsonl"):
        raise ValueError(f"text file {str(p)!r} must end in .txt (one sample per line or "
                         "paragraph) or .jsonl (one {\"text\": ...} object per line)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"cannot read text file {str(p)!r}: {err}") from None
    samples = _jsonl(p, text) if p.suffix == ".jsonl" else _txt(text)
    if not samples:
        raise ValueError(f"text file {str(p)!r} holds no text sample")
    return samples


def sample_texts(texts: Sequence[str], n: int, seed: int) -> list[str]:
    """``n`` samples drawn without replacement with ``seed`` (all of them, in file order,
    when there are at most ``n``)."""
    if len(texts) <= n:
        return list(texts)
    picked = sorted(random.Random(seed).sample(range(len(texts)), n))
    return [texts[i] for i in picked]


# -- fidelity ------------------------------------------------------------------------------

def _outputs(model: nn.Module, batch: Batch) -> Any:
    return model(**to_device(batch, model_device(model)))


@torch.no_grad()
def perplexity(model: nn.Module, batches: Sequence[Batch]) -> float:
    """``exp`` of the mean next-token negative log-likelihood over the unpadded tokens."""
    total, count = 0.0, 0
    for batch in batches:
        logits = _outputs(model, batch).logits[:, :-1].float()
        labels = batch["input_ids"][:, 1:].to(logits.device)
        mask = batch["attention_mask"][:, 1:].to(logits.device).bool()
        nll = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                          labels.reshape(-1), reduction="none")
        total += float(nll[mask.reshape(-1)].double().sum())
        count += int(mask.sum())
    return math.exp(total / count) if count else math.nan


@torch.no_grad()
def embeddings(model: nn.Module, batches: Sequence[Batch]) -> torch.Tensor:
    """Mean-pooled outputs (attention-masked), unit norm, one row per sample, on the CPU."""
    out = []
    for batch in batches:
        result = _outputs(model, batch)
        hidden = result if isinstance(result, torch.Tensor) else result[0]
        hidden = hidden.float()
        if hidden.dim() == 3:
            mask = batch.get("attention_mask")
            weight = torch.ones(hidden.shape[:2]) if mask is None else mask.float()
            weight = weight.to(hidden.device).unsqueeze(-1)
            hidden = (hidden * weight).sum(1) / weight.sum(1).clamp(min=1)
        out.append(nn.functional.normalize(hidden.reshape(hidden.shape[0], -1), dim=-1).cpu())
    return torch.cat(out)


def fidelity(loaded: LoadedModel, batches: Sequence[Batch],
             reference: torch.Tensor | None = None) -> tuple[str, float, torch.Tensor | None]:
    """The fidelity measure of ``loaded`` on ``batches``: ``("perplexity", value, None)`` for
    a causal LM; for an encoder ``("mean cosine", value, embeddings)``, the mean cosine to
    the ``reference`` embeddings (``1.0`` without one: the reference itself)."""
    if loaded.kind == "causal":
        return "perplexity", perplexity(loaded.model, batches), None
    emb = embeddings(loaded.model, batches)
    if reference is None:
        return "mean cosine", 1.0, emb
    return "mean cosine", float((emb * reference).sum(1).mean()), emb
