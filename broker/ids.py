"""Identifier types shared by the wire models and the topic catalogue.

Device ids, job ids and the cluster name become single MQTT topic levels, so they
are restricted to a conservative character set: no `/` (a level separator), no `+`
or `#` (wildcards), no leading `$` (reserved for broker topics), no NUL, no spaces
(painful in shells and ACL files), and a bounded length.
"""

from __future__ import annotations

import re
from typing import Annotated, NewType

from pydantic import Field

__all__ = [
    "ID_PATTERN",
    "ClusterName",
    "ClusterNameField",
    "DeviceId",
    "DeviceIdField",
    "JobId",
    "JobIdField",
    "is_topic_level",
]

# One MQTT topic level: starts with a letter or digit, then letters, digits, `_`, `.`, `-`.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_ID_RE = re.compile(ID_PATTERN)

DeviceId = NewType("DeviceId", str)
"""A device's stable name (hostname-like); also its MQTT client id prefix."""

JobId = NewType("JobId", str)
"""A job's id, chosen by the submitter; re-submitting the same id is idempotent."""

ClusterName = NewType("ClusterName", str)
"""The cluster's name: one level of the topic root, so several clusters share a broker."""

DeviceIdField = Annotated[DeviceId, Field(pattern=ID_PATTERN)]
JobIdField = Annotated[JobId, Field(pattern=ID_PATTERN)]
ClusterNameField = Annotated[ClusterName, Field(pattern=ID_PATTERN)]


def is_topic_level(value: str) -> bool:
    """Whether `value` is safe as one topic level (the rule of every id above)."""
    return _ID_RE.fullmatch(value) is not None
