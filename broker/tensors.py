"""Tensors on the wire, and the msgpack codec that carries them.

A tensor travels as a msgpack map `{dtype: str, shape: [int, ...], data: bin}` —
never as nested lists (`tolist()` is ~50× slower). `data` holds the raw
little-endian element bytes in C order.

- **Packing** hands msgpack a `memoryview` of the array, so the only copy is the one
  into msgpack's output buffer (no intermediate `tobytes()`).
- **Unpacking** builds the array with `numpy.frombuffer` over the received `bytes`:
  no copy, and therefore a **read-only** array. Code that must write into it (or hand
  it to `torch.from_numpy`, which warns on read-only input) calls
  `Tensor.writable_array()`, which copies once.
- **Checks** on receipt: the dtype is one of `ALLOWED_DTYPES`; the shape is a list of
  at most `max_dimensions` non-negative ints; the declared element count is bounded
  (`max_elements`) before anything is allocated, and so is the product of the
  non-zero sizes (numpy refuses an empty array with a dimension past its index
  range); `prod(shape) × itemsize` must equal
  `len(data)`. Non-finite values are not rejected by the codec (a tensor may
  legitimately carry them); workers call `require_finite` where inputs must be finite.

numpy is the only array library here: `torch` stays in `edgedi.agent`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

import msgpack
import numpy as np
import numpy.typing as npt
from pydantic import GetCoreSchemaHandler, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import core_schema

from .errors import DecodeError, PayloadTooLarge, TensorError, clip

__all__ = [
    "ALLOWED_DTYPES",
    "DEFAULT_LIMITS",
    "LIMITS_CONTEXT_KEY",
    "Limits",
    "Tensor",
    "WireDtype",
    "check_structure",
    "pack",
    "require_finite",
    "unpack",
]

WireDtype = Literal["float32", "float16", "float64", "uint8", "int64"]
ALLOWED_DTYPES: Final[tuple[str, ...]] = get_args(WireDtype)

# Explicit little-endian dtypes: the wire byte order does not depend on the sender.
_NUMPY_DTYPES: Final[dict[str, np.dtype[Any]]] = {
    "float32": np.dtype("<f4"),
    "float16": np.dtype("<f2"),
    "float64": np.dtype("<f8"),
    "uint8": np.dtype("|u1"),
    "int64": np.dtype("<i8"),
}
_TENSOR_KEYS: Final = frozenset({"dtype", "shape", "data"})

# Key under which `messages.decode` passes the `Limits` to validation (pydantic context).
LIMITS_CONTEXT_KEY: Final = "edgedi_limits"

_MIB: Final = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Bounds applied to a received payload before and while it is decoded.

    The defaults admit a 64 MiB payload: the largest activation the model zoo sends
    (a 64×200×200 fp32 map is ~10 MiB) with room to spare, yet small enough that a
    flood of maximal messages cannot exhaust a 1–4 GiB device quickly.
    """

    max_payload_bytes: int = 64 * _MIB
    """Largest encoded message accepted (checked before parsing)."""
    max_elements: int = 16 * _MIB
    """Largest declared element count of one tensor (64 MiB of fp32)."""
    max_dimensions: int = 8
    """Most dimensions a tensor may declare."""
    max_map_keys: int = 256
    """Most keys of one map (object); every message's maps have a few dozen at most."""
    max_array_items: int = 16384
    """Most items of one array (a result's class probabilities are the longest)."""
    max_items: int = 65536
    """Most items (array items and map values) of a whole message: the work of
    parsing it is bounded by this, not by its size in bytes (bin data is cheap)."""
    max_depth: int = 32
    """Deepest nesting of arrays and maps."""
    max_string_bytes: int = 64 * 1024
    """Longest string (every text field is far shorter)."""


DEFAULT_LIMITS: Final = Limits()


