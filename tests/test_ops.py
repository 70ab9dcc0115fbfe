"""The op vocabulary checks what it is given."""

import pytest

from strategies.ops import Message, TensorRef


def test_tensor_ref_rejects_bad_fields():
    with pytest.raises(ValueError, match=r"TensorRef.role must be one of .*got 'bogus'"):
        TensorRef("x", 4, role="bogus")
    with pytest.raises(ValueError, match=r"TensorRef.nbytes must be >= 0, got -1"):
        TensorRef("x", -1)
    with pytest.raises(ValueError, match=r"TensorRef.elements must be a range \(start <= stop\), got \(5, 2\)"):
        TensorRef("x", 4, elements=(5, 2))
    assert TensorRef("x", 12, "params", (0, 2), (10, 13)).num_elements == 3
    assert TensorRef("x", 12).num_elements is None
    for bad in ((3, 1), (), (1, 1), (-1,)):
        with pytest.raises(ValueError, match=r"TensorRef.only must be increasing layer indices"):
            TensorRef("x", 4, "grads", (0, 4), only=bad)
    with pytest.raises(ValueError, match=r"TensorRef.only and TensorRef.elements cannot both be given"):
        TensorRef("x", 4, "grads", (0, 4), (0, 1), only=(1,))
    assert TensorRef("x", 4, "grads", (0, 4), only=[1, 3]).only == (1, 3)


def test_message_meta_lookup():
    m = Message(1, TensorRef("g", 4), 2, {"version": 7})
    assert m.get("version") == 7 and m.get("clock") is None and m.get("clock", -1) == -1
    assert Message(1, TensorRef("g", 4), 2).get("version", 0) == 0
