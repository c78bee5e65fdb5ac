"""
Session recordings on disk: their names, their facts, listing and retention.

A recording is two files under C{recording.path}, both named by the
session's id (a uuid's 32 hex digits, so a name never comes from a client):

  - C{<id>.guac}: the Guacamole instructions guacd sent toward the browser
    (and, when configured, the user's C{key} instructions), byte for byte:
    the format guacd's own C{recording-path} writes, so guacamole-common-js's
    C{SessionRecording} and C{guacenc} play it; C{sync} carries the timing.
  - C{<id>.json}: the sidecar, L{RecordingFacts}: who, which VM, when, how
    big, its sha256 once complete.

The relay writes them (relay/recording.py, from a writer thread); the web
side lists and serves them; a periodic sweep enforces retention.  Every
function here blocks on the disk: call it from a thread, never from the
reactor.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

#: The recording's own suffix, and its sidecar's.
DATA_SUFFIX = ".guac"
FACTS_SUFFIX = ".json"

#: Files and the sidecars are the owner's alone.
FILE_MODE = 0o600

_ID = re.compile(r"[0-9a-f]{32}", re.ASCII)
_MAX_SIDECAR = 64 * 1024


def is_recording_id(text: object) -> bool:
    """Whether C{text} can name a recording (a session id: 32 lower-case hex digits)."""
    return isinstance(text, str) and _ID.fullmatch(text) is not None


@dataclass(frozen=True)
class RecordingFacts:
    """
    What the sidecar says of one recording.

    @ivar id: the session's id, which names both files.
    @ivar user: who opened the session.
    @ivar vm_id: which VM.
    @ivar console_type: C{vnc}, C{ssh} or C{rdp}.
    @ivar zone: the zone the session was relayed to, C{None} for this one.
    @ivar client: the browser's address.
    @ivar started: POSIX time the recording started.
    @ivar ended: POSIX time it ended; C{None} while the session lives (or
        when the server stopped before it could say).
    @ivar size: bytes in the C{.guac} file.
    @ivar sha256: the C{.guac} file's sha256 (hex) once it is complete.
    @ivar keys: whether the user's key events are in it.
    @ivar gaps: how many times instructions were dropped because the disk
        could not keep up (each gap is marked in the file too).
    @ivar status: the Guacamole status the session closed with.
    @ivar reason: why it closed, in words.
    """

    id: str
    user: str
    vm_id: int
    console_type: str
    started: float
    zone: str | None = None
    client: str = ""
    ended: float | None = None
    size: int = 0
    sha256: str | None = None
    keys: bool = False
    gaps: int = 0
    status: int | None = None
    reason: str = ""

    def to_json(self) -> dict[str, Any]:
        """The sidecar's JSON object."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RecordingFacts:
        """
        Read a sidecar's object.

        @raise ValueError: for a missing field, a field of the wrong type or
            an id that is not a recording id.
        """
        if not isinstance(data, Mapping):
            raise ValueError("a sidecar is a JSON object")
        values: dict[str, Any] = {}
        for spec in fields(cls):
            if spec.name in data:
                values[spec.name] = data[spec.name]
        try:
            facts = cls(**values)
        except TypeError as error:
            raise ValueError(f"incomplete sidecar: {error}") from None
        if not is_recording_id(facts.id):
            raise ValueError("a sidecar's id is a session id")
        _check_types(facts)
        return facts


def _check_types(facts: RecordingFacts) -> None:
    def number(value: object) -> bool:
        return isinstance(value, int | float) and not isinstance(value, bool)

    checks = (
        isinstance(facts.user, str),
        isinstance(facts.vm_id, int) and not isinstance(facts.vm_id, bool),
        isinstance(facts.console_type, str),
        number(facts.started),
        facts.ended is None or number(facts.ended),
        facts.zone is None or isinstance(facts.zone, str),
        isinstance(facts.client, str),
        isinstance(facts.size, int) and not isinstance(facts.size, bool),
        facts.sha256 is None or isinstance(facts.sha256, str),
        isinstance(facts.keys, bool),
        isinstance(facts.gaps, int) and not isinstance(facts.gaps, bool),
        facts.status is None
        or (isinstance(facts.status, int) and not isinstance(facts.status, bool)),
        isinstance(facts.reason, str),
    )
    if not all(checks):
        raise ValueError("a sidecar field has the wrong type")


@dataclass(frozen=True)
class SweepResult:
    """What one retention sweep removed: recordings, and bytes freed."""

    removed: int
    freed: int
    kept: int
    kept_bytes: int


