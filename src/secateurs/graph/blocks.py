"""Known transformer blocks, recognised by their layers, and their channel groups built
directly.

A decoder layer of a language model holds two blocks whose units are known without
tracing: attention, whose unit is a head, and the MLP, whose unit is a neuron. Recognising
them by their child layers (``q_proj``/``k_proj``/``v_proj``/``o_proj``, GPT-2's fused
``c_attn``/``c_proj``, ``gate_proj``/``up_proj``/``down_proj``, Phi-3's fused
``gate_up_proj``, GPT-2's ``c_fc``/``c_proj``) gives their groups at once and exactly,
and lets the trace treat each block as one step on the residual stream (see
:mod:`.layers`): the reshapes, rotary embeddings and repeated key/value heads inside stay
out of Torch-Pruning's search.

Grouped-query attention (``num_key_value_heads < num_attention_heads``): a unit is one
key/value head with the ``num_attention_heads // num_key_value_heads`` query heads that
read it. Removing it keeps every remaining query head reading the key/value head it read
before, with ``num_key_value_groups`` unchanged, so the implementation's
``repeat_kv`` and the cached keys and values stay valid. (Removing query heads alone would
need every key/value group to lose the same number, a constraint selection by unit cannot
express.) With as many key/value heads as query heads, a unit is one head.

Compaction sets the size attributes a block's forward reads (GPT-2's ``num_heads`` and
``split_size``; ``num_heads`` / ``num_key_value_heads`` where a module keeps them) and the
configuration entries that describe the widths (``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, GPT-2's ``n_inner``) when every layer agrees
(:class:`~.structure.Resize`). Head counts go into a configuration only where it holds
``head_dim`` (pinned first where it derived it as ``hidden_size // num_attention_heads``):
GPT-2's derives the head width from the count, so its ``n_head`` stays.

Register a recogniser for another block with :func:`register_block`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from ..targets import is_transposed_linear
from .layers import LINEAR, TRANSPOSED, BlockPruner, out_width
from .structure import ChannelGroup, Op, Resize, Slice

__all__ = ["RECOGNISERS", "Block", "config_of", "find_blocks", "register_block"]


@dataclass(frozen=True)
class Block:
    """A recognised block: the handler Torch-Pruning sees it through on the residual
    stream, and the channel group of its own units (heads, neurons)."""

    module: str
    kind: str
    pruner: BlockPruner
    group: ChannelGroup


Recogniser = Callable[[nn.Module, str, nn.Module], "Block | None"]

#: Name -> recogniser ``(model, name, module) -> Block | None``, tried in order.
RECOGNISERS: dict[str, Recogniser] = {}


def register_block(name: str) -> Callable[[Recogniser], Recogniser]:
    """Decorator registering a block recogniser under ``name``."""

    def deco(fn: Recogniser) -> Recogniser:
        RECOGNISERS[name] = fn
        return fn

    return deco


def find_blocks(model: nn.Module) -> list[Block]:
    """The recognised blocks of ``model``, outermost first, none inside another.

    Torch-Pruning keys its handlers by module class, so a class counts only if every
    instance of it in the model is recognised alike; otherwise its modules are traced.
    """
    blocks: list[Block] = []
    for name, module in model.named_modules():
        if any(name.startswith(f"{b.module}.") for b in blocks):
            continue
        for recognise in RECOGNISERS.values():
            block = recognise(model, name, module)
            if block is not None:
                blocks.append(block)
                break
    by_class: dict[type, list[Block]] = {}
    for b in blocks:
        by_class.setdefault(type(model.get_submodule(b.module)), []).append(b)
    out = []
    for cls, found in by_class.items():
        sides = {(b.pruner.inputs, b.pruner.outputs) for b in found}
        if len(sides) == 1 and len(found) == sum(type(m) is cls for m in model.modules()):
            out += [replace(b, pruner=found[0].pruner) for b in found]
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(out, key=lambda b: order[b.module])


def config_of(model: nn.Module, name: str) -> Any:
    """The ``config`` of module ``name`` or of the nearest module above it that has one."""
    parts = name.split(".") if name else []
    for k in range(len(parts), -1, -1):
        config = getattr(model.get_submodule(".".join(parts[:k])), "config", None)
        if config is not None and hasattr(config, "to_dict"):
            return config
    return None


def _fqn(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def _out(layer: str, module: nn.Module, index: torch.Tensor, channel: torch.Tensor
         ) -> tuple[list[Slice], Op]:
    """Slices and handler call removing outputs ``index`` of a (transposed) linear layer."""
    transposed = is_transposed_linear(module)
    slices = [Slice(layer, f"{layer}.weight", 1 if transposed else 0, index, channel, "out")]
    if getattr(module, "bias", None) is not None:
        slices.append(Slice(layer, f"{layer}.bias", 0, index, channel, "out"))
    handler = (TRANSPOSED if transposed else LINEAR).prune_out_channels
    return slices, Op(layer, handler, -1, index, channel)


def _in(layer: str, module: nn.Module, index: torch.Tensor, channel: torch.Tensor
        ) -> tuple[list[Slice], Op]:
    """Slices and handler call removing inputs ``index`` of a (transposed) linear layer."""
    transposed = is_transposed_linear(module)
    slices = [Slice(layer, f"{layer}.weight", 0 if transposed else 1, index, channel, "in")]
    handler = (TRANSPOSED if transposed else LINEAR).prune_in_channels
    return slices, Op(layer, handler, -1, index, channel)


def _group(name: str, unit_of: torch.Tensor, parts: Sequence[tuple[list[Slice], Op]],
           resizes: Sequence[Resize]) -> ChannelGroup:
    return ChannelGroup(name, len(unit_of), unit_of, tuple(s for p in parts for s in p[0]),
                        tuple(p[1] for p in parts), resizes=tuple(resizes))


def _linears(module: nn.Module, names: Sequence[str], transposed: bool) -> list[nn.Module] | None:
    """The children ``names`` of ``module`` if each is a linear layer (transposed, if
    ``transposed``), else ``None``."""
    children = dict(module.named_children())
    found = [children.get(n) for n in names]
    kind = is_transposed_linear if transposed else (lambda c: isinstance(c, nn.Linear))
    if all(c is not None and kind(c) for c in found):
        return [c for c in found if c is not None]
    return None


def _in_width(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features
    return int(module.get_parameter("weight").shape[0])


def _attribute(module: Any, name: str) -> int | None:
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _resizes(model: nn.Module, name: str, module: nn.Module, sizes: dict[str, tuple[str, int]],
             config: dict[str, tuple[str, int]], check: dict[str, int]) -> list[Resize] | None:
    """Resizes of the module attributes in ``sizes`` it has, and of the configuration
    entries in ``config`` whose value is the current one (``check`` holds the current
    values); ``None`` if an attribute the module has disagrees with its layers."""
    out = []
    for attribute, (source, per) in sizes.items():
        value = _attribute(module, attribute)
        if value is None:
            continue
        if value != check[attribute]:
            return None
        out.append(Resize(name, attribute, _fqn(name, source), per))
    cfg = config_of(model, name)
    for attribute, (source, per) in config.items():
        if cfg is not None and _attribute(cfg, attribute) == check[attribute]:
            out.append(Resize(name, attribute, _fqn(name, source), per, config=True))
    return out


def _head_config(model: nn.Module, name: str, d: int) -> dict[str, tuple[str, int]]:
    """The configuration entries of head counts, if the configuration says ``head_dim``
    (or derives it as ``hidden_size // num_attention_heads``, to be pinned): otherwise a
    new head count would change the head width of a model rebuilt from it."""
    cfg = config_of(model, name)
    if cfg is None:
        return {}
    hidden, heads = _attribute(cfg, "hidden_size"), _attribute(cfg, "num_attention_heads")
    said = _attribute(cfg, "head_dim")
    if said == d or (said is None and heads and hidden is not None and hidden // heads == d):
        return {"num_attention_heads": ("q_proj", d), "num_key_value_heads": ("k_proj", d)}
    return {}


@register_block("qkvo_attention")
def _qkvo_attention(model: nn.Module, name: str, module: nn.Module) -> Block | None:
    """Attention with separate ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj`` (Llama,
    Mistral, Qwen2 and their relatives), multi-head or grouped-query."""
    layers = _linears(module, ("q_proj", "k_proj", "v_proj", "o_proj"), transposed=False)
    if layers is None:
        return None
    q, k, v, o = layers
    d = _attribute(module, "head_dim")
    heads = _attribute(module, "num_heads") or _attribute(module, "num_attention_heads")
    if d is None and heads:
        d = out_width(q) // heads
    if not d or out_width(q) % d or out_width(k) % d or out_width(k) != out_width(v) \
            or _in_width(o) != out_width(q):
        return None
    hq, hk = out_width(q) // d, out_width(k) // d
    if hq % hk or _attribute(module, "num_key_value_groups") not in (None, hq // hk):
        return None
    check = {"num_heads": hq, "num_attention_heads": hq, "num_key_value_heads": hk}
    resizes = _resizes(model, name, module, {"num_heads": ("q_proj", d),
                                             "num_attention_heads": ("q_proj", d),
                                             "num_key_value_heads": ("k_proj", d)},
                       _head_config(model, name, d), check)
    if resizes is None:
        return None
    if _attribute(config_of(model, name), "head_dim") is None and any(r.config for r in resizes):
        resizes.append(Resize(name, "head_dim", _fqn(name, "q_proj"), config=True, value=d))
    rep = hq // hk
    channel = torch.arange(hq * d)
    kv = torch.arange(hk * d)
    kv_channel = kv // d * rep * d + kv % d  # the first query head reading each key/value head
    parts = [_out(_fqn(name, "q_proj"), q, channel, channel),
             _out(_fqn(name, "k_proj"), k, kv, kv_channel),
             _out(_fqn(name, "v_proj"), v, kv, kv_channel),
             _in(_fqn(name, "o_proj"), o, channel, channel)]
    group = _group(_fqn(name, "q_proj"), channel // (rep * d), parts, resizes)
    return Block(name, "attention", BlockPruner(("q_proj", "k_proj", "v_proj"), ("o_proj",)),
                 group)


@register_block("fused_qkv_attention")
def _fused_attention(model: nn.Module, name: str, module: nn.Module) -> Block | None:
    """GPT-2's attention: ``c_attn`` computes q, k and v concatenated along its output,
    ``c_proj`` reads the heads; both are transposed linear layers (``Conv1D``)."""
    layers = _linears(module, ("c_attn", "c_proj"), transposed=True)
    d, heads, split = (_attribute(module, a) for a in ("head_dim", "num_heads", "split_size"))
    if layers is None or not d or not heads or split != heads * d or hasattr(module, "q_attn"):
        return None
    c_attn, c_proj = layers
    if out_width(c_attn) != 3 * split or _in_width(c_proj) != split:
        return None
    resizes = _resizes(model, name, module, {"num_heads": ("c_attn", 3 * d),
                                             "split_size": ("c_attn", 3)}, {},
                       {"num_heads": heads, "split_size": split})
    assert resizes is not None
    channel = torch.arange(split)
    fused = torch.arange(3 * split)
    parts = [_out(_fqn(name, "c_attn"), c_attn, fused, fused % split),
             _in(_fqn(name, "c_proj"), c_proj, channel, channel)]
    group = _group(_fqn(name, "c_attn"), channel // d, parts, resizes)
    return Block(name, "attention", BlockPruner(("c_attn",), ("c_proj",)), group)


@register_block("gated_mlp")
def _gated_mlp(model: nn.Module, name: str, module: nn.Module) -> Block | None:
    """``down_proj(act(gate_proj(x)) * up_proj(x))`` (Llama, Mistral, Qwen2)."""
    layers = _linears(module, ("gate_proj", "up_proj", "down_proj"), transposed=False)
    if layers is None:
        return None
    gate, up, down = layers
    width = out_width(gate)
    if out_width(up) != width or _in_width(down) != width:
        return None
    sizes = {"intermediate_size": ("gate_proj", 1)}
    resizes = _resizes(model, name, module, sizes, sizes, {"intermediate_size": width})
    if resizes is None:
        return None
    channel = torch.arange(width)
    parts = [_out(_fqn(name, "gate_proj"), gate, channel, channel),
             _out(_fqn(name, "up_proj"), up, channel, channel),
             _in(_fqn(name, "down_proj"), down, channel, channel)]
    return Block(name, "mlp", BlockPruner(("gate_proj", "up_proj"), ("down_proj",)),
                 _group(_fqn(name, "gate_proj"), channel, parts, resizes))


@register_block("fused_gated_mlp")
def _fused_gated_mlp(model: nn.Module, name: str, module: nn.Module) -> Block | None:
    """``down_proj(up * act(gate))`` with ``gate, up = gate_up_proj(x).chunk(2)`` (Phi-3):
    neuron ``j`` is outputs ``j`` and ``width + j`` of ``gate_up_proj``."""
    layers = _linears(module, ("gate_up_proj", "down_proj"), transposed=False)
    if layers is None:
        return None
    gate_up, down = layers
    width = _in_width(down)
    if out_width(gate_up) != 2 * width:
        return None
    resizes = _resizes(model, name, module, {}, {"intermediate_size": ("gate_up_proj", 2)},
                       {"intermediate_size": width})
    assert resizes is not None
    channel = torch.arange(width)
    fused = torch.arange(2 * width)
    parts = [_out(_fqn(name, "gate_up_proj"), gate_up, fused, fused % width),
             _in(_fqn(name, "down_proj"), down, channel, channel)]
    return Block(name, "mlp", BlockPruner(("gate_up_proj",), ("down_proj",)),
                 _group(_fqn(name, "gate_up_proj"), channel, parts, resizes))


@register_block("transposed_mlp")
def _transposed_mlp(model: nn.Module, name: str, module: nn.Module) -> Block | None:
    """GPT-2's MLP: ``c_proj(act(c_fc(x)))`` with transposed linear layers."""
    layers = _linears(module, ("c_fc", "c_proj"), transposed=True)
    if layers is None or hasattr(module, "c_attn"):
        return None
    c_fc, c_proj = layers
    width = out_width(c_fc)
    if _in_width(c_proj) != width:
        return None
    cfg = config_of(model, name)
    resizes = []
    if cfg is not None and hasattr(cfg, "n_inner") and hasattr(cfg, "n_embd") \
            and (cfg.n_inner or 4 * cfg.n_embd) == width:
        resizes.append(Resize(name, "n_inner", _fqn(name, "c_fc"), 1, config=True))
    channel = torch.arange(width)
    parts = [_out(_fqn(name, "c_fc"), c_fc, channel, channel),
             _in(_fqn(name, "c_proj"), c_proj, channel, channel)]
    return Block(name, "mlp", BlockPruner(("c_fc",), ("c_proj",)),
                 _group(_fqn(name, "c_fc"), channel, parts, resizes))
