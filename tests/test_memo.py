"""The one-entry tensor memo behind the kept bank layouts, norms and screens: an entry serves only the very
tensors it was made from, unedited, with the same other arguments."""

from __future__ import annotations

import gc
import weakref

import torch

from robustbench_knn.memo import TensorMemo


def counting_memo() -> tuple[TensorMemo, list[int]]:
    calls = [0]

    def make(t: torch.Tensor, *args: object) -> torch.Tensor:
        calls[0] += 1
        return t.sum() + sum(a.sum() if isinstance(a, torch.Tensor) else a for a in args)

    return TensorMemo(make), calls


def test_the_same_tensor_and_arguments_are_served_from_the_entry():
    memo, calls = counting_memo()
    b = torch.arange(6.0)
    first = memo.get(b, 1)
    assert memo.get(b, 1) is first and calls[0] == 1
    assert memo.get(b, 2) == b.sum() + 2 and calls[0] == 2  # another argument: made again


def test_an_in_place_edit_is_made_again():
    memo, calls = counting_memo()
    b, labels = torch.arange(6.0), torch.arange(3.0)
    memo.get(b, labels)
    b.mul_(2)
    assert memo.get(b, labels) == b.sum() + labels.sum() and calls[0] == 2
    labels.add_(1)  # the second tensor's edit counts too
    assert memo.get(b, labels) == b.sum() + labels.sum() and calls[0] == 3


def test_another_tensor_at_the_same_address_is_not_served():
    memo, calls = counting_memo()
    b = torch.arange(16.0).reshape(4, 4)
    memo.get(b)
    view = b.t()  # same memory, same shape, other strides
    assert view.data_ptr() == b.data_ptr()
    memo.get(view)
    assert calls[0] == 2
    memo.get(b.clone())  # same values, another tensor
    assert calls[0] == 3


def test_the_memo_keeps_no_tensor_alive():
    memo, _ = counting_memo()
    b = torch.arange(6.0)
    memo.get(b)
    ref = weakref.ref(b)
    del b
    gc.collect()
    assert ref() is None


def test_inference_tensors_are_never_kept():
    memo, calls = counting_memo()
    with torch.inference_mode():
        b = torch.arange(6.0)
    assert memo.get(b) == 15 and memo.get(b) == 15
    assert calls[0] == 2 and not memo.holds(b)
