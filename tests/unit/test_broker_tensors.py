"""The tensor codec: round trips, zero-copy decoding, and every rejection path."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edgedi.broker.errors import DecodeError, PayloadTooLarge, TensorError
from edgedi.broker.tensors import (
    ALLOWED_DTYPES,
    Limits,
    Tensor,
    pack,
    require_finite,
    unpack,
)

arrays = st.sampled_from(ALLOWED_DTYPES).flatmap(
    lambda dtype: hnp.arrays(
        dtype=np.dtype(dtype),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
    )
)


@settings(max_examples=60, deadline=None)
@given(array=arrays)
def test_round_trip_is_bit_exact(array: np.ndarray) -> None:
    tensor = Tensor(array)
    decoded = Tensor.from_wire(unpack(pack(tensor)))
    assert decoded == tensor
    assert decoded.dtype == array.dtype.name
    assert decoded.shape == array.shape
    assert decoded.array.tobytes() == np.ascontiguousarray(array).tobytes()


@settings(max_examples=20, deadline=None)
@given(array=hnp.arrays(np.float32, hnp.array_shapes(min_dims=2, max_dims=3, max_side=5)))
def test_non_contiguous_and_big_endian_inputs_are_normalised(array: np.ndarray) -> None:
    transposed = array.T  # Fortran order: copied into C order once
    assert Tensor(transposed).array.flags.c_contiguous
    assert np.array_equal(Tensor(transposed).array, transposed, equal_nan=True)
    big = array.astype(">f4")
    wire = Tensor.from_wire(unpack(pack(Tensor(big))))
    assert np.array_equal(wire.array, array, equal_nan=True)


def test_decoded_array_is_a_read_only_view_of_the_payload() -> None:
    payload = pack(Tensor(np.arange(12, dtype=np.float32).reshape(3, 4)))
    wire = unpack(payload)
    assert isinstance(wire, dict)
    tensor = Tensor.from_wire(wire)
    assert np.shares_memory(tensor.array, np.frombuffer(wire["data"], dtype=np.uint8))
    assert not tensor.array.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        tensor.array[0, 0] = 1.0
    writable = tensor.writable_array()
    writable[0, 0] = 5.0
    assert tensor.array[0, 0] == 0.0


def test_construction_keeps_a_read_only_view_without_copying() -> None:
    source = np.zeros((2, 3), dtype=np.float32)
    tensor = Tensor(source)
    assert np.shares_memory(tensor.array, source)
    assert not tensor.array.flags.writeable
    assert source.flags.writeable  # the caller's array is untouched


def test_packing_writes_raw_bytes_not_lists() -> None:
    array = np.arange(1000, dtype=np.float32)
    payload = pack(Tensor(array))
    assert len(payload) < array.nbytes + 64
    assert array.tobytes() in payload


def _wire(
    dtype: object = "float32", shape: object = (2, 2), data: object = None
) -> dict[str, object]:
    return {"dtype": dtype, "shape": shape, "data": bytes(16) if data is None else data}


@pytest.mark.parametrize(
    "wire",
    [
        _wire(dtype="complex64"),
        _wire(dtype="bool"),
        _wire(dtype="object"),
        _wire(dtype=3),
        _wire(shape=(2, 3)),  # 24 bytes declared, 16 given
        _wire(shape=(2, -2)),
        _wire(shape=(2, True)),
        _wire(shape=(2.0, 2)),
        _wire(shape="2x2"),
        _wire(shape=(1,) * 9),
        _wire(data="not bytes"),
        _wire(data=[0, 1]),
        {"dtype": "float32", "shape": (4,)},
        {**_wire(), "extra": 1},
        [1, 2, 3],
    ],
    ids=lambda wire: repr(wire)[:40],
)
def test_malformed_tensors_raise_tensor_error(wire: object) -> None:
    with pytest.raises(TensorError):
        Tensor.from_wire(wire)


def test_declared_size_is_bounded_before_allocation() -> None:
    limits = Limits(max_elements=100)
    with pytest.raises(PayloadTooLarge):
        Tensor.from_wire(_wire(shape=(10, 11), data=bytes(440)), limits)
    # A huge declaration with a tiny payload fails on the bound, not on memory.
    with pytest.raises(PayloadTooLarge):
        Tensor.from_wire(_wire(shape=(2**40, 2**40), data=b""))


@pytest.mark.parametrize(
    "array", [np.zeros(3, dtype=bool), np.zeros(3, dtype=np.complex64), np.zeros(3, dtype=np.int32)]
)
def test_disallowed_dtypes_are_refused_at_construction(array: np.ndarray) -> None:
    with pytest.raises(TensorError):
        Tensor(array)


def test_only_numpy_arrays_are_wrapped() -> None:
    with pytest.raises(TensorError):
        Tensor([1.0, 2.0])  # type: ignore[arg-type]


def test_finiteness_helper() -> None:
    assert Tensor(np.ones(4, dtype=np.float16)).is_finite()
    assert Tensor(np.arange(4, dtype=np.int64)).is_finite()
    require_finite(Tensor(np.ones(2)), "input")
    for bad in (np.nan, np.inf, -np.inf):
        tensor = Tensor(np.array([1.0, bad], dtype=np.float32))
        assert not tensor.is_finite()
        with pytest.raises(TensorError, match="image"):
            require_finite(tensor, "image")


def test_equality_is_bitwise_and_tensors_are_unhashable() -> None:
    nan = Tensor(np.array([np.nan], dtype=np.float32))
    assert nan == Tensor(np.array([np.nan], dtype=np.float32))
    assert Tensor(np.zeros(2, np.float32)) != Tensor(np.zeros(2, np.float64))
    assert Tensor(np.zeros(2, np.float32)) != Tensor(np.zeros((1, 2), np.float32))
    assert Tensor(np.zeros(1, np.float32)).__eq__(0) is NotImplemented
    with pytest.raises(TypeError):
        hash(nan)
    assert repr(nan) == "Tensor(dtype=float32, shape=(1,))"


@pytest.mark.parametrize(
    "payload",
    [b"\xc1", b"\x92\x01", msgpack.packb(1) + b"extra", b"\x81\x91\x01\x02", b"\xa2\xff\xfe"],
    ids=["reserved-byte", "truncated", "trailing-data", "array-key", "bad-utf8"],
)
def test_unpack_rejects_malformed_msgpack(payload: bytes) -> None:
    with pytest.raises(DecodeError):
        unpack(payload)


def test_unpack_bounds_the_payload() -> None:
    with pytest.raises(PayloadTooLarge):
        unpack(bytes(2048), Limits(max_payload_bytes=1024))


def test_pack_refuses_unknown_types() -> None:
    with pytest.raises(TypeError):
        pack({"x": object()})
