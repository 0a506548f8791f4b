"""Micro-batching: worker threads hand batches to the engine; requests wait in a bounded queue.

The first request of a batch waits up to `max_wait_ms` for companions with the same generation
settings and JSON schema, then up to `max_batch_size` of them are answered by one `ask_batch` call. Streaming
requests run alone (one streamer per `generate`). A full queue raises `QueueFull` at once, so the
server answers 503 instead of piling up work it cannot finish.

Workers: as many as the engine's `concurrency` (calls it runs at once to good effect). The HF
engine has one model and one `generate` at a time: one worker, so batches queue behind each other.
vLLM schedules every request it holds together (continuous batching): many workers, so that new
requests and streams join the running batch instead of waiting for it to end.

Isolation: when a batch fails, whatever the exception, each of its requests is answered alone, so
one bad request fails only itself. Cancellation: a job whose `cancel` is set before its batch
starts is dropped; a running batch stops generating once every one of its jobs is cancelled.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field

from deepsynth.inference.interface import Answer
from deepsynth.inference.prepare import PreparedDocument
from deepsynth.inference.interface import Engine
from deepsynth.models.generate import GenerationSettings

logger = logging.getLogger(__name__)


class QueueFull(Exception):
    """The queue holds `max_queue` requests; retry after `retry_after` seconds."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


class AllCancelled(threading.Event):
    """Set while every job of a batch is cancelled: what the engine's cancel check reads.

    The engine stops a whole `generate` call at once, so a batch stops only when nobody is left
    waiting for any of its answers.
    """

    def __init__(self, jobs: list["Job"]) -> None:
        super().__init__()
        self.jobs = jobs

    def is_set(self) -> bool:
        return super().is_set() or all(job.cancel.is_set() for job in self.jobs)


def _settle(job: "Job", answer: Answer | None = None, exc: BaseException | None = None) -> None:
    """Resolve a job's future unless its waiter already cancelled it (then nobody reads the result)."""
    try:
        if exc is not None:
            job.future.set_exception(exc)
        else:
            job.future.set_result(answer)
    except InvalidStateError:
        pass  # cancelled by the waiter (timeout, client gone) while the model was running


@dataclass
class Job:
    """One request waiting for the model."""

    doc: PreparedDocument
    instruction: str
    settings: GenerationSettings
    future: Future = field(default_factory=Future)
    on_piece: Callable[[str], None] | None = None  # set for streaming jobs
    cancel: threading.Event = field(default_factory=threading.Event)
    enqueued: float = field(default_factory=time.perf_counter)
    batch_size: int = 0
    json_schema: dict | None = None  # structured output: the answer must validate against it

    def joins(self, other: "Job") -> bool:
        """Whether this job may share `other`'s generate call (same settings and schema)."""
        return self.on_piece is None and self.settings == other.settings and self.json_schema == other.json_schema


