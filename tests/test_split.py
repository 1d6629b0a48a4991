from collections import namedtuple

import pytest
import torch

import batchgrad as bg
from batchgrad._split import batch_length, micro_batches, slice_batch


def test_slices_every_tensor_leaf_and_passes_the_rest():
    Item = namedtuple("Item", ["x", "meta"])
    batch = {"a": torch.arange(5), "b": [Item(torch.ones(5, 2), "m"), torch.tensor(3.0), None]}
    parts = list(micro_batches(batch, 2))
    assert [len(p["a"]) for p in parts] == [2, 2, 1]
    last = parts[-1]
    assert isinstance(last["b"][0], Item)
    assert last["b"][0].meta == "m"
    assert last["b"][0].x.shape == (1, 2)
    assert last["b"][1].item() == 3.0
    assert last["b"][2] is None


def test_whole_batch_when_no_size():
    x = torch.arange(4)
    (whole,) = micro_batches(x, None)
    assert torch.equal(whole, x)


def test_length_names_the_disagreeing_leaves():
    Pair = namedtuple("Pair", ["x", "y"])
    with pytest.raises(bg.BatchShapeError, match=r"batch\.x has 3, batch\.y has 2"):
        batch_length(Pair(torch.zeros(3), torch.zeros(2)))
    with pytest.raises(bg.BatchShapeError, match=r"batch\['ids'\] has 3, batch\['mask'\] has 4"):
        batch_length({"ids": torch.zeros(3), "mask": torch.zeros(4, 1)})


def test_list_of_micro_batches_hints_at_iter():
    with pytest.raises(bg.BatchShapeError, match=r"iter\(micro_batches\)"):
        list(micro_batches([(torch.zeros(2), torch.zeros(2)), (torch.zeros(3),)], None))


def test_a_batch_without_tensors_is_refused():
    with pytest.raises(bg.BatchShapeError, match="no tensor with a batch dimension"):
        batch_length({"a": 1, "b": torch.tensor(2.0)})


def test_not_iterable_is_refused():
    with pytest.raises(bg.BatchShapeError, match="got int"):
        list(micro_batches(3, None))


def test_slice_keeps_0d_tensors():
    scalar = torch.tensor(1.0)
    assert slice_batch((torch.arange(4), scalar), 1, 3)[1] is scalar
