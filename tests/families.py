"""Small random-init instances of the model families people prune, built from the real
definitions in ``transformers`` (torchvision's wheel does not load beside our CPU torch)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Family:
    """A model family: how to build a small one and feed it."""

    name: str
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], dict[str, torch.Tensor]]  # (batch, seed) -> kwargs
    causal: bool = False

    def batches(self, n: int = 3, batch: int = 2) -> list[dict[str, torch.Tensor]]:
        return [self.inputs(batch, seed) for seed in range(n)]


def _ids(vocab: int) -> Callable[[int, int], dict[str, torch.Tensor]]:
    def make(batch: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"input_ids": torch.randint(0, vocab, (batch, 12), generator=g)}
    return make


def _pixels(batch: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=g)}


def _model(factory: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return factory().eval()
    return build


def _families(k: int) -> list[Family]:
    """Every family, its widths ``k`` times those of the smallest (``k=1``)."""
    import transformers as tf

    d, ff = 64 * k, 128 * k
    llama = dict(hidden_size=d, intermediate_size=ff, num_hidden_layers=2,
                 num_attention_heads=4, vocab_size=128, max_position_embeddings=64)
    return [
        Family("gpt2", _model(lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
            n_layer=2, n_head=4, n_embd=d, vocab_size=96, n_positions=32, bos_token_id=0,
            eos_token_id=0))), _ids(96), causal=True),
        Family("llama", _model(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            num_key_value_heads=4, **llama))), _ids(128), causal=True),
        Family("llama-gqa", _model(lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
            num_key_value_heads=2, **llama))), _ids(128), causal=True),
        Family("bert", _model(lambda: tf.BertModel(tf.BertConfig(
            hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=ff,
            vocab_size=100))), _ids(100)),
        Family("vit", _model(lambda: tf.ViTModel(tf.ViTConfig(
            hidden_size=d, num_hidden_layers=2, num_attention_heads=4, intermediate_size=ff,
            image_size=32, patch_size=8))), _pixels),
        Family("convnext", _model(lambda: tf.ConvNextModel(tf.ConvNextConfig(
            hidden_sizes=[16 * k, 32 * k, 64 * k, 128 * k], depths=[1, 1, 1, 1],
            image_size=32))), _pixels),
        Family("resnet", _model(lambda: tf.ResNetModel(tf.ResNetConfig(
            embedding_size=16 * k, hidden_sizes=[16 * k, 32 * k, 64 * k, 128 * k],
            depths=[1, 1, 1, 1],
            layer_type="basic"))), _pixels),
        Family("mobilenet", _model(lambda: tf.MobileNetV2Model(tf.MobileNetV2Config(
            image_size=32, depth_multiplier=0.35 * k))), _pixels),
    ]


def family(name: str, scale: int = 1) -> Family:
    """The family ``name``, widths ``scale`` times the smallest's."""
    return next(f for f in _families(scale) if f.name == name)


NAMES = ["gpt2", "llama", "llama-gqa", "bert", "vit", "convnext", "resnet", "mobilenet"]


def main_output(output: Any) -> torch.Tensor:
    """The tensor to compare: logits, or the last hidden state."""
    for key in ("logits", "last_hidden_state"):
        value = getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    raise TypeError(f"no logits or last_hidden_state in {type(output).__name__}")
