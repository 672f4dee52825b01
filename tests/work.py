"""How much work code does, counted as lines of Python it executes: unlike elapsed time, the
count is the same on an idle machine and on a busy one, so a bound on it fails only when the
code does more."""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from types import FrameType, ModuleType
from typing import Any


class LineCount:
    lines = 0


@contextlib.contextmanager
def counting_lines(*packages: ModuleType) -> Iterator[LineCount]:
    """Count the lines executed in ``packages``' own files, in this thread and in threads
    started while counting (TestClient runs each request in a thread of its own)."""
    roots = tuple(os.path.dirname(p.__file__ or "") + os.sep for p in packages)
    count = LineCount()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line":
            count.lines += 1
        return local

    def calls(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code.co_filename.startswith(roots) else None

    before, before_threads = sys.gettrace(), threading.gettrace()
    sys.settrace(calls)
    threading.settrace(calls)
    try:
        yield count
    finally:
        sys.settrace(before)
        threading.settrace(before_threads)  # type: ignore[arg-type]
