"""Every image's state (core/state.py) in one registry, with the settings that time the
images' hold timers: what the manager, the hold timer, the journal and `.status` read. Pure,
like the state machine."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Mapping

from .settings import Settings
from .state import Changes, Image, Scanned


class Registry:
    """Every image's state, and the settings whose hold times time them. Pure, like `Image`.

    Invariant: `changes` counts up at every event of every image that may change its state.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.images: dict[str, Image] = {}
        self.changes = Changes()  # shared by every image

    def __getitem__(self, name: str) -> Image:
        image = self.images.get(name)
        if image is None:
            image = self.images[name] = Image(name, self.changes)
        return image

    def __iter__(self) -> Iterator[Image]:
        return iter(list(self.images.values()))

    def hold_time_of(self, image: Image) -> float:
        """*image*'s own hold time if it has one, else the global one (see settings.py)."""
        settings = self.settings
        return settings.hold_times.get(image.name, settings.hold_time)

    def deadline(self, image: Image) -> float | None:
        if image.idle_since is None:
            return None
        return image.idle_since + self.hold_time_of(image)

    def next_deadline(self) -> float | None:
        """When the next hold timer runs out, or None if no timer runs."""
        deadlines = [d for d in map(self.deadline, self.images.values()) if d is not None]
        return min(deadlines, default=None)

    def due(self, now: float) -> list[Image]:
        """The images whose hold timer ran out."""
        return [i for i in self.images.values() if i.due(now, self.hold_time_of(i))]

    def scanned(self, found: Mapping[str, Mapping[str, Scanned]], now: float) -> list[Image]:
        """Apply a scan of the processes (image -> allocation -> what it found) to every
        image. Returns the images whose counts changed."""
        return [i for i in self.images.values() if i.scanned(found.get(i.name, {}), now)]

    def disconnected(self, now: float) -> list[Image]:
        """The FUSE connection is gone: processes sitting in images no longer use them (they
        sat in its files), the namespaces holding them still do (their mounts are the
        kernel's) until a scan finds them gone: a tree handed out counts no longer for its
        grace time (the daemon stops; the next scan says whether it was attached). Returns
        the images whose counts changed."""
        for image in self.images.values():
            for use in image.users.values():
                use.handed_until = -math.inf
        return [i for i in self.images.values()
                if i.scanned({a: Scanned(namespaces=u.namespaces) for a, u in i.users.items()},
                             now)]

    def users_of(self, alloc: str) -> list[Image]:
        return [i for i in self.images.values() if alloc in i.users]

    def allocations(self) -> set[str]:
        return {a for i in self.images.values() for a in i.users}

    def release(self, alloc: str, now: float, names: Iterable[str] | None = None) -> list[str]:
        """Release *alloc* from *names* (default: everywhere). Returns the images it left."""
        images = self.users_of(alloc) if names is None else [self[n] for n in names]
        return [i.name for i in images if i.release(alloc, now)]

    def reconcile(self, live: Iterable[str], now: float) -> list[tuple[str, str]]:
        """Only *live* allocations exist: release every other one. Returns (image, alloc)."""
        keep = set(live)
        dropped = []
        for image in self.images.values():
            for alloc in [a for a in image.users if a not in keep]:
                image.release(alloc, now)
                dropped.append((image.name, alloc))
        return dropped

    def check(self) -> None:
        for image in self.images.values():
            image.check()
