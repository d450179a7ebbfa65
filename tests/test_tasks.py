"""The Task protocol, user tasks named module:function, and the MNIST-1D task (offline)."""

from __future__ import annotations

import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from secateurs.tasks import ClassificationTask, Resplittable, Task, get_task
from secateurs.tasks import mnist1d as m1d


@pytest.fixture(autouse=True)
def one_thread() -> object:
    """Small models train many times faster on one intra-op thread of a shared CPU."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)



@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No network, and an empty cache folder."""
    import requests

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the mnist1d task must not use the network")

    monkeypatch.setattr(requests, "get", refuse)
    monkeypatch.setattr(requests.Session, "request", refuse)
    monkeypatch.setenv("SECATEURS_CACHE", str(tmp_path))
    m1d._arrays.cache_clear()
    yield tmp_path
    m1d._arrays.cache_clear()


def test_mnist1d_is_generated_offline_cached_and_leaves_global_generators_alone(
        offline: Path) -> None:
    random.seed(7)
    np.random.seed(7)
    before = (random.random(), np.random.rand())
    random.seed(7)
    np.random.seed(7)
    arrays = m1d.mnist1d_arrays(num_samples=200, seed=3)
    assert (random.random(), np.random.rand()) == before
    assert arrays["x"].shape == (160, 40) and arrays["x_test"].shape == (40, 40)
    assert set(arrays["y"].tolist()) == set(range(10))
    assert abs(float(np.concatenate([arrays["x"], arrays["x_test"]]).std()) - 1) < 1e-6
    assert len(list(offline.glob("mnist1d-*.npz"))) == 1
    m1d._arrays.cache_clear()
    again = m1d.mnist1d_arrays(num_samples=200, seed=3)  # from the file this time
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)
    with pytest.raises(ValueError, match="num_samples must be an integer >= 100"):
        m1d.mnist1d_arrays(num_samples=10)


def test_mnist1d_task_splits_model_and_recipe(offline: Path) -> None:
    task = get_task("mnist1d", seed=1, num_samples=300)
    assert isinstance(task, Task) and isinstance(task, Resplittable)
    train, val, test = task.data.train, task.data.val, task.data.test
    assert (len(train), len(val), len(test)) == (216, 24, 60)
    assert train.x.shape[1:] == (1, 40) and train.x.dtype == torch.float32
    assert (task.lr, task.batch_size, task.steps_per_epoch) == (0.01, 100, 3)
    model = task.model(0)
    assert sum(p.numel() for p in model.parameters()) == 5210
    assert isinstance(task.optimizer(model), torch.optim.Adam)
    assert model(val.x[:7]).shape == (7, 10)
    wide = m1d.MNIST1DCNN(channels=8)
    assert wide(torch.zeros(2, 1, 40)).shape == (2, 10)
    with pytest.raises(ValueError, match="channels must be an integer >= 1"):
        get_task("mnist1d", channels=0, num_samples=300)


def test_classification_task_trains_one_epoch_deterministically() -> None:
    task = get_task("digits", seed=0)
    steps: list[int] = []
    weights = []
    for _ in range(2):
        model = task.model(3)
        out = task.train_epoch(model, task.optimizer(model), epoch=2,
                               callbacks=[lambda s: steps.append(s)])
        weights.append(model.state_dict())
        assert out["train_loss"] > 0
    assert steps[:task.steps_per_epoch] == list(range(task.steps_per_epoch))
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert set(task.evaluate(model, "test")) == {"accuracy"}
    with pytest.raises(ValueError, match="split must be one of 'train', 'val', 'test', got "):
        task.evaluate(model, "holdout")


def test_resplit_draws_train_and_val_from_their_pool() -> None:
    task = get_task("digits", seed=0)
    pool = len(task.data.train) + len(task.data.val)
    again = task.resplit(range(0, pool, 2), range(1, pool, 2))
    assert isinstance(again, ClassificationTask)
    assert len(again.data.train) == (pool + 1) // 2 and len(again.data.val) == pool // 2
    assert torch.equal(again.data.test.y, task.data.test.y)
    assert torch.equal(again.pool_labels().sort().values, task.pool_labels().sort().values)
    with pytest.raises(ValueError, match="disjoint"):
        task.resplit([0, 1], [1, 2])
    with pytest.raises(ValueError, match=r"indices must lie in \[0, "):
        task.resplit([0], [pool])


def test_a_user_task_is_named_module_colon_function(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_tasks.py").write_text(textwrap.dedent("""
        from secateurs.tasks import get_task

        def small(seed=0):
            return get_task("digits", seed=seed)

        def broken(seed=0):
            return 42
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    task = get_task("my_tasks:small", seed=2)
    assert isinstance(task, Task) and task.seed == 2
    with pytest.raises(ValueError, match="lacks what a Task needs"):
        get_task("my_tasks:broken")
    with pytest.raises(ValueError, match="has no function 'missing'"):
        get_task("my_tasks:missing")
    with pytest.raises(ValueError, match="cannot import module 'no_such_module'"):
        get_task("no_such_module:f")
    with pytest.raises(ValueError, match="unknown task 'cifar'.*mnist1d"):
        get_task("cifar")
