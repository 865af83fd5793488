"""Blocking calls on a fixed set of threads, taken in turn from each client and each request.

A plain executor is first come, first served: one client's batch of slow
items (each up to the verifier's timeout) would make a one-item request
from another client wait for all of them. Here the pending items sit in one
queue per request, grouped by client; a free thread takes the next item of
the next client in turn, and within a client of its next request in turn.
So a request waits for at most one item per other active request, never for
a whole batch. The client is whatever key the caller passes (the reward
service uses the peer's address).
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from concurrent.futures import Future
from typing import Callable, Sequence


class FairExecutor:
    def __init__(self, workers: int, name: str = "fair") -> None:
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._ready = threading.Condition()
        # client -> its requests in turn; a request is a deque of (call, future) not yet started
        self._clients: OrderedDict[str, deque[deque]] = OrderedDict()
        self._closed = False
        self._threads = [threading.Thread(target=self._work, name=f"{name}-{i}", daemon=True) for i in range(workers)]
        for thread in self._threads:
            thread.start()

    def submit_all(self, client: str, calls: Sequence[Callable[[], object]]) -> list[Future]:
        """One future per call, in order; the calls are one request of `client`."""
        futures = [Future() for _ in calls]
        if not calls:
            return futures
        with self._ready:
            if self._closed:
                raise RuntimeError("the executor is shut down")
            self._clients.setdefault(client, deque()).append(deque(zip(calls, futures)))
            self._ready.notify(len(futures))
        return futures

    def pending(self) -> int:
        """Calls not started yet, over all clients."""
        with self._ready:
            return sum(len(request) for requests in self._clients.values() for request in requests)

    def _next(self):
        client, requests = self._clients.popitem(last=False)  # the client whose turn it is
        request = requests.popleft()
        item = request.popleft()
        if request:
            requests.append(request)  # its other requests go first next time
        if requests:
            self._clients[client] = requests  # back of the line
        return item

    def _work(self) -> None:
        while True:
            with self._ready:
                while not self._clients and not self._closed:
                    self._ready.wait()
                if self._closed:
                    return
                call, future = self._next()
            if not future.set_running_or_notify_cancel():
                continue  # its request was cancelled (the client went away)
            try:
                future.set_result(call())
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting request
                future.set_exception(exc)

    def shutdown(self) -> None:
        """Cancel every call not started; running ones finish on their own."""
        with self._ready:
            self._closed = True
            for requests in self._clients.values():
                for request in requests:
                    for _, future in request:
                        future.cancel()
            self._clients.clear()
            self._ready.notify_all()
