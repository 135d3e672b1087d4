"""The one exception tree of `edgedi.broker`.

```
BrokerError                     anything this package raises on purpose
├── ProtocolError               bytes from a peer (or about to go to one) break the protocol
│   ├── DecodeError             not JSON / msgpack, not an object, or fails the schema
│   ├── SchemaVersionError      a schema `version` we do not speak
│   ├── UnexpectedKind          a `kind` unknown, or not allowed on that topic
│   ├── PayloadTooLarge         payload bytes or declared tensor elements over the limit
│   ├── TensorError             dtype not allowed, shape × itemsize ≠ len(data), NaN/inf
│   └── UnknownTopic            a topic outside the catalogue, or a bad topic parameter
├── ConnectionLost              no broker connection, or an operation on it timed out
├── NotAuthorised               the broker refused a subscription or a publish on a topic
└── BrokerStartError            a private broker did not come up
```

A `ProtocolError` raised while receiving is logged, counted and dropped by the
connection loop: a peer's bad message never stops an agent. aiomqtt's and amqtt's
own exceptions are translated into this tree once, in `connection` and `server`,
so callers never catch a third-party type.
"""

from __future__ import annotations

import reprlib

__all__ = [
    "BrokerError",
    "BrokerStartError",
    "ConnectionLost",
    "DecodeError",
    "NotAuthorised",
    "PayloadTooLarge",
    "ProtocolError",
    "SchemaVersionError",
    "TensorError",
    "UnexpectedKind",
    "UnknownTopic",
    "clip",
]


class BrokerError(Exception):
    """Base of every exception `edgedi.broker` raises on purpose."""


class ProtocolError(BrokerError):
    """A message or topic that breaks the wire protocol; never fatal for a receiver."""


class DecodeError(ProtocolError):
    """The payload is not valid JSON/msgpack, not an object, or fails schema validation."""


class SchemaVersionError(ProtocolError):
    """The payload's `version` is not the schema version this code speaks."""


class UnexpectedKind(ProtocolError):
    """The payload's `kind` tag is unknown, or not one the topic carries."""


class PayloadTooLarge(ProtocolError):
    """The payload, or a tensor's declared size, exceeds the configured bound."""


class TensorError(ProtocolError):
    """A tensor with a dtype outside the allow-list, inconsistent sizes or non-finite values."""


class UnknownTopic(ProtocolError):
    """A topic string outside the catalogue, or a parameter that is not a single safe level."""


class ConnectionLost(BrokerError):
    """There is no broker connection, or a publish/subscribe on it failed or timed out."""


class NotAuthorised(BrokerError):
    """The broker refused this account a topic: a SUBACK failure code, or (where the
    broker cannot say so: Mosquitto grants every subscription and filters on
    delivery) an expected retained record that never came."""

    def __init__(self, topic: str, detail: str) -> None:
        super().__init__(f"not authorised for {topic}: {detail}")
        self.topic = topic


class BrokerStartError(BrokerError):
    """A private broker (Mosquitto or the embedded amqtt) did not start listening."""


# A peer chooses the values quoted in our error messages (a 60 MiB `kind`, a dtype
# string, a shape): quote a bounded repr so one bad message cannot flood the log.
class _Clipped(reprlib.Repr):
    def repr_bytes(self, value: bytes, level: int) -> str:
        # reprlib would repr the whole buffer first: slice it before.
        if len(value) <= self.maxstring:
            return repr(value)
        return f"{value[: self.maxstring // 2]!r}...({len(value)} bytes)"

    repr_bytearray = repr_bytes


_CLIP = _Clipped()
_CLIP.maxstring = _CLIP.maxother = 80
_CLIP.maxlong = 40
_CLIP.maxlist = _CLIP.maxtuple = 10
_CLIP.maxdict = 6
_CLIP.maxlevel = 3


def clip(value: object) -> str:
    """`repr(value)`, shortened to a few dozen characters for an error message."""
    try:
        return _CLIP.repr(value)
    except ValueError:  # an int too long for str() (over 4300 digits)
        return f"<{type(value).__name__}>"
