"""A storage filesystem for tests that hangs in the middle of a checkpoint upload (see test_fault_tolerance).

It lives in its own module, imported as ``tests.trapped_storage``, so that Ray workers (which run with the
repository root on their path) can unpickle it.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from fsspec.implementations.local import LocalFileSystem

TRAINING_STATE = "training_state.pt"


class TrappedLocalFileSystem(LocalFileSystem):
    """Local storage whose upload of a checkpoint's training state hangs while a trap file exists (a save that is
    interrupted half-way: the test kills the uploading worker during the hang)."""

    def __init__(self, trap_dir: str, **kwargs):
        super().__init__(**kwargs)
        self.trap_dir = trap_dir

    def _open(self, path, mode="rb", **kwargs):
        armed = Path(self.trap_dir) / "armed"
        if "w" in mode and str(path).endswith(TRAINING_STATE) and armed.exists():
            armed.unlink()
            (Path(self.trap_dir) / "saving").write_text(f"{os.getpid()} {path}")
            time.sleep(600)
        return super()._open(path, mode, **kwargs)
