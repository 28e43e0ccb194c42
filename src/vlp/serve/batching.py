"""Dynamic batching: predict-function calls of concurrent requests to one model, joined into one call.

A request's answer runs in a worker thread that calls predict functions; here each call becomes a job on
its model's queue, and one thread per model runs the jobs. A function marked `per_item(n)` (its first n
arguments hold one entry per item) is joined with the jobs that call it with the same other arguments
and whose texts are of a like length, that arrive within `max_wait_ms`, up to `max_batch_size` items; the
joined output is split back. Any other call runs alone, on the same thread, so a model only ever runs one
call at a time. A job whose deadline passes before it runs is dropped, not computed. The first job of a
batch waits for others only while other requests to the model are in flight: a lone client is not made to
wait for company that cannot come.
"""

from __future__ import annotations

import contextlib
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from vlp.errors import BadQuery


class QueueFull(BadQuery):
    """The model's queue holds `max_queue` jobs already (429, with Retry-After)."""


class DeadlineExceeded(Exception):
    """A job's deadline passed before it ran (503)."""


@dataclass(frozen=True)
class BatchSettings:
    max_batch_size: int = 32  # items in one call
    max_wait_ms: float = 5.0  # how long the first job of a batch waits for others
    max_queue: int = 256  # jobs waiting per model before new ones are refused


@dataclass
class _Job:
    key: Any
    function: Callable[..., Any]
    items: tuple[Sequence[Any], ...]  # the per-item arguments
    rest: tuple[Any, ...]
    kwargs: dict[str, Any]
    count: int
    deadline: float
    enqueued: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


def _length_bucket(items: tuple[Sequence[Any], ...]) -> int:
    """Texts of like length share a batch: padding then costs little (rounded up to 32 characters)."""
    longest = max((len(v) for column in items for v in column if isinstance(v, str)), default=0)
    return (longest + 31) // 32


def _shared_key(value: Any) -> Any:
    # Tensors are compared by identity: their repr is abbreviated, so equal reprs need not be equal tensors.
    if torch.is_tensor(value):
        return ("tensor", id(value))
    return repr(value)


class ModelQueue:
    """One model's jobs and the thread that runs them. `observe(wait_s, batch_items)` and `depth(n)` report
    to the service's metrics."""

    def __init__(self, name: str, settings: BatchSettings, *, observe: Callable[[float, int], None] = lambda w, n: None,
                 depth: Callable[[int], None] = lambda n: None):
        self.name, self.settings = name, settings
        self._observe, self._depth = observe, depth
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._held: list[_Job] = []  # taken from the queue, of another key: they go first next time
        self._pending = 0
        self._requests = 0  # requests to this model in flight, from their start to their answer
        self._lock = threading.Lock()
        self._unique = itertools.count()
        self._thread = threading.Thread(target=self._run, name=f"vlp-model-{name}", daemon=True)
        self._thread.start()

    def call(self, function: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any], *,
             deadline: float) -> Any:
        """Run `function(*args, **kwargs)` on the model's thread, joined with like calls when it is `per_item`."""
        per_item = getattr(function, "per_item_args", 0)
        items, rest = tuple(args[:per_item]), tuple(args[per_item:])
        counts = {len(column) for column in items}
        if per_item and len(counts) == 1 and counts != {0}:
            name = getattr(function, "__name__", "")
            key = (name, id(getattr(function, "__self__", None)), tuple(_shared_key(v) for v in rest),
                   tuple(sorted((k, _shared_key(v)) for k, v in kwargs.items())), _length_bucket(items))
            count = counts.pop()
        else:  # runs alone
            key, items, rest, count = ("alone", next(self._unique)), (), tuple(args), 1
        job = _Job(key, function, items, rest, kwargs, count, deadline)
        with self._lock:
            if self._pending >= self.settings.max_queue:
                raise QueueFull(f"model {self.name} has {self._pending} requests waiting; try again shortly")
            self._pending += 1
            self._depth(self._pending)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    @contextlib.contextmanager
    def request(self) -> Iterator[None]:
        """Around a request's answer: while more than one is in flight, calls wait to be joined."""
        with self._lock:
            self._requests += 1
        try:
            yield
        finally:
            with self._lock:
                self._requests -= 1

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _next(self, timeout: float | None) -> _Job | None:
        if self._held:
            return self._held.pop(0)
        try:
            return self._queue.get(timeout=timeout) if timeout is None or timeout > 0 else self._queue.get_nowait()
        except queue.Empty:
            return None

    def _run(self) -> None:
        while True:
            first = self._next(None)
            if first is None:
                return
            batch, items, others = [first], first.count, []
            alone = self._requests <= 1 and not self._held and self._queue.empty()
            closes = first.enqueued + (0.0 if alone else self.settings.max_wait_ms / 1000)
            while items < self.settings.max_batch_size and first.key[0] != "alone":
                job = self._next(closes - time.monotonic())
                if job is None:
                    break
                if job.key == first.key and items + job.count <= self.settings.max_batch_size:
                    batch.append(job)
                    items += job.count
                else:
                    others.append(job)
            self._held = others + self._held
            self._execute(batch)
            with self._lock:
                self._pending -= len(batch)
                self._depth(self._pending)

    def _execute(self, batch: list[_Job]) -> None:
        now = time.monotonic()
        live = []
        for job in batch:
            if now > job.deadline:
                job.error = DeadlineExceeded("the request's deadline passed before it was computed")
                job.done.set()
            else:
                live.append(job)
        if not live:
            return
        self._observe(max(now - job.enqueued for job in live), sum(job.count for job in live))
        first = live[0]
        try:
            if first.key[0] == "alone":
                outputs = [first.function(*first.rest, **first.kwargs)]
            else:
                joined = [[value for job in live for value in job.items[column]] for column in range(len(first.items))]
                output = first.function(*joined, *first.rest, **first.kwargs)
                outputs = _split(output, [job.count for job in live])
            for job, output in zip(live, outputs, strict=True):
                job.result = output
        except Exception as err:  # noqa: BLE001 - re-raised in every waiting request's own thread
            for job in live:
                job.error = err
        for job in live:
            job.done.set()


def _split(output: Any, counts: list[int]) -> list[Any]:
    """A joined call's output, one part per job: a tensor along its first dimension, a list by slices."""
    if torch.is_tensor(output):
        return list(output.split(counts))
    if isinstance(output, list):
        starts = list(itertools.accumulate([0, *counts]))
        return [output[a:b] for a, b in itertools.pairwise(starts)]
    raise TypeError(f"a per-item predict function returned a {type(output).__name__}, not a tensor or list")


class QueuedFunctions:
    """A model's predict functions (`vlp.tasks.PredictFunctions`) whose calls go through its queue; what a
    task's `respond` receives in the service. A function that returns a function (a zero-shot classifier)
    returns one whose calls go through the queue too."""

    def __init__(self, functions: Any, model_queue: ModelQueue, deadline: float):
        self._functions, self._queue, self._deadline = functions, model_queue, deadline

    def _queued(self, function: Callable[..., Any]) -> Callable[..., Any]:
        def run(*args: Any, **kwargs: Any) -> Any:
            result = self._queue.call(function, args, kwargs, deadline=self._deadline)
            return self._queued(result) if callable(result) and not torch.is_tensor(result) else result

        return run

    def __getattr__(self, name: str) -> Callable[..., Any] | None:
        if name.startswith("_"):
            raise AttributeError(name)
        function = getattr(self._functions, name)
        return None if function is None else self._queued(function)

    def require(self, name: str) -> Callable[..., Any]:
        return self._queued(self._functions.require(name))