class MicroBatcher:
    """workers: batches in flight at once (default: the engine's `concurrency`, else 1)."""

    def __init__(self, engine: Engine, max_batch_size: int = 8, max_wait_ms: float = 10.0,
                 max_queue: int = 64, on_batch: Callable[[int, float], None] | None = None,
                 workers: int | None = None) -> None:
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000
        self.max_queue = max_queue
        self.on_batch = on_batch
        self.workers = workers or getattr(engine, "concurrency", 1)
        if self.workers < 1:
            raise ValueError(f"workers must be >= 1, got {self.workers}")
        self._queue: deque[Job] = deque()
        self._cond = threading.Condition()
        self._running = False
        self._threads: list[threading.Thread] = []
        self._batch_seconds = 0.5  # running mean of one batch's time, for Retry-After
        self._active = 0  # batches the engine is running now

    # ------------------------------------------------------------------ control

    @property
    def busy(self) -> bool:
        return self._active > 0

    def start(self) -> None:
        with self._cond:
            if any(t.is_alive() for t in self._threads):
                return
            self._running = True
            self._threads = [threading.Thread(target=self._loop, name=f"deepsynth-batcher-{i}", daemon=True)
                             for i in range(self.workers)]
            for thread in self._threads:
                thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._running = False
            pending = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in pending:
            job.cancel.set()
            if not job.future.done():
                _settle(job, exc=RuntimeError("the server is shutting down"))
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))

    @property
    def depth(self) -> int:
        return len(self._queue)

    def retry_after(self) -> int:
        batches_ahead = math.ceil((len(self._queue) + 1) / (self.max_batch_size * self.workers))
        return max(1, math.ceil(batches_ahead * self._batch_seconds))

    def submit(self, job: Job) -> Job:
        with self._cond:
            if not self._running:
                raise RuntimeError("the batcher is not running")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(self.retry_after())
            self._queue.append(job)
            self._cond.notify()
        return job

    # ------------------------------------------------------------------ worker

    def _take_batch(self) -> list[Job] | None:
        with self._cond:
            while self._running and not self._queue:
                self._cond.wait()
            if not self._running:
                return None
            first = self._queue.popleft()
            batch = [first]
            deadline = time.perf_counter() + self.max_wait
            while first.on_piece is None and len(batch) < self.max_batch_size:  # streams run alone
                for job in list(self._queue):
                    if job.joins(first):
                        self._queue.remove(job)
                        batch.append(job)
                        if len(batch) == self.max_batch_size:
                            break
                remaining = deadline - time.perf_counter()
                if len(batch) == self.max_batch_size or remaining <= 0 or not self._running:
                    break
                self._cond.wait(remaining)
            if self._queue:
                # a request that arrived while this batch formed may have woken this worker rather
                # than an idle one: pass the wake-up on, so it need not wait for a batch to end
                self._cond.notify()
            return batch

    def _loop(self) -> None:
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            for j in batch:
                if j.cancel.is_set() and not j.future.done():
                    j.future.cancel()
            batch = [j for j in batch if not j.future.done()]
            if not batch:
                continue
            for job in batch:
                job.batch_size = len(batch)
            with self._cond:
                self._active += 1
            start = time.perf_counter()
            try:
                if batch[0].on_piece is not None:
                    self._run_stream(batch[0])
                else:
                    self._run_batch(batch)
            except BaseException as exc:  # never let the worker die
                for job in batch:
                    if not job.future.done():
                        _settle(job, exc=exc)
            finally:
                with self._cond:
                    self._active -= 1
            seconds = time.perf_counter() - start
            self._batch_seconds = 0.8 * self._batch_seconds + 0.2 * seconds
            if self.on_batch is not None:
                self.on_batch(len(batch), seconds)

    def _run_batch(self, batch: list[Job]) -> None:
        try:
            answers = self.engine.ask_batch([j.doc for j in batch], [j.instruction for j in batch], batch[0].settings,
                                            cancel=AllCancelled(batch), json_schema=batch[0].json_schema)
        except Exception as exc:
            if len(batch) == 1:
                raise
            # Which request broke the batch is unknown (a bad page, a prompt too long, a bug): answer
            # each alone, so only the requests that fail on their own get an error.
            logger.warning("a batch of %d failed (%s: %s); answering its requests one by one", len(batch),
                           type(exc).__name__, exc)
            for job in batch:
                if job.cancel.is_set():
                    job.future.cancel()
                    continue
                try:
                    answer = self.engine.ask_batch([job.doc], [job.instruction], job.settings, cancel=job.cancel,
                                                   json_schema=job.json_schema)[0]
                except Exception as job_exc:
                    _settle(job, exc=job_exc)
                else:
                    _settle(job, answer)
            return
        for job, answer in zip(batch, answers):
            _settle(job, answer)

    def _run_stream(self, job: Job) -> None:
        answer: Answer | None = None
        for piece in self.engine.stream(job.doc, job.instruction, job.settings, cancel=job.cancel,
                                        json_schema=job.json_schema):
            if isinstance(piece, Answer):
                answer = piece
            else:
                job.on_piece(piece)
        _settle(job, answer)
