"""Keeping an image whose storage is slow or hung from holding up every other image.

The daemon answers every request in one event loop. A system call on a backing mount that has
to read the image file waits for that file's storage; if the storage hangs (a hung Lustre or
NFS server), the loop would hang with it, and with it every image, `.status` and `.control`.

So the backing mounts of images on *guarded* storage take every system call that may have to
read the image file to a worker thread of the image (`Workers`: a few threads per image; an
image whose storage hangs holds its own threads, never the loop). What the kernel can answer
from memory is still answered in the loop, as for any image: a read whose pages are all in the
page cache (`cachestat(2)`), a lookup or an open whose path is all in the dentry cache
(`openat2(2)` with `RESOLVE_CACHED`). Kernels without those calls send every such call to the
thread.

Which images are guarded, and why local disks are not: manager/storage.py.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import trio

THREADS_PER_IMAGE = 4  # worker threads of one guarded image at most

T = TypeVar("T")


class Workers:
    """A few worker threads per image, for the system calls that may wait for its storage."""

    def __init__(self, per_image: int = THREADS_PER_IMAGE) -> None:
        self.per_image = per_image
        self._limiters: dict[str, trio.CapacityLimiter] = {}
        self.calls = 0  # calls sent to a thread, for tests and metrics

    def limiter(self, image: str) -> trio.CapacityLimiter:
        limiter = self._limiters.get(image)
        if limiter is None:
            limiter = self._limiters[image] = trio.CapacityLimiter(self.per_image)
        return limiter

    async def run(self, image: str, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` in one of *image*'s worker threads."""
        self.calls += 1
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter(image))
