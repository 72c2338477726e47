"""What the handlers of every family of FUSE requests share: `fuse_errors`, the one place where
errors become errnos, and `Requests`, the base of the families (fuse/files.py, fuse/
directories.py; fuse/fs.py puts them together as `UenvFS`): the parts of the filesystem, and
the way from a node to its backing file, on storage that may hang (fuse/workers.py) or not.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
from pyfuse3 import FileHandleT

from ..core.errors import MountError, errno_of
from ..kernel import cache, paths
from .inodes import Node, backing_path
from .readonly import ReadOnlyOperations

if TYPE_CHECKING:
    from ..core.interfaces import ImageService
    from ..core.metrics import Metrics
    from ..core.model import Mount
    from .allocation import AllocationResolver
    from .descriptors import DescriptorBudget
    from .handles import Handle, HandleTable
    from .inodes import InodeTable
    from .listings import ListingCache
    from .prefetch import Prefetcher
    from .root import MountRoot
    from .shares import HandleShares
    from .uses import UseScanner
    from .workers import Workers

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
R = TypeVar("R", bound="Requests")


def fuse_errors(
    fn: Callable[Concatenate[R, P], Coroutine[Any, Any, T]],
) -> Callable[Concatenate[R, P], Coroutine[Any, Any, T]]:
    """Count a handler's requests, and turn every error into the `FUSEError` that pyfuse3
    expects: the one place where domain errors become errnos."""
    op = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: R, /, *args: P.args, **kwargs: P.kwargs) -> T:
        counters = self.metrics
        counters.requests[op] += 1
        try:
            return await fn(self, *args, **kwargs)
        except pyfuse3.FUSEError as exc:
            counters.errors[op, errno.errorcode.get(exc.errno, str(exc.errno))] += 1
            raise
        except Exception as exc:
            if isinstance(exc, MountError):
                log.debug("%s: %s", op, exc)
            elif not isinstance(exc, OSError):
                log.exception("%s failed unexpectedly", op)
            code = errno_of(exc)
            counters.errors[op, errno.errorcode.get(code, str(code))] += 1
            raise pyfuse3.FUSEError(code) from exc

    return wrapper


class Requests(ReadOnlyOperations):
    """The base of the families of request handlers: the parts they answer with (made by
    `UenvFS.__init__`), and the backing mounts of the nodes they are asked about.

    Every request inside an image is answered from its backing mount, which is mounted first if
    needed (on the first access, or again after the hold timer unmounted it). A node of another
    version of its image than the one mounted answers ESTALE (see `backing_path`), and so does
    one whose mount changed while a worker thread waited for its storage, whatever the thread
    found. A request that makes a handle (open, opendir) counts its use before it waits, so
    that the hold timer cannot unmount the image under it.
    """

    images: ImageService
    metrics: Metrics  # the requests and errors that `fuse_errors` counts
    resolver: AllocationResolver
    inodes: InodeTable
    handles: HandleTable
    listings: ListingCache
    workers: Workers
    prefetcher: Prefetcher
    budget: DescriptorBudget
    shares: HandleShares
    root: MountRoot
    uses: UseScanner

    async def _backing(self, node: Node) -> tuple[Mount, bytes]:
        """The mount serving *node* and its path there, mounting the image if needed.

        Hot handlers call `_backing_now(node) or await _backing(node)`: no coroutine is made
        when the image is mounted (most requests).
        """
        return backing_path(node, await self.images.ensure_mounted(node.image))

    def _backing_now(self, node: Node) -> tuple[Mount, bytes] | None:
        """Like `_backing`, if the image is mounted now; else None."""
        mount = self.images.mounted(node.image)
        return None if mount is None else backing_path(node, mount)

    async def _lstat_waiting(self, mount: Mount, path: bytes) -> os.stat_result:
        """`lstat` on guarded storage: in the loop if the kernel's caches can answer it, else
        in a worker thread of the image (its storage may hang; see fuse/workers.py)."""
        if len(path) < paths.ROOM:
            st = cache.lstat_cached(path)
            if st is not None:
                return st
        return await self._in_worker(mount, paths.lstat, path)

    async def _on_storage(self, mount: Mount, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on *mount*'s backing files: at once, or on guarded storage in a worker
        thread of the image (see `_in_worker`). Not for the hot handlers (lookup, getattr,
        open, read): they avoid the coroutine when not guarded."""
        if not mount.guarded:
            return fn(*args)
        return await self._in_worker(mount, fn, *args)

    async def _in_worker(self, mount: Mount, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)` on *mount*'s backing files, in a worker thread of the image. What it
        returns or raises holds only if *mount* still serves the image when it comes back:
        else ESTALE (see `_check_still`). An unmount meanwhile leaves the empty backing
        directory, where every name is missing: that ENOENT is not the image's."""
        try:
            result = await self.workers.run(mount.name, fn, *args)
        except OSError:
            self._check_still(mount)
            raise
        self._check_still(mount)
        return result

    def _check_still(self, mount: Mount) -> None:
        """After waiting for a worker thread: ESTALE if *mount* is no longer the image's (it
        was unmounted or replaced meanwhile); the kernel looks the path up again."""
        if self.images.mounted(mount.name) is not mount:
            raise pyfuse3.FUSEError(errno.ESTALE)

    def _add(self, handle: Handle, pid: int) -> FileHandleT:
        """Number *handle* (opened by *pid*, counted and charged already), to be answered at
        once; if it cannot be (the ledger has no slot left: EMFILE), it is released."""
        try:
            return self.handles.add(handle, pid)
        except BaseException:
            handle.release(self.images)
            handle.uncharge(self.shares)
            raise

    def _release(self, fh: int) -> None:
        """Close handle *fh* (a file's or a directory's), once: its use of an image ends, and
        what it took of the shares is given back."""
        handle = self.handles.release(fh)
        if handle is not None:
            handle.release(self.images)
            handle.uncharge(self.shares)
