"""A front end's arena of fixed-size shared-memory slots, and which of them are free.

The arena is a memfd (memfd_create), not a named segment: it has no name in /dev/shm
or anywhere else, so there is nothing to unlink and nothing that can be left behind.
The kernel frees its pages when the last descriptor and mapping go, whichever process
dies and however (kill -9 included). The executor gets it by descriptor passing
(SCM_RIGHTS over the record socket). multiprocessing.shared_memory would give a
/dev/shm file that someone must unlink, plus the resource tracker's warnings and
unlinks (it tracks segments per process, whatever track= the caller would want).

The front end seals the size before passing it: a peer that could shrink it would
make the other's next touch of a vanished page a SIGBUS.
"""

from __future__ import annotations

import fcntl
import mmap
import os
from typing import Final

PAGE: Final = mmap.PAGESIZE
_SEALS: Final = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL
ARENA_NAME: Final = "gateway-arena"  # what /proc/<pid>/fd shows: memfd:gateway-arena (deleted)


def round_to_page(n: int) -> int:
    return max(PAGE, (n + PAGE - 1) // PAGE * PAGE)


class Arena:
    """`slots` slots of `slot_bytes` bytes each in one shared mapping.

    Pages are only allocated when first written, so a generous slot size costs
    memory only for the bytes requests actually use."""

    def __init__(self, fd: int, slots: int, slot_bytes: int) -> None:
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.fd = fd
        self.memory = mmap.mmap(fd, slots * slot_bytes)
        # Slices of a memoryview copy without the mmap object's own checks; released on close.
        self.view = memoryview(self.memory)

    @classmethod
    def create(cls, slots: int, slot_bytes: int) -> Arena:
        """A new arena (front end); `slot_bytes` is rounded up to whole pages."""
        if slots < 1:
            raise ValueError("an arena needs at least one slot")
        slot_bytes = round_to_page(slot_bytes)
        fd = os.memfd_create(ARENA_NAME, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, slots * slot_bytes)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
            return cls(fd, slots, slot_bytes)
        except BaseException:
            os.close(fd)
            raise

    @classmethod
    def attach(cls, fd: int, slots: int, slot_bytes: int) -> Arena:
        """Map an arena received from a front end (executor); takes ownership of `fd`.

        Refuses one whose size is not sealed, or smaller than its geometry says."""
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            if seals & fcntl.F_SEAL_SHRINK == 0:
                raise ValueError("the arena's size is not sealed")
            if os.fstat(fd).st_size < slots * slot_bytes or slots < 1 or slot_bytes < 1:
                raise ValueError("the arena is smaller than its record says")
            arena = cls(fd, slots, slot_bytes)
        except BaseException:
            os.close(fd)
            raise
        # The mapping keeps the memory alive; the descriptor is not needed any more.
        arena.fd = -1
        os.close(fd)
        return arena

    def base(self, slot: int) -> int:
        return slot * self.slot_bytes

    def close(self) -> bool:
        """Unmap and close; False while numpy views of the memory are still alive (try again later)."""
        self.view.release()
        try:
            self.memory.close()  # refused while arrays made by np.frombuffer are alive
        except BufferError:
            self.view = memoryview(self.memory)
            return False
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        return True


class SlotPool:
    """Which slots are free. Last freed, first taken: a hot slot's pages stay in cache."""

    def __init__(self, slots: int) -> None:
        self._free = list(range(slots - 1, -1, -1))
        self._in_use = bytearray(slots)

    def take(self) -> int | None:
        if not self._free:
            return None
        slot = self._free.pop()
        self._in_use[slot] = 1
        return slot

    def free(self, slot: int) -> None:
        if not self._in_use[slot]:
            raise ValueError(f"slot {slot} is already free")
        self._in_use[slot] = 0
        self._free.append(slot)

    def free_count(self) -> int:
        return len(self._free)

    def in_use(self) -> int:
        return len(self._in_use) - len(self._free)
