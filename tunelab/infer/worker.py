"""One engine thread that batches concurrent requests.

HTTP handler threads submit `Job`s and read their events from a queue; the worker thread owns
the model. Whenever it is idle it takes every queued job (up to ``max_batch_size``, after
waiting up to ``batch_wait_s`` for more to arrive) and decodes them as one batch. A job whose
client went away is cancelled and leaves the batch at the next step.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field

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


class BatchWorker:
    def __init__(self, engine: Engine, max_batch_size: int = 16, batch_wait_s: float = 0.01):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread = threading.Thread(target=self._loop, name="tunelab-engine", daemon=True)
        self._stopped = threading.Event()
        self._resumed = threading.Event()
        self._resumed.set()
        self._current: list[Job] = []
        self.num_batches = 0
        self.max_batch_seen = 0

    def start(self) -> BatchWorker:
        self._thread.start()
        return self

    def submit(self, jobs: list[Job]) -> None:
        if self._stopped.is_set():
            raise RuntimeError("the engine worker has stopped")
        for job in jobs:
            self._queue.put(job)

    def pause(self) -> None:
        """Hold new batches (queued jobs wait); the running batch finishes."""
        self._resumed.clear()

    def resume(self) -> None:
        self._resumed.set()

    def num_queued(self) -> int:
        return self._queue.qsize()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Cancel running and queued jobs (their clients get a final event), end the thread."""
        self._stopped.set()
        for job in list(self._current):
            job.cancel.set()
        self._resumed.set()
        self._queue.put(None)
        if self._thread.is_alive():
            self._thread.join(timeout)

    def _cancel(self, job: Job) -> None:
        job.out.put((job.choice, TokenEvent(0, None, "", "cancelled")))

    def _take_batch(self, first: Job) -> list[Job]:
        batch = [first]
        deadline = time.monotonic() + self.batch_wait_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = (
                    self._queue.get(timeout=remaining)
                    if remaining > 0
                    else self._queue.get_nowait()
                )
            except queue.Empty:
                break
            if job is None:  # stop requested: finish this batch, then exit
                self._queue.put(None)
                break
            batch.append(job)
        return batch

    def _loop(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                break
            self._resumed.wait()
            batch = self._take_batch(first)
            for job in batch:
                if job.cancel.is_set() or self._stopped.is_set():
                    self._cancel(job)
            batch = [j for j in batch if not (j.cancel.is_set() or self._stopped.is_set())]
            if not batch:
                continue
            self.num_batches += 1
            self.max_batch_seen = max(self.max_batch_seen, len(batch))
            self._current = batch
            try:
                self._run(batch)
            finally:
                self._current = []
        while True:  # jobs submitted while stopping still get an answer
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                self._cancel(job)

    def _run(self, batch: list[Job]) -> None:
        requests = [GenRequest(j.prompt_ids, j.config, j.cancel.is_set) for j in batch]
        try:
            for events in self.engine.iterate(requests):
                for ev in events:
                    job = batch[ev.index]
                    job.out.put((job.choice, ev))
        except Exception as e:  # noqa: BLE001 - every waiting client must get an answer
            log.exception("generation failed for a batch of %d requests", len(batch))
            for job in batch:
                job.out.put((job.choice, e))


def is_final(ev: TokenEvent | Exception) -> bool:
    return isinstance(ev, Exception) or ev.finish_reason is not None
