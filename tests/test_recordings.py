"""Tests for L{consoleproxy.recordings}: names, sidecars, listing, retention."""

from __future__ import annotations

import json
import os
import stat
import tempfile
from pathlib import Path

from hypothesis import given
from hypothesis import strategies as st
from twisted.trial.unittest import SynchronousTestCase

from consoleproxy.recordings import (
    RecordingFacts,
    RecordingStore,
    is_recording_id,
)

ID_A = "a" * 32
ID_B = "b" * 32
ID_C = "c" * 32


def facts(recording_id: str, started: float, ended: float | None = None) -> RecordingFacts:
    return RecordingFacts(
        id=recording_id, user="alice", vm_id=7, console_type="vnc", started=started, ended=ended
    )


class NamesTests(SynchronousTestCase):
    """Only a session id names a recording."""

    def test_ids(self) -> None:
        self.assertTrue(is_recording_id("0123456789abcdef" * 2))
        for bad in ("", "A" * 32, "a" * 31, "a" * 33, "../" + "a" * 29, 7, None, "a" * 31 + "\n"):
            self.assertFalse(is_recording_id(bad), bad)

    @given(st.text(max_size=40))
    def test_paths_never_escape(self, text: str) -> None:
        store = RecordingStore("/srv/rec")
        try:
            path = store.data_path(text)
        except ValueError:
            return
        self.assertEqual(path.parent, Path("/srv/rec"))


class StoreTests(SynchronousTestCase):
    """Sidecars are written atomically and 0600, read back, listed, swept."""

    def setUp(self) -> None:
        self.directory = Path(tempfile.mkdtemp())
        self.addCleanup(lambda: [p.unlink() for p in self.directory.iterdir()])
        self.store = RecordingStore(self.directory)

    def put(self, recording: RecordingFacts, data: bytes) -> None:
        self.store.data_path(recording.id).write_bytes(data)
        self.store.write_facts(recording)

    def test_round_trip(self) -> None:
        recording = RecordingFacts(
            id=ID_A, user="alice", vm_id=7, console_type="ssh", started=10.0, ended=20.5,
            zone="1", client="192.0.2.1", size=3, sha256="00" * 32, keys=True, gaps=2,
            status=0, reason="browser closed",
        )  # fmt: skip
        self.store.write_facts(recording)
        self.assertEqual(self.store.facts(ID_A), recording)
        mode = stat.S_IMODE(os.stat(self.store.facts_path(ID_A)).st_mode)
        self.assertEqual(mode, 0o600)
        self.assertEqual(os.listdir(self.directory), [f"{ID_A}.json"])

    def test_unreadable_sidecars(self) -> None:
        self.assertIsNone(self.store.facts(ID_A))
        self.assertIsNone(self.store.facts("../etc/passwd"))
        for text in (
            "{",
            "[]",
            json.dumps({"id": ID_A}),
            json.dumps({**facts(ID_A, 1).to_json(), "vm_id": "7"}),
        ):
            self.store.facts_path(ID_A).write_text(text)
            self.assertIsNone(self.store.facts(ID_A), text)
        self.store.facts_path(ID_A).write_text(" " * 70000)
        self.assertIsNone(self.store.facts(ID_A))

    def test_listing_newest_first(self) -> None:
        self.put(facts(ID_A, 1.0, 2.0), b"x")
        self.put(facts(ID_B, 3.0), b"y")
        (self.directory / "notes.json").write_text("{}")
        self.assertEqual([f.id for f in self.store.listing()], [ID_B, ID_A])

    def test_sweep_by_age(self) -> None:
        self.put(facts(ID_A, 0.0, 100.0), b"x" * 10)
        self.put(facts(ID_B, 0.0, 900.0), b"y" * 10)
        self.put(facts(ID_C, 0.0), b"z" * 10)  # live: never removed
        result = self.store.sweep(1000.0, 500.0, 0, live=frozenset({ID_C}))
        self.assertEqual(result.removed, 1)
        self.assertEqual(sorted(f.id for f in self.store.listing()), [ID_B, ID_C])
        self.assertFalse(self.store.data_path(ID_A).exists())

    def test_sweep_by_size_oldest_first(self) -> None:
        self.put(facts(ID_A, 1.0, 2.0), b"x" * 1000)
        self.put(facts(ID_B, 2.0, 3.0), b"y" * 1000)
        self.put(facts(ID_C, 3.0, 4.0), b"z" * 1000)
        budget = self.store._size_on_disk(ID_C) * 2 + 10
        result = self.store.sweep(10.0, 0, budget)
        self.assertEqual(result.removed, 1)
        self.assertEqual(sorted(f.id for f in self.store.listing()), [ID_B, ID_C])
        self.assertLessEqual(result.kept_bytes, budget)
