"""glibc malloc settings for the appliance's long-running services (the DICOM node and the watch
daemon, each with an 80 MB budget on a 1 GB Pi, #19): freed heap handed back, one arena."""

from __future__ import annotations


def release_memory() -> None:
    """Hand freed heap back to the kernel (glibc's ``malloc_trim``): CPython and LiteRT free
    into malloc's arenas, which otherwise keep the pages, so the RSS of a long-running node
    would stay at its high-water mark after every study. A no-op where libc has no such call."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)  # the process's own symbols, libc's among them
    except (OSError, AttributeError):
        pass


M_ARENA_MAX = -8  # glibc's malloc.h


def one_malloc_arena() -> None:
    """Make every thread allocate from glibc's main arena (``mallopt(M_ARENA_MAX, 1)``, what
    ``MALLOC_ARENA_MAX=1`` does). pynetdicom runs each association in a new thread, and glibc
    gives threads arenas of their own, whose freed pages :func:`release_memory` cannot all hand
    back: the node's peak grew by about 4.5 MB over its first four studies (82 -> 87.5 MB,
    ``tools/bench_dicom.py --studies 4``) and by 1.7 MB with one arena, at the same receive
    rate (the node's threads mostly wait on sockets and disks). The watch daemon too (#19): its
    reader thread decodes arriving slices and its main thread the top slices of the study
    heatmaps; in two arenas the map's decode added 3.4 MB to its peak (84.0 instead of 80.6 MB),
    in one nothing. Call it before any thread starts. A no-op where libc has no ``mallopt``."""
    import ctypes

    try:
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
    except (OSError, AttributeError):
        pass
