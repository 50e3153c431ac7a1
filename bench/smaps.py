"""Where a process's resident memory is, by kind, from ``/proc/PID/smaps`` (Linux).

Why: RSS alone cannot tell a leak of Python objects from an allocator keeping freed memory, and
the soak (issue 13) needed exactly that split. The kinds:

- ``heap``: the main glibc heap (``[heap]``, grown with brk): the loop thread's allocations over
  512 bytes (pymalloc passes those to malloc);
- ``thread_arenas``: anonymous mappings at 64 MiB-aligned addresses, up to 64 MiB: glibc's
  per-thread arenas (executor threads, the log writer, SQLite's page cache in them);
- ``anon``: every other anonymous mapping: pymalloc's 1 MiB arenas (Python objects), large
  allocations glibc mmaps on their own, thread stacks;
- ``file``: mapped files (shared libraries, SQLite's ``-shm``).
"""

from __future__ import annotations

KINDS = ("heap", "thread_arenas", "anon", "file")
_ARENA = 64 << 20


def breakdown(pid: int) -> dict[str, int] | None:
    """Resident KiB per kind for process ``pid``; None if it is gone or unreadable."""
    out = dict.fromkeys(KINDS, 0)
    kind = "anon"
    try:
        with open(f"/proc/{pid}/smaps", "rb") as f:
            for line in f:
                head = line.split(None, 6)
                if b"-" in head[0] and not head[0].endswith(b":"):
                    kind = _kind(head)
                elif head[0] == b"Rss:":
                    out[kind] += int(head[1])
    except (OSError, IndexError, ValueError):
        return None
    return out


def _kind(head: list[bytes]) -> str:
    name = head[5].strip() if len(head) > 5 else b""
    if name == b"[heap]":
        return "heap"
    if name.startswith(b"/"):
        return "file"
    start, end = (int(x, 16) for x in head[0].split(b"-"))
    if not name and start % _ARENA == 0 and end - start <= _ARENA:
        return "thread_arenas"
    return "anon"
