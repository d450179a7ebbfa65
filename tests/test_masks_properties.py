"""Properties of :class:`~secateurs.masks.MaskSet` and :class:`~secateurs.masks.PrunedValues`
over random shapes, masks and values: enforcement on weights and optimizer state, state
round trips and their validation, sparsity, and the dense values of pruned weights that a
criterion which regrows keeps training behind its mask."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from secateurs.masks import MaskSet, PrunedValues
from secateurs.targets import Target

small = settings(max_examples=30, deadline=None)

Case = tuple[list[torch.Tensor], list[torch.Tensor]]


@st.composite
def cases(draw: st.DrawFn, max_targets: int = 3) -> Case:
    """Values and bool masks of 1 to ``max_targets`` parameters of random small shapes."""
    n = draw(st.integers(1, max_targets))
    shapes = [tuple(draw(st.lists(st.integers(1, 5), min_size=1, max_size=3))) for _ in range(n)]
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    # 0 and 1 give all-pruned and dense masks (enforcement skips dense ones).
    keep = draw(st.sampled_from([0.0, 0.3, 0.5, 0.8, 1.0]))
    values = [torch.randn(s, generator=gen) for s in shapes]
    masks = [torch.rand(s, generator=gen) < keep for s in shapes]
    return values, masks


def _targets(values: list[torch.Tensor]) -> tuple[nn.Module, list[Target]]:
    holder = nn.Module()
    targets = []
    for i, v in enumerate(values):
        holder.register_parameter(f"w{i}", nn.Parameter(v.clone()))
        targets.append(Target(f"w{i}", "", holder, f"w{i}"))
    return holder, targets


def _masked(case: Case) -> tuple[nn.Module, MaskSet]:
    values, masks = case
    holder, targets = _targets(values)
    mask_set = MaskSet(targets)
    for t, m in zip(targets, masks, strict=True):
        mask_set.set_(t.name, m.clone())
    return holder, mask_set


# -- enforcement -------------------------------------------------------------------------------

@small
@given(cases())
def test_apply_zeroes_exactly_the_masked_entries(case: Case) -> None:
    values, masks = case
    _, mask_set = _masked(case)
    for _ in range(2):  # idempotent
        mask_set.apply_()
        for name, v, m in zip(mask_set, values, masks, strict=True):
            p = mask_set.target(name).param.detach()
            assert torch.equal(mask_set[name], m)
            assert mask_set.is_dense(name) == bool(m.all())
            assert torch.all(p[~m] == 0)
            assert torch.equal(p[m], v[m])


@small
@given(cases())
def test_a_new_mask_replaces_the_old_one(case: Case) -> None:
    _, masks = case
    _, mask_set = _masked(case)
    mask_set.apply_()
    name = next(iter(mask_set))
    # Everything kept again: nothing more is zeroed; what was zeroed stays zero (the weights
    # are not a copy, the masks only decide what is zeroed next).
    mask_set.set_(name, torch.ones_like(masks[0]))
    assert mask_set.is_dense(name)
    mask_set.target(name).param.data.fill_(1.0)
    mask_set.apply_()
    assert torch.all(mask_set.target(name).param == 1.0)


@small
@given(cases())
def test_set_keeps_its_own_copy_of_the_mask(case: Case) -> None:
    values, masks = case
    _, targets = _targets(values)
    mask_set = MaskSet(targets)
    mine = torch.ones_like(masks[0])
    mask_set.set_(targets[0].name, mine)
    # The caller's tensor changing afterwards must not change (or desynchronise) the mask.
    mine.copy_(masks[0])
    mask_set.apply_()
    shown, p = mask_set[targets[0].name], targets[0].param.detach()
    # Whatever the mask set shows is what it enforces (a mask it reports as pruning an
    # entry must zero it) ...
    assert torch.all(p[~shown] == 0), "a mask shown as pruning is not enforced"
    # ... and it is the mask that was set: all kept, nothing zeroed.
    assert torch.all(shown)
    assert torch.equal(p, values[0])


@small
@given(cases(), st.sampled_from([torch.float32, torch.uint8, torch.int64]),
       st.integers(0, 2))
def test_set_refuses_masks_of_the_wrong_dtype_or_shape(case: Case, dtype: torch.dtype,
                                                       grow: int) -> None:
    _, masks = case
    _, mask_set = _masked(case)
    name = next(iter(mask_set))
    before = mask_set[name].clone()
    shape = list(masks[0].shape)
    shape[grow % len(shape)] += 1
    for bad in (masks[0].to(dtype), torch.ones(shape, dtype=torch.bool)):
        with pytest.raises(ValueError, match=repr(name)):
            mask_set.set_(name, bad)
        assert torch.equal(mask_set[name], before)


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
    "sgd-nesterov": lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9, nesterov=True),
    "adam": lambda ps: torch.optim.Adam(ps, lr=0.1),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=0.1, amsgrad=True),
    "rmsprop-centered": lambda ps: torch.optim.RMSprop(ps, lr=0.01, momentum=0.9,
                                                       centered=True),
}


@small
@given(cases(), st.sampled_from(sorted(OPTIMIZERS)), st.integers(1, 4))
def test_optimizer_state_is_masked_after_real_steps(case: Case, kind: str, steps: int) -> None:
    values, masks = case
    _, mask_set = _masked(case)
    mask_set.apply_()
    params = [mask_set.target(n).param for n in mask_set]
    opt = OPTIMIZERS[kind](params)
    gen = torch.Generator().manual_seed(len(values))
    for _ in range(steps):
        opt.zero_grad()
        # A linear term: the gradient at a zeroed weight is not zero, so unmasked state
        # would grow there and bring the weight back.
        loss = sum(((p * torch.randn(p.shape, generator=gen)).sum() + p.square().sum())
                   for p in params)
        loss.backward()
        opt.step()
        before = {n: {k: v.clone() for k, v in opt.state[mask_set.target(n).param].items()
                      if isinstance(v, torch.Tensor)} for n in mask_set}
        mask_set.apply_()
        mask_set.apply_to_optimizer_(opt)
        for name, m in zip(mask_set, masks, strict=True):
            p = mask_set.target(name).param
            assert torch.all(p[~m] == 0)
            per_element = {k: v for k, v in opt.state[p].items()
                           if isinstance(v, torch.Tensor) and v.shape == p.shape}
            assert per_element, f"{kind} keeps no per-element state"
            for key, value in per_element.items():
                assert torch.all(value[~m] == 0), (kind, key)
                assert torch.equal(value[m], before[name][key][m]), (kind, key)


# -- state -----------------------------------------------------------------------------------

@small
@given(cases())
def test_mask_state_round_trips(case: Case) -> None:
    values, masks = case
    _, mask_set = _masked(case)
    state = mask_set.state_dict()
    _, targets = _targets(values)
    fresh = MaskSet(targets)
    fresh.load_state_dict(state)
    for name in mask_set:
        assert torch.equal(fresh[name], mask_set[name])
        assert fresh.is_dense(name) == mask_set.is_dense(name)
    assert fresh.sparsity() == mask_set.sparsity()
    # The state is a copy: changing it changes neither mask set.
    for m in state.values():
        m.fill_(False)
    assert all(torch.equal(mask_set[n], m) for n, m in zip(mask_set, masks, strict=True))
    assert all(torch.equal(fresh[n], m) for n, m in zip(fresh, masks, strict=True))


def _broken(state: dict[str, torch.Tensor], how: str, name: str) -> dict[str, torch.Tensor]:
    """``state`` with the entry ``name`` of the wrong shape or dtype, missing, or an extra."""
    bad = dict(state)
    value = bad[name]
    if how == "shape":
        bad[name] = torch.cat([value.reshape(-1), value.reshape(-1)[:1]])
    elif how == "dtype":
        bad[name] = value.to(torch.uint8 if value.dtype == torch.bool else torch.float64)
    elif how == "missing":
        del bad[name]
    else:
        bad["not-a-target"] = value
    return bad


@small
@given(cases(), st.sampled_from(["shape", "dtype", "missing", "extra"]), st.data())
def test_bad_mask_state_is_refused_before_anything_changes(case: Case, how: str,
                                                           data: st.DataObject) -> None:
    values, masks = case
    _, mask_set = _masked(case)
    name = data.draw(st.sampled_from(list(mask_set)))
    # The current masks are the complement, so a partial load would show.
    _, target_set = _masked((values, [~m for m in masks]))
    before = target_set.state_dict()
    with pytest.raises(ValueError, match="mask"):
        target_set.load_state_dict(_broken(mask_set.state_dict(), how, name))
    for n in target_set:
        assert torch.equal(target_set[n], before[n])
        assert target_set.is_dense(n) == bool(before[n].all())


@small
@given(cases(), st.sampled_from(["shape", "dtype", "missing", "extra"]), st.data())
def test_pruned_value_state_round_trips_and_bad_state_is_refused(case: Case, how: str,
                                                                 data: st.DataObject) -> None:
    values, _ = case
    _, mask_set = _masked(case)
    saved = PrunedValues(mask_set, list(mask_set))
    _, other_targets = _targets([v + 1 for v in values])
    other_masks = MaskSet(other_targets)
    fresh = PrunedValues(other_masks, list(other_masks))
    before = fresh.state_dict()
    name = data.draw(st.sampled_from(list(mask_set)))
    with pytest.raises(ValueError, match="pruned values"):
        fresh.load_state_dict(_broken(saved.state_dict(), how, name))
    assert all(torch.equal(v, before[n]) for n, v in fresh.state_dict().items())
    fresh.load_state_dict(saved.state_dict())
    assert all(torch.equal(v, saved.state_dict()[n]) for n, v in fresh.state_dict().items())


# -- sparsity --------------------------------------------------------------------------------

@small
@given(cases(), st.data())
def test_sparsity_is_the_fraction_of_false(case: Case, data: st.DataObject) -> None:
    _, masks = case
    _, mask_set = _masked(case)
    total = sum(m.numel() for m in masks)
    pruned = sum(int((~m).sum()) for m in masks)
    assert mask_set.sparsity() == pytest.approx(pruned / total, abs=1e-12)
    names = data.draw(st.lists(st.sampled_from(list(mask_set)), min_size=1, unique=True))
    chosen = [masks[list(mask_set).index(n)] for n in names]
    expected = sum(int((~m).sum()) for m in chosen) / sum(m.numel() for m in chosen)
    assert mask_set.sparsity(names) == pytest.approx(expected, abs=1e-12)


# -- the dense values of pruned weights (criteria that regrow) -------------------------------

@small
@given(cases(), st.integers(1, 5), st.integers(0, 2**16))
def test_pruned_weights_keep_training_behind_the_mask(case: Case, steps: int,
                                                      seed: int) -> None:
    """The pruner's order: ``record_`` before new masks zero the weights; after each
    optimizer step ``accumulate_`` then enforcement; ``restore_`` before scoring. A pruned
    weight comes back with its value plus every update it received while pruned; a kept
    weight trains as usual."""
    values, masks = case
    _, targets = _targets(values)
    mask_set = MaskSet(targets)
    pruned = PrunedValues(mask_set, [t.name for t in targets])
    pruned.record_()
    for t, m in zip(targets, masks, strict=True):
        mask_set.set_(t.name, m.clone())
    mask_set.apply_()
    gen = torch.Generator().manual_seed(seed)
    expected = [v.clone() for v in values]
    for _ in range(steps):
        with torch.no_grad():
            for t, e in zip(targets, expected, strict=True):
                update = torch.randn(t.param.shape, generator=gen)
                t.param.add_(update)  # what an optimizer step does
                e.add_(update)
        pruned.accumulate_()
        mask_set.apply_()
        for t, m in zip(targets, masks, strict=True):
            assert torch.all(t.param[~m] == 0)  # exactly zero in between
    pruned.restore_()
    for t, e in zip(targets, expected, strict=True):
        assert torch.equal(t.param.detach(), e), t.name
    # Regrowth: new masks keep everything; the weights return with the accumulated values.
    pruned.record_()
    for t in targets:
        mask_set.set_(t.name, torch.ones_like(mask_set[t.name]))
    mask_set.apply_()
    for t, e in zip(targets, expected, strict=True):
        assert torch.equal(t.param.detach(), e)
        assert torch.equal(pruned.state_dict()[t.name], e)


@small
@given(cases())
def test_restore_reads_the_buffer_only_where_the_mask_is_off(case: Case) -> None:
    values, masks = case
    _, targets = _targets(values)
    mask_set = MaskSet(targets)
    pruned = PrunedValues(mask_set, [t.name for t in targets])
    for t, m in zip(targets, masks, strict=True):
        mask_set.set_(t.name, m.clone())
    with torch.no_grad():
        for t in targets:
            t.param.mul_(3.0)  # kept weights moved on; the buffer holds the old values
    pruned.restore_()
    for t, v, m in zip(targets, values, masks, strict=True):
        assert torch.equal(t.param.detach()[m], (v * 3.0)[m])
        assert torch.equal(t.param.detach()[~m], v[~m])
