"""The worker's side of `WorkerControl.StreamLoad`: load reports and KV events for every router.

The engine publishes a report after each step (and an idle heartbeat), on its dispatcher thread.
`LoadPublisher` keeps, under a lock, the set of block hashes cached now (applying each report's KV
events) and, for each subscribed stream, the events it has not sent yet; it wakes the subscribers'
event loop. A new subscriber starts from a snapshot of the set, so a router that connects late (or
reconnects) knows the whole cache, then follows the changes in order.

A subscriber that falls far behind (its stream stalled) is not allowed to hold memory without bound:
past `MAX_PENDING_HASHES` its pending events are dropped and its next report is a fresh snapshot.
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass, field

from protos.tensoryard.v1 import worker_pb2

MAX_PENDING_HASHES = 100_000


@dataclass(slots=True)
class Subscriber:
    wants_kv_events: bool
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    needs_snapshot: bool = True
    stored: list[bytes] = field(default_factory=list)
    removed: list[bytes] = field(default_factory=list)


class LoadPublisher:
    def __init__(self, block_size: int = 0):
        self.block_size = block_size
        self._lock = threading.Lock()
        self._cached: set[bytes] = set()
        self._subscribers: list[Subscriber] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the subscribers run on (set once serving starts)."""
        self._loop = loop

    # -- producer side (any thread) --------------------------------------------------------------

    def publish(self, stored: list[bytes] = (), removed: list[bytes] = ()) -> None:
        """Something changed: apply the KV events (if any) and wake every subscriber."""
        with self._lock:
            if stored or removed:
                self._cached.difference_update(removed)
                self._cached.update(stored)
                for subscriber in self._subscribers:
                    if not subscriber.wants_kv_events or subscriber.needs_snapshot:
                        continue
                    subscriber.stored.extend(stored)
                    subscriber.removed.extend(removed)
                    if len(subscriber.stored) + len(subscriber.removed) > MAX_PENDING_HASHES:
                        subscriber.stored.clear()
                        subscriber.removed.clear()
                        subscriber.needs_snapshot = True
            subscribers = list(self._subscribers)
        loop = self._loop
        if loop is None:
            return
        for subscriber in subscribers:
            try:
                loop.call_soon_threadsafe(subscriber.changed.set)
            except RuntimeError:  # the loop is closed: the process is stopping
                return

    # -- subscriber side (the event loop) --------------------------------------------------------

    def subscribe(self, wants_kv_events: bool) -> Subscriber:
        subscriber = Subscriber(wants_kv_events)
        with self._lock:
            self._subscribers.append(subscriber)
        return subscriber

    def unsubscribe(self, subscriber: Subscriber) -> None:
        with self._lock:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

    def take_events(self, subscriber: Subscriber) -> worker_pb2.KvEvents | None:
        """What this subscriber has not been sent: a snapshot first, then changes. None without KV."""
        if not subscriber.wants_kv_events or not self.block_size:
            return None
        with self._lock:
            if subscriber.needs_snapshot:
                subscriber.needs_snapshot = False
                return worker_pb2.KvEvents(block_size=self.block_size, snapshot=True, stored=list(self._cached))
            stored, subscriber.stored = subscriber.stored, []
            removed, subscriber.removed = subscriber.removed, []
        return worker_pb2.KvEvents(block_size=self.block_size, stored=stored, removed=removed)

    @property
    def num_cached_blocks(self) -> int:
        with self._lock:
            return len(self._cached)
