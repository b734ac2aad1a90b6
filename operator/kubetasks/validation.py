"""The limits a user can rely on (the README's "Limits you can rely on"), checked before anything is written.

The same bounds are CHECK constraints in the schema and OpenAPI bounds in the
CRDs; this module is where Python callers get a message that names the field
and the limit instead of a constraint name.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from typing import Any

from kubetasks.errors import ValidationError

NAME_MAX = 63
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
PRIORITY_MIN, PRIORITY_MAX = -1000, 1000
TIMEOUT_MIN, TIMEOUT_MAX = 1.0, 7 * 24 * 3600.0
MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX = 1, 100
DELAY_MAX = 365 * 24 * 3600.0
RETRY_DELAY_MAX = 24 * 3600.0
BACKOFF_MIN, BACKOFF_MAX = 1.0, 10.0
MAX_RETRY_DELAY_MAX = 7 * 24 * 3600.0
DEDUPE_KEY_MAX = 255
TAGS_MAX = 32
CONCURRENCY_MAX = 10000
#: A payload in a Task object must leave room in the 256 KiB annotation budget
#: that client-side `kubectl apply` spends on its copy of the object.
CR_PAYLOAD_MAX_BYTES = 128 * 1024
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
#: A Forbid schedule's job lock, renewed every third of it while its run lasts.
#: Short, because a run recovered after its pod died waits for the dead pod's
#: lock to expire, and that wait must end well within the task's timeout.
DEFAULT_LOCK_TTL_S = 60


def name(field: str, value: object) -> str:
    if not isinstance(value, str):
        raise ValidationError(field, f"must be a string, got {type(value).__name__}")
    if not value:
        raise ValidationError(field, "must not be empty")
    if len(value) > NAME_MAX:
        raise ValidationError(field, f"must be at most {NAME_MAX} characters, got {len(value)}")
    if not NAME_RE.match(value):
        raise ValidationError(
            field,
            f"{value!r} has forbidden characters: use letters, digits and _ . : - "
            "(starting with a letter or digit)",
        )
    return value


def integer(field: str, value: object, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(field, f"must be an integer, got {value!r}")
    if not lo <= value <= hi:
        raise ValidationError(field, f"must be between {lo} and {hi}, got {value}")
    return value


def seconds(field: str, value: object, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValidationError(field, f"must be a number of seconds, got {value!r}")
    f = float(value)
    if math.isnan(f) or not lo <= f <= hi:
        raise ValidationError(field, f"must be between {lo:g} and {hi:g} seconds, got {value}")
    return f


def priority(value: object) -> int:
    return integer("priority", value, PRIORITY_MIN, PRIORITY_MAX)


def timeout(value: object) -> float:
    return seconds("timeout", value, TIMEOUT_MIN, TIMEOUT_MAX)


def max_attempts(value: object) -> int:
    return integer("max_attempts", value, MAX_ATTEMPTS_MIN, MAX_ATTEMPTS_MAX)


def delay(value: object) -> float:
    return seconds("delay", value, 0.0, DELAY_MAX)


def retry_delay(value: object) -> float:
    return seconds("retry_delay", value, 0.0, RETRY_DELAY_MAX)


def backoff(value: object) -> float:
    return seconds("backoff", value, BACKOFF_MIN, BACKOFF_MAX)


def max_retry_delay(value: object) -> float:
    return seconds("max_retry_delay", value, 0.0, MAX_RETRY_DELAY_MAX)


def concurrency(field: str, value: object) -> int:
    return integer(field, value, 1, CONCURRENCY_MAX)


def run_at(value: object) -> datetime:
    if not isinstance(value, datetime):
        raise ValidationError("run_at", f"must be a datetime, got {type(value).__name__}")
    if value.tzinfo is None:
        raise ValidationError("run_at", "must be timezone-aware (naive datetimes are ambiguous)")
    return value


def tags(value: Iterable[str] | None) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        raise ValidationError("tags", "must be a list of strings, not one string")
    out = [name("tags", t) for t in value]
    if len(out) > TAGS_MAX:
        raise ValidationError("tags", f"at most {TAGS_MAX} tags, got {len(out)}")
    return out


def dedupe_key(value: object) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise ValidationError("dedupe_key", "must be a non-empty string")
    if len(value) > DEDUPE_KEY_MAX:
        raise ValidationError("dedupe_key", f"must be at most {DEDUPE_KEY_MAX} characters, got {len(value)}")
    if "\x00" in value:
        raise ValidationError("dedupe_key", "must not contain the NUL character (\\u0000)")
    return value


def _has_lone_surrogate(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _find_str(value: Any, path: str, bad: Callable[[str], bool]) -> str | None:
    """The path of the first string (or key) under ``value`` that ``bad`` refuses."""
    if isinstance(value, str):
        return path if bad(value) else None
    if isinstance(value, Mapping):
        for k, v in value.items():
            if isinstance(k, str) and bad(k):
                return f"{path} (a key)"
            found = _find_str(v, f"{path}.{k}", bad)
            if found:
                return found
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            found = _find_str(v, f"{path}[{i}]", bad)
            if found:
                return found
    return None


def _find_nul(value: Any, path: str) -> str | None:
    return _find_str(value, path, lambda s: "\x00" in s)


def clean_text(value: str, max_chars: int, *, keep: str = "head") -> str:
    """Text PostgreSQL can always store: NUL and lone surrogates (a file name decoded
    with surrogateescape, say) written as visible escapes, at most ``max_chars``
    characters (the start, or with ``keep="tail"`` the end)."""
    if len(value) > max_chars:
        value = value[:max_chars] if keep == "head" else value[-max_chars:]
    value = value.replace("\x00", "\\x00")
    if _has_lone_surrogate(value):
        value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(value) > max_chars:
        value = value[:max_chars] if keep == "head" else value[-max_chars:]
    return value


def to_json(field: str, value: object, max_bytes: int) -> str:
    """Serialise for a jsonb column, refusing what PostgreSQL or JSON cannot hold."""
    if value is None:
        return "null"  # most handlers return nothing: skip the encoder
    try:
        text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValidationError(field, f"is not JSON-serialisable: {exc}") from None
    try:
        size = len(text.encode())
    except UnicodeEncodeError:
        # A lone surrogate (text decoded with surrogateescape): not UTF-8, so not storable.
        raise ValidationError(
            _find_str(value, field, _has_lone_surrogate) or field,
            "contains a lone surrogate (text that is not valid Unicode), which PostgreSQL cannot store",
        ) from None
    if size > max_bytes:
        raise ValidationError(field, f"is {size} bytes as JSON; the limit is {max_bytes} bytes")
    # PostgreSQL's jsonb cannot store \u0000; json.dumps writes it escaped, so
    # only a walk finds it (and says where).
    if "\\u0000" in text:
        nul_at = _find_nul(value, field)
        if nul_at:
            raise ValidationError(
                nul_at, "contains the NUL character (\\u0000), which PostgreSQL cannot store"
            )
    return text


def payload(value: object, max_bytes: int) -> str:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ValidationError("payload", f"must be a JSON object (a dict), got {type(value).__name__}")
    return to_json("payload", value, max_bytes)


#: The most bytes of compact JSON a progress report's metadata may take.
PROGRESS_METADATA_MAX_BYTES = 4096


def progress_details(stage: object, metadata: object) -> tuple[str | None, str | None]:
    """A progress report's ``stage`` (a name: letters, digits and _ . : -, at most 63
    characters) and ``metadata`` (a JSON object of at most 4 KiB), validated; the metadata
    as JSON text. None stays None."""
    if stage is not None:
        stage = name("stage", stage)
    text = None
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise ValidationError(
                "metadata", f"must be a JSON object (a dict), got {type(metadata).__name__}"
            )
        text = to_json("metadata", metadata, PROGRESS_METADATA_MAX_BYTES)
    return stage, text
