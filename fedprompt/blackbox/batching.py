"""Dynamic batching: requests that arrive together share forward passes.

Handlers put jobs on a thread-safe queue and await a future; one worker thread owns the model. When it
takes a job it keeps collecting for ``wait_ms`` (or until ``max_texts`` texts are gathered), then merges
classify jobs that share their labels into one :meth:`ScoringEngine.classify_group` call and completion
jobs into one :meth:`ScoringEngine.complete_group` call. While the model is busy, new requests pile up
and are merged into the next call without waiting at all.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from fedprompt.blackbox.engine import CompletionJob, ScoringEngine
from fedprompt.blackbox.errors import Overloaded

log = logging.getLogger(__name__)


@dataclass
class _Job:
    kind: str            # "classify" | "complete"
    key: Any             # classify: the labels tuple; jobs with equal keys are merged
    payload: Any         # classify: list of texts; complete: CompletionJob
    size: int
    future: Future = field(default_factory=Future)


class DynamicBatcher:
    def __init__(self, engine: ScoringEngine, max_texts: int = 256, wait_ms: float = 5.0, max_queue: int = 4096) -> None:
        self.engine, self.max_texts, self.wait_s, self.max_queue = engine, max_texts, wait_ms / 1000.0, max_queue
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self.merged_calls = 0
        self.jobs_done = 0
        self._thread = threading.Thread(target=self._run, name="fedprompt-batcher", daemon=True)
        self._thread.start()

    @property
    def pending(self) -> int:
        return self._pending

    def submit_classify(self, texts: list[str], labels: tuple[str, ...]) -> Future:
        return self._submit(_Job("classify", labels, texts, len(texts)))

    def submit_complete(self, job: CompletionJob) -> Future:
        return self._submit(_Job("complete", None, job, len(job.prompts) * max(job.max_tokens, 1)))

    def _submit(self, job: _Job) -> Future:
        with self._lock:
            if self._pending and self._pending + job.size > self.max_queue:
                raise Overloaded(f"server busy: {self._pending} texts are waiting (limit {self.max_queue}, "
                                 "service.limits.max_queue); retry shortly", retry_after=1.0)
            self._pending += job.size
        self._queue.put(job)
        return job.future

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

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
        """False for a job whose caller gave up (timed out) before the model got to it."""
        if job.future.set_running_or_notify_cancel():
            return True
        self._done(job)
        return False

    def _done(self, job: _Job) -> None:
        with self._lock:
            self._pending -= job.size
        self.jobs_done += 1

    def _run_group(self, kind: str, key: Any, group: list[_Job]) -> None:
        try:
            if kind == "classify":
                results = self.engine.classify_group(key, [j.payload for j in group])
            else:
                results = self.engine.complete_group([j.payload for j in group])
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
            self._done(job)
            job.future.set_result(result)
