"""One engine thread that batches concurrent requests (continuous batching).

HTTP handler threads submit `Job`s and read their events from a queue; the worker thread owns
the model. When idle it takes every waiting job (up to ``max_batch_size``, after waiting up to
``batch_wait_s`` for more to arrive) and starts a `RunningBatch`; between decode steps,
waiting jobs join the running batch while there is room. A job whose client went away is
cancelled and leaves the batch at the next step.
"""

from __future__ import annotations

import collections
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from tunelab.infer.batch import RunningBatch
from tunelab.infer.engine import Engine, GenRequest, TokenEvent
from tunelab.infer.sampling import GenerationConfig

log = logging.getLogger(__name__)


@dataclass
class Job:
    """One sequence to generate; events go to ``out`` as ``(choice, TokenEvent)``.

    Several jobs of one HTTP request (``n`` > 1, a list of prompts) share ``out`` and carry
    their ``choice`` index. A failure puts ``(choice, exception)`` instead.
    """

    prompt_ids: list[int]
    config: GenerationConfig
    out: queue.Queue
    choice: int = 0
    cancel: threading.Event = field(default_factory=threading.Event)

    def request(self) -> GenRequest:
        return GenRequest(self.prompt_ids, self.config, self.cancel.is_set)


class BatchWorker:
    def __init__(self, engine: Engine, max_batch_size: int = 16, batch_wait_s: float = 0.01):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._pending: collections.deque[Job] = collections.deque()
        self._cv = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="tunelab-engine", daemon=True)
        self._stopped = False
        self._paused = False
        self._current: dict[int, Job] = {}
        self.num_batches = 0
        self.num_joined = 0
        self.max_batch_seen = 0

    def start(self) -> BatchWorker:
        self._thread.start()
        return self

    def submit(self, jobs: list[Job]) -> None:
        with self._cv:
            if self._stopped:
                raise RuntimeError("the engine worker has stopped")
            self._pending.extend(jobs)
            self._cv.notify_all()

    def pause(self) -> None:
        """Start no new batch and admit nobody (the running batch continues)."""
        with self._cv:
            self._paused = True

    def resume(self) -> None:
        with self._cv:
            self._paused = False
            self._cv.notify_all()

    def num_queued(self) -> int:
        with self._cv:
            return len(self._pending)

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel running and queued jobs (their clients get a final event), end the thread."""
        with self._cv:
            self._stopped = True
            for job in list(self._current.values()):
                job.cancel.set()
            self._cv.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @staticmethod
    def _cancel(job: Job) -> None:
        job.out.put((job.choice, TokenEvent(0, None, "", "cancelled")))

    def _take_batch(self) -> list[Job] | None:
        """Block for work; None when stopping."""
        with self._cv:
            while not self._stopped and (self._paused or not self._pending):
                self._cv.wait()
            if self._stopped:
                return None
            deadline = time.monotonic() + self.batch_wait_s
            while len(self._pending) < self.max_batch_size and not self._stopped:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cv.wait(remaining)
            batch = []
            while self._pending and len(batch) < self.max_batch_size:
                batch.append(self._pending.popleft())
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                break
            live = []
            for job in batch:
                (self._cancel if job.cancel.is_set() else live.append)(job)
            if live:
                self._run(live)
        with self._cv:  # jobs submitted while stopping still get an answer
            left, self._pending = list(self._pending), collections.deque()
        for job in left:
            self._cancel(job)

    def _admit(self, running: RunningBatch) -> None:
        """Move waiting jobs into the running batch while they fit (in arrival order)."""
        while True:
            with self._cv:
                if self._paused or self._stopped or not self._pending:
                    return
                job = self._pending[0]
                if job.cancel.is_set():
                    self._pending.popleft()
                    self._cancel(job)
                    continue
                if not running.can_join(job.request(), self.max_batch_size):
                    return
                self._pending.popleft()
                self._current[running.next_index] = job
            running.join(job.request())
            self.num_joined += 1
            self.max_batch_seen = max(self.max_batch_seen, len(running.active))

    def _run(self, jobs: list[Job]) -> None:
        self.num_batches += 1
        self.max_batch_seen = max(self.max_batch_seen, len(jobs))
        with self._cv:
            self._current = dict(enumerate(jobs))
        try:
            running = RunningBatch(self.engine, [j.request() for j in jobs])
            while True:
                for ev in running.sample():
                    job = self._current[ev.index]
                    job.out.put((job.choice, ev))
                if running.done:
                    break
                running.forward()
                self._admit(running)
        except Exception as e:  # noqa: BLE001 - every waiting client must get an answer
            log.exception("generation failed for a batch of %d requests", len(self._current))
            for job in self._current.values():
                job.out.put((job.choice, e))
        finally:
            with self._cv:
                self._current = {}


def is_final(ev: TokenEvent | Exception) -> bool:
    return isinstance(ev, Exception) or ev.finish_reason is not None
