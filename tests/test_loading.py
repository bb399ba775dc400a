"""Parallel decoding keeps order and surfaces dataset errors unchanged."""

from __future__ import annotations

import functools

import pytest

from dhr_cli.errors import DatasetError
from dhr_cli.io.datasets import open_dataset
from dhr_cli.io.loading import iterate_batches
from tests.helpers import make_flat


def _image_and_labels(ds, item_id):
    return item_id, ds.image(item_id).shape, ds.labels(item_id)


@pytest.mark.parametrize("workers", [0, 2])
def test_batches_in_order(tmp_path, workers):
    ds = open_dataset(make_flat(tmp_path / "d", items={f"i{k}": (1,) for k in range(7)}))
    batches = list(iterate_batches(ds.ids, functools.partial(_image_and_labels, ds), batch_size=3, workers=workers))
    assert [len(b) for b in batches] == [3, 3, 1]
    assert [r[0] for b in batches for r in b] == ds.ids
    assert all(r[1] == (24, 32, 3) and r[2] == [1] for b in batches for r in b)


def test_worker_errors_reach_the_caller(tmp_path):
    root = make_flat(tmp_path / "d", items={f"i{k}": (1,) for k in range(6)})
    (root / "images" / "i4.png").write_bytes(b"broken")
    ds = open_dataset(root)
    with pytest.raises(DatasetError, match=r"^\S*i4.png: cannot decode image \(\w+\)$"):
        for _ in iterate_batches(ds.ids, functools.partial(_image_and_labels, ds), batch_size=2, workers=2):
            pass


class _Tensors:
    """A map-style dataset as `dhr train` has one: item 5 raises a StoreError."""

    def __len__(self):
        return 8

    def __getitem__(self, index):
        import torch

        from dhr_cli.errors import StoreError

        if index == 5:
            raise StoreError("feat.h5: item 'x5' has shape (32, 0, 0), expected (channels, h, w)")
        return {"x": torch.full((2,), float(index))}


@pytest.mark.parametrize("workers", [0, 2])
def test_any_dhr_error_in_a_worker_is_reraised_with_its_own_message(workers):
    """Not torch's re-wrapping ("Caught StoreError in DataLoader worker process 0. Original Traceback ...")."""
    from dhr_cli.errors import StoreError
    from dhr_cli.io.loading import error_carrying_loader, raise_carried

    loader = error_carrying_loader(_Tensors(), batch_size=2, num_workers=workers)
    seen = []
    with pytest.raises(StoreError) as e:
        for batch in raise_carried(loader):
            seen += batch["x"][:, 0].tolist()
    assert str(e.value) == "feat.h5: item 'x5' has shape (32, 0, 0), expected (channels, h, w)"
    assert seen == [0.0, 1.0, 2.0, 3.0]  # default collate of the batches before it


@pytest.mark.parametrize("parent_alive", [True, False])
def test_a_worker_whose_parent_died_before_its_init_exits(parent_alive):
    """The parent's PID is taken before the fork: a worker starting after its parent died (a kill
    during start-up) exits at once instead of adopting the reaper as its parent and living on."""
    import os

    from dhr_cli.io.loading import die_with_parent

    pid = os.fork()
    if pid == 0:  # the worker
        try:
            parent = os.getppid() if parent_alive else os.getppid() + 10_000_000  # not our parent: it died
            die_with_parent(0, parent=parent)
            os._exit(0)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == (0 if parent_alive else 1)


def _read_masks(source, ids):
    """What a worker does with a mask source (module level: a spawned process imports it)."""
    return [source.read(i) for i in ids]


def _read_masks_into(source, ids, results):
    try:
        results.put(_read_masks(source, ids))
    except Exception as e:  # back to the test, which would otherwise wait for the masks
        results.put(repr(e))


def _masks_store(path):
    import numpy as np

    from tests.helpers import write_plain_store

    masks = {f"m{k}": np.full((4 + k, 6), k, np.uint8) for k in range(3)}
    write_plain_store(path, "masks", ("background", "cat", "dog"), {i: ("mask", m, {}) for i, m in masks.items()})
    return masks


def _mask_source(path):
    from dhr_cli.io.loading import MaskSource

    return MaskSource(path)  # dhr seed --init-masks, and train's --masks


def _predictions(path):
    from dhr_cli.pipeline.evaluate import Predictions

    return Predictions(path, ["background", "cat", "dog"])  # dhr eval --pred, dhr report


@pytest.mark.parametrize("open_source", [_mask_source, _predictions])
def test_a_store_backed_mask_source_reads_after_pickling_and_in_spawned_and_forked_processes(tmp_path, open_source):
    """The masks reader pickles with the store's path, not the HDF5 handle its process has open (h5py
    handles do not pickle): a pickled copy, as a spawned loader worker gets it, opens its own; a
    forked child, which inherits the object as it is, reads too; the parent's handle still reads after."""
    import multiprocessing
    import pickle

    import numpy as np

    masks = _masks_store(tmp_path / "masks.h5")
    ids = sorted(masks)

    def same(got):
        return isinstance(got, list) and len(got) == len(ids) and all(np.array_equal(a, masks[i]) for a, i in zip(got, ids))

    with open_source(tmp_path / "masks.h5") as source:
        assert source.kind == "masks" and source.ids == set(ids) and source.name == "masks"
        np.testing.assert_array_equal(source.read("m1"), masks["m1"])  # this process's handle is open now
        copy = pickle.loads(pickle.dumps(source))
        assert same(_read_masks(copy, ids))
        copy.close()
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            assert same(pool.apply_async(_read_masks, (source, ids)).get(timeout=120))
        fork = multiprocessing.get_context("fork")
        results = fork.Queue()
        child = fork.Process(target=_read_masks_into, args=(source, ids, results))
        child.start()
        forked = results.get(timeout=120)
        child.join(timeout=60)
        assert child.exitcode == 0 and same(forked), forked
        np.testing.assert_array_equal(source.read("m2"), masks["m2"])