class Tensor:
    """An immutable n-dimensional array as it travels on the wire.

    Construct it from a numpy array of an allowed dtype; the array is not copied when
    it is already C-contiguous and little-endian. The tensor keeps a read-only view,
    so a frozen message cannot be changed through it. Equality is bit equality of
    dtype, shape and bytes (so a NaN equals the same NaN).
    """

    __slots__ = ("_array",)
    __hash__ = None  # type: ignore[assignment]  # mutable-buffer value type: unhashable

    _array: npt.NDArray[Any]

    def __init__(self, array: npt.NDArray[Any]) -> None:
        if not isinstance(array, np.ndarray):
            raise TensorError(f"a Tensor wraps a numpy array, not {type(array).__name__}")
        name = array.dtype.name
        if array.dtype.kind not in "fui" or name not in _NUMPY_DTYPES:
            raise TensorError(f"dtype {array.dtype} is not one of {', '.join(ALLOWED_DTYPES)}")
        wire_dtype = _NUMPY_DTYPES[name]
        if array.dtype != wire_dtype:  # big-endian input: convert once to the wire order
            array = array.astype(wire_dtype)
        if not array.flags.c_contiguous:
            array = array.copy(order="C")
        view = array.view()
        view.flags.writeable = False
        self._array = view

    @classmethod
    def from_wire(cls, value: object, limits: Limits = DEFAULT_LIMITS) -> Tensor:
        """Validate a decoded msgpack map `{dtype, shape, data}` and wrap it without copying.

        Raises `TensorError` for a malformed map, a dtype outside the allow-list or
        sizes that disagree, and `PayloadTooLarge` when the declared element count
        exceeds `limits.max_elements`.
        """
        if not isinstance(value, Mapping):
            raise TensorError(
                f"a tensor is a map {{dtype, shape, data}}, not {type(value).__name__}"
            )
        keys = set(value)
        if keys != _TENSOR_KEYS:
            raise TensorError(
                f"tensor keys must be {sorted(_TENSOR_KEYS)}, got {clip(sorted(map(str, keys)))}"
            )
        dtype_name = value["dtype"]
        if not isinstance(dtype_name, str) or dtype_name not in _NUMPY_DTYPES:
            raise TensorError(
                f"tensor dtype {clip(dtype_name)} is not one of {', '.join(ALLOWED_DTYPES)}"
            )
        shape = _checked_shape(value["shape"], limits)
        elements = math.prod(shape)
        if elements > limits.max_elements:
            raise PayloadTooLarge(
                f"tensor declares {elements} elements, over the limit of {limits.max_elements}"
            )
        span = math.prod(size for size in shape if size)
        if span > limits.max_elements:
            # Empty, yet numpy would refuse the shape (ValueError): bound it here too.
            raise PayloadTooLarge(
                f"empty tensor of shape {list(shape)}: its non-zero sizes multiply to {span}, "
                f"over the limit of {limits.max_elements} elements"
            )
        data = value["data"]
        if not isinstance(data, bytes | bytearray | memoryview):
            raise TensorError(f"tensor data must be bin, not {type(data).__name__}")
        dtype = _NUMPY_DTYPES[dtype_name]
        expected = elements * dtype.itemsize
        if len(data) != expected:
            raise TensorError(
                f"tensor {dtype_name}{list(shape)} needs {expected} bytes, data has {len(data)}"
            )
        array = np.frombuffer(data, dtype=dtype).reshape(shape)
        tensor = cls.__new__(cls)
        array.flags.writeable = False  # already so for bytes; also for bytearray input
        tensor._array = array
        return tensor

    def to_wire(self) -> dict[str, object]:
        """The msgpack map for this tensor; `data` is a memoryview (no copy)."""
        return {
            "dtype": self._array.dtype.name,
            "shape": list(self._array.shape),
            "data": self._array.reshape(-1).data,  # a memoryview of the elements
        }

    @property
    def array(self) -> npt.NDArray[Any]:
        """The elements as a read-only numpy array (no copy)."""
        return self._array

    def writable_array(self) -> npt.NDArray[Any]:
        """A writable copy of the elements (e.g. for `torch.from_numpy`)."""
        return self._array.copy()

    @property
    def dtype(self) -> str:
        """The wire dtype name, one of `ALLOWED_DTYPES`."""
        return self._array.dtype.name

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(int(size) for size in self._array.shape)

    @property
    def nbytes(self) -> int:
        """Size of the raw element bytes (the `data` field) in bytes."""
        return int(self._array.nbytes)

    def is_finite(self) -> bool:
        """Whether no element is NaN or ±inf (integer tensors always are)."""
        if self._array.dtype.kind != "f":
            return True
        return bool(np.isfinite(self._array).all())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Tensor):
            return NotImplemented
        return (
            self._array.dtype == other._array.dtype
            and self._array.shape == other._array.shape
            and self._array.tobytes() == other._array.tobytes()
        )

    def __repr__(self) -> str:
        return f"Tensor(dtype={self.dtype}, shape={self.shape})"

    # pydantic integration: a `Tensor` field accepts a Tensor, or the msgpack map of one.
    @classmethod
    def __get_pydantic_core_schema__(
        cls, source: type[Any], handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.with_info_plain_validator_function(
            _validate_tensor,
            serialization=core_schema.plain_serializer_function_ser_schema(
                _serialize_tensor, info_arg=True
            ),
        )

    @classmethod
    def __get_pydantic_json_schema__(
        cls, schema: core_schema.CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        return {
            "type": "object",
            "description": "msgpack map {dtype, shape, data: bin}; msgpack messages only",
            "properties": {
                "dtype": {"enum": list(ALLOWED_DTYPES)},
                "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
                "data": {"description": "raw little-endian element bytes, C order"},
            },
        }


def _checked_shape(value: object, limits: Limits) -> tuple[int, ...]:
    if not isinstance(value, list | tuple):
        raise TensorError(f"tensor shape must be an array of ints, not {type(value).__name__}")
    if len(value) > limits.max_dimensions:
        raise TensorError(f"tensor has {len(value)} dimensions, at most {limits.max_dimensions}")
    for size in value:
        # bool is an int subclass; a shape of `true` is malformed, not 1.
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise TensorError(f"tensor shape {clip(list(value))} must hold non-negative ints")
    return tuple(value)


def _validate_tensor(value: object, info: core_schema.ValidationInfo) -> Tensor:
    if isinstance(value, Tensor):
        return value
    limits = DEFAULT_LIMITS
    if isinstance(info.context, Mapping):
        limits = info.context.get(LIMITS_CONTEXT_KEY, DEFAULT_LIMITS)
    try:
        return Tensor.from_wire(value, limits)
    except (TensorError, PayloadTooLarge) as error:
        # Name the field: a message may carry more than one tensor.
        raise type(error)(f"{info.field_name}: {error}") from error


def _serialize_tensor(value: Tensor, info: core_schema.SerializationInfo) -> object:
    if info.mode_is_json():
        raise TypeError("tensors travel only in msgpack messages, never in JSON")
    return value  # `pack` turns it into the wire map without copying the data


def require_finite(tensor: Tensor, what: str) -> None:
    """Raise `TensorError` naming `what` if `tensor` holds NaN or ±inf."""
    if not tensor.is_finite():
        raise TensorError(f"{what} holds NaN or infinite values")


def _pack_default(value: object) -> object:
    if isinstance(value, Tensor):
        return value.to_wire()
    raise TypeError(f"cannot pack {type(value).__name__} into msgpack")


def pack(value: object, *, default: Callable[[object], object] = _pack_default) -> bytes:
    """msgpack-encode `value`; `Tensor` objects become `{dtype, shape, data: bin}` maps."""
    # Annotated so that mypy is clean with and without the msgpack-types stubs.
    packed: bytes = msgpack.packb(value, default=default, use_bin_type=True, datetime=False)
    return packed


def unpack(payload: bytes, limits: Limits = DEFAULT_LIMITS) -> object:
    """msgpack-decode `payload` into plain values (arrays as tuples, bin as bytes).

    Raises `PayloadTooLarge` above `limits.max_payload_bytes` and `DecodeError` for
    anything that is not exactly one well-formed msgpack value, or one that breaks
    the structural limits (`check_structure`). Those are enforced while parsing:
    msgpack refuses an oversized container or string from its header, and the item
    budget stops a message of many small containers long before it is all read.
    """
    if len(payload) > limits.max_payload_bytes:
        raise PayloadTooLarge(
            f"payload of {len(payload)} bytes is over the limit of {limits.max_payload_bytes}"
        )
    budget = _ItemBudget(limits)
    try:
        # use_list=False: arrays become tuples, which strict pydantic accepts for the
        # tuple fields that keep our frozen models immutable.
        value = msgpack.unpackb(
            payload,
            raw=False,
            use_list=False,
            strict_map_key=True,
            max_str_len=limits.max_string_bytes,
            max_bin_len=limits.max_payload_bytes,
            max_array_len=limits.max_array_items,
            max_map_len=limits.max_map_keys,
            max_ext_len=0,
            list_hook=budget.count,
            object_hook=budget.count,
        )
    except DecodeError:
        raise
    except (ValueError, TypeError, msgpack.UnpackException) as error:
        detail = str(error) or _UNPACK_ERRORS.get(type(error), type(error).__name__)
        raise DecodeError(f"malformed msgpack: {detail}") from error
    check_structure(value, limits)
    return value


class _ItemBudget:
    """Counts the items of the containers msgpack has built so far (its hooks)."""

    __slots__ = ("_left", "_limit")

    def __init__(self, limits: Limits) -> None:
        self._limit = limits.max_items
        self._left = limits.max_items

    def count(self, container: Any) -> Any:
        self._left -= len(container)
        if self._left < 0:
            raise DecodeError(f"more than {self._limit} items in one message")
        return container


def check_structure(value: object, limits: Limits = DEFAULT_LIMITS) -> None:
    """Raise `DecodeError` when a parsed value nests too deep or holds too much.

    Checked before any schema validation: a validator that reports each of 200,000
    unexpected keys would hold the event loop for a second. The walk stops at the
    first bound exceeded, so its cost is bounded by the limits, not by the value.
    """
    _check_string(value, limits)
    items = 0
    # Only containers go on the stack: scalars are checked as they are met (a tile's
    # message is a few dozen of them, on every message an agent receives).
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        current, depth = stack.pop()
        if isinstance(current, dict):
            size, what, most = len(current), "map", limits.max_map_keys
            children: Any = current.values()
        elif isinstance(current, list | tuple):
            size, what, most = len(current), "array", limits.max_array_items
            children = current
        else:
            continue
        if depth > limits.max_depth:
            raise DecodeError(f"nested deeper than {limits.max_depth} levels")
        if size > most:
            raise DecodeError(f"a {what} of {size} items is over the limit of {most}")
        items += size
        if items > limits.max_items:
            raise DecodeError(f"more than {limits.max_items} items in one message")
        for child in children:
            if isinstance(child, dict | list | tuple):
                stack.append((child, depth + 1))
            else:
                _check_string(child, limits)


def _check_string(value: object, limits: Limits) -> None:
    if isinstance(value, str) and len(value) > limits.max_string_bytes:
        raise DecodeError(f"a string of {len(value)} characters is over the limit")


# msgpack raises these two with an empty message.
_UNPACK_ERRORS: Final[dict[type[Exception], str]] = {
    msgpack.StackError: "nested deeper than the unpacker allows",
    msgpack.FormatError: "a byte that starts no msgpack value",
}