class RecordingStore:
    """
    The directory of recordings (C{recording.path}).

    Blocking: use it from a thread (the relay's writer thread, a web
    request's C{deferToThread}, the sweep's).
    """

    def __init__(self, directory: str | os.PathLike[str]) -> None:
        self.directory = Path(directory)

    def data_path(self, recording_id: str) -> Path:
        """
        Where the recording's instructions are.

        @raise ValueError: for anything that is not a recording id (so that
            no name from a client ever reaches the file system).
        """
        return self._path(recording_id, DATA_SUFFIX)

    def facts_path(self, recording_id: str) -> Path:
        """Where its sidecar is (L{data_path}'s rules)."""
        return self._path(recording_id, FACTS_SUFFIX)

    def _path(self, recording_id: str, suffix: str) -> Path:
        if not is_recording_id(recording_id):
            raise ValueError("not a recording id")
        return self.directory / f"{recording_id}{suffix}"

    def write_facts(self, facts: RecordingFacts) -> None:
        """
        Write (or replace) a sidecar atomically: a reader sees the old one
        or the new one, never half of one.
        """
        final = self.facts_path(facts.id)
        temporary = final.with_name(f".{final.name}.tmp")
        data = json.dumps(facts.to_json(), sort_keys=True).encode("utf-8")
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            with os.fdopen(descriptor, "wb") as handle:
                handle.write(data)
            os.replace(temporary, final)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise

    def facts(self, recording_id: str) -> RecordingFacts | None:
        """
        One recording's facts, or C{None} when there is no such recording
        (or its sidecar is unreadable, which is logged by the caller's
        listing, not here), or C{recording_id} is no recording id.
        """
        if not is_recording_id(recording_id):
            return None
        return self._read(self.facts_path(recording_id))

    def _read(self, path: Path) -> RecordingFacts | None:
        try:
            with path.open("rb") as handle:
                data = handle.read(_MAX_SIDECAR + 1)
        except OSError:
            return None
        if len(data) > _MAX_SIDECAR:
            return None
        try:
            return RecordingFacts.from_json(json.loads(data))
        except ValueError:
            return None

    def listing(self) -> list[RecordingFacts]:
        """Every readable recording, newest first."""
        found = [facts for facts in self._each() if facts is not None]
        found.sort(key=lambda facts: facts.started, reverse=True)
        return found

    def _each(self) -> Iterator[RecordingFacts | None]:
        try:
            entries = list(os.scandir(self.directory))
        except OSError:
            return
        for entry in entries:
            stem, dot, suffix = entry.name.partition(".")
            if dot and "." + suffix == FACTS_SUFFIX and is_recording_id(stem):
                yield self._read(Path(entry.path))

    def remove(self, recording_id: str) -> int:
        """Delete a recording's two files; return the bytes freed."""
        freed = 0
        for path in (self.data_path(recording_id), self.facts_path(recording_id)):
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                continue
            freed += size
        return freed

    def sweep(
        self, now: float, max_age: float, max_bytes: int, live: frozenset[str] = frozenset()
    ) -> SweepResult:
        """
        Enforce retention: remove recordings that ended more than C{max_age}
        seconds ago (0: no age limit), then the oldest until the rest fit in
        C{max_bytes} (0: no size limit).  Recordings in C{live} (sessions
        still being written) are never removed, and count in the total.
        """
        entries: list[tuple[float, str, int]] = []
        for facts in self.listing():
            size = self._size_on_disk(facts.id)
            entries.append((facts.started, facts.id, size))
        entries.sort()
        removed = freed = 0
        kept: list[tuple[float, str, int]] = []
        for started, recording_id, size in entries:
            facts = self.facts(recording_id)
            ended = facts.ended if facts is not None else None
            last = ended if ended is not None else started
            if recording_id not in live and max_age > 0 and now - last > max_age:
                freed += self.remove(recording_id)
                removed += 1
            else:
                kept.append((started, recording_id, size))
        total = sum(size for _, _, size in kept)
        if max_bytes > 0:
            for entry in list(kept):
                if total <= max_bytes:
                    break
                _, recording_id, size = entry
                if recording_id in live:
                    continue
                freed += self.remove(recording_id)
                removed += 1
                total -= size
                kept.remove(entry)
        return SweepResult(removed=removed, freed=freed, kept=len(kept), kept_bytes=total)

    def _size_on_disk(self, recording_id: str) -> int:
        size = 0
        for path in (self.data_path(recording_id), self.facts_path(recording_id)):
            with contextlib.suppress(OSError):
                size += path.stat().st_size
        return size
