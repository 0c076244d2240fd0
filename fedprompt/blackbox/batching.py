"""Dynamic batching: requests that arrive together share forward passes.

Handlers put jobs on a thread-safe queue and await a future; one worker thread owns the model. When it
takes a job it keeps collecting for ``wait_ms`` (or until ``max_texts`` texts are gathered), then merges
classify jobs that share their labels into one :meth:`ScoringEngine.classify_group` call and completion
jobs into one :meth:`ScoringEngine.complete_group` call. While the model is busy, new requests pile up
and are merged into the next call without waiting at all.

A caller that gives up (its time limit, its client gone) calls :meth:`JobFuture.stop`: a queued job is then
skipped, and a running one stops at the engine's next batch boundary (once every job merged with it has
stopped too). :meth:`DynamicBatcher.close` stops everything the same way, so shutdown waits for one batch at
most, never for the queue.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Sequence

from fedprompt.blackbox.engine import CompletionJob, ScoringEngine, Stopped
from fedprompt.blackbox.errors import Overloaded, ShuttingDown

log = logging.getLogger(__name__)


class JobFuture(Future):
    """A Future whose caller can also stop the work: ``cancel()`` only drops a job not yet started."""

    def __init__(self) -> None:
        super().__init__()
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()
        self.cancel()

    def stop_requested(self) -> bool:
        return self._stop.is_set()


@dataclass
class _Job:
    kind: str            # "classify" | "complete"
    key: Any             # classify: the labels tuple; jobs with equal keys are merged
    payload: Any         # classify: list of texts; complete: CompletionJob
    size: int
    future: JobFuture = field(default_factory=JobFuture)


class DynamicBatcher:
    def __init__(self, engine: ScoringEngine, max_texts: int = 256, wait_ms: float = 5.0, max_queue: int = 4096) -> None:
        self.engine, self.max_texts, self.wait_s, self.max_queue = engine, max_texts, wait_ms / 1000.0, max_queue
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._closing = threading.Event()
        self.merged_calls = 0
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._run, name="fedprompt-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit_classify(self, texts: list[str], labels: tuple[str, ...]) -> JobFuture:
        return self._submit(_Job("classify", labels, texts, len(texts)))

    def submit_complete(self, job: CompletionJob) -> JobFuture:
        queued = _Job("complete", None, job, len(job.prompts) * max(job.max_tokens, 1))
        job.stopped = lambda: self._stopped(queued)
        return self._submit(queued)

    def _stopped(self, job: _Job) -> bool:
        return job.future.stop_requested() or self._closing.is_set()

    def _submit(self, job: _Job) -> JobFuture:
        if self._closing.is_set():
            raise ShuttingDown("the server is shutting down; retry against its restart", retry_after=5.0)
        with self._lock:
            if self._pending and self._pending + job.size > self.max_queue:
                raise Overloaded(f"server busy: {self._pending} texts are waiting (limit {self.max_queue}, "
                                 "service.limits.max_queue); retry shortly", retry_after=1.0)
            self._pending += job.size
        self._queue.put(job)
        return job.future

    def begin_close(self) -> None:
        """Stop taking work: queued jobs are answered ShuttingDown, a running one stops at its next batch
        boundary. Returns at once (safe to call from the event loop and more than once)."""
        if not self._closing.is_set():
            self._closing.set()
            self._queue.put(None)

    def close(self, timeout_s: float = 10.0) -> bool:
        """:meth:`begin_close`, then wait for the worker. True when it has exited (it is then safe to end the
        process: no thread is inside torch, which would abort the interpreter's exit)."""
        self.begin_close()
        self._thread.join(timeout=timeout_s)
        if self._thread.is_alive():
            log.warning("the model worker did not stop within %.0f s (one forward pass takes longer)", timeout_s)
        return not self._thread.is_alive()

    def _collect(self, first: _Job) -> list[_Job]:
        jobs, size = [first], first.size
        deadline = time.monotonic() + self.wait_s
        while size < self.max_texts:
            try:
                job = self._queue.get(timeout=max(deadline - time.monotonic(), 0)) if self.wait_s else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._queue.put(None)  # keep the shutdown signal for the main loop
                break
            jobs.append(job)
            size += job.size
        return jobs

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is None:
                return
            jobs = [j for j in self._collect(first) if self._start(j)]
            groups: dict[tuple, list[_Job]] = {}
            for job in jobs:
                groups.setdefault((job.kind, job.key), []).append(job)
            for (kind, key), group in groups.items():
                self._run_group(kind, key, group)
            self.merged_calls += 1

    def _start(self, job: _Job) -> bool:
        """False for a job whose caller gave up (timed out) before the model got to it, or when closing."""
        if not job.future.set_running_or_notify_cancel():
            self._done(job)
            return False
        if self._closing.is_set():
            self._finish(job, None)
            return False
        return True

    def _done(self, job: _Job) -> None:
        with self._lock:
            self._pending -= job.size
        self.jobs_done += 1

    def _run_group(self, kind: str, key: Any, group: list[_Job]) -> None:
        results: Sequence[object]  # one per job: its scores (classify) or completions, None once stopped
        try:
            if kind == "classify":
                # merged jobs share forward passes: the work stops only once none of them wants it
                everyone_stopped = lambda: all(self._stopped(j) for j in group)  # noqa: E731
                results = self.engine.classify_group(key, [j.payload for j in group], everyone_stopped)
            else:
                results = self.engine.complete_group([j.payload for j in group])
        except Stopped:
            results = [None] * len(group)
        except Exception:
            if len(group) > 1:  # isolate the job that fails so the others still get their answers
                for job in group:
                    self._run_group(kind, key, [job])
                return
            log.exception("black-box job failed")
            self._done(group[0])
            group[0].future.set_exception(RuntimeError("the model failed on this request; see the server log"))
            return
        for job, result in zip(group, results):
            self._finish(job, result)

    def _finish(self, job: _Job, result: Any) -> None:
        self._done(job)
        if self._closing.is_set():  # the caller may still wait: tell it why there is no answer
            job.future.set_exception(ShuttingDown("the server is shutting down; retry against its restart",
                                                  retry_after=5.0))
        elif job.future.stop_requested():  # the caller has gone: a partial answer must not look complete
            job.future.set_exception(Stopped())
        else:
            job.future.set_result(result)
