"""A dependency-free progress line for long device-side work (evaluate, bench).

Writes ``label  n/total  rate`` to stderr, rewriting one line on a terminal and printing
every tenth on a pipe (logs stay readable). tqdm is a desktop dependency; the Pi has none.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def progress(items: Iterable[T], total: int, label: str, enabled: bool = True, stream=None) -> Iterator[T]:
    stream = stream or sys.stderr
    if not enabled or total == 0:
        yield from items
        return
    interactive = stream.isatty()
    step = 1 if interactive else max(1, total // 10)
    start = time.perf_counter()
    for count, item in enumerate(items, 1):
        yield item
        if count % step == 0 or count == total:
            rate = count / max(time.perf_counter() - start, 1e-9)
            line = f"{label} {count}/{total} ({rate:.1f}/s)"
            stream.write(f"\r{line}" if interactive else f"{line}\n")
            stream.flush()
    if interactive:
        stream.write("\n")
