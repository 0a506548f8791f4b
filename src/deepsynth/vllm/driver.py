"""The one thread that feeds a vLLM `LLM` every request of every caller, so vLLM batches them.

`vllm.LLM.generate` answers one caller's list of prompts and returns when all are done; a server
has many callers at once (the batcher, streams, `ask_batch`), each waiting for its own answers,
some streaming, some cancelled. `Driver` owns the `LLM`: callers hand it `Request`s; its thread
renders each prompt with vLLM's public renderer (`LLM.renderer.render_cmpl`, what `generate` does
to a prompt dict), adds it to the `LLM`'s engine (`LLM.llm_engine.add_request`), steps the engine
and routes each output to its request's queue, and aborts the requests whose caller cancelled.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)


@dataclass
class Request:
    """One request in flight: what to add to vLLM, and where its outputs go."""

    # The prompt as `LLM.generate` takes it: {"prompt" or "prompt_token_ids", "multi_modal_data"}.
    prompt: dict
    # Its `vllm.SamplingParams` (one object per request: vLLM owns it once added).
    params: object
    # Its `vllm.lora.request.LoRARequest`, or None.
    lora: object
    # Set by the caller to stop the request (its queue then gets "cancelled").
    cancel: threading.Event | None
    # ("output", RequestOutput) per step; the last has `finished` set, or ("cancelled", last output)
    # / ("error", exception) ends it.
    outputs: queue.Queue = field(default_factory=queue.Queue)
    # The id vLLM knows it by, once added.
    request_id: str | None = None


class Driver:
    """The one thread that talks to the vLLM engine: adds requests, steps, routes outputs.

    Every output of a request is put on its queue (cumulative: text and ids so far); the last one
    has `finished` set, or the queue gets ("cancelled", last output) / ("error", exception).
    """

    def __init__(self, llm) -> None:
        self.llm = llm
        self.engine = llm.llm_engine
        self.inbox: queue.Queue = queue.Queue()
        self.live: dict[str, tuple[Request, object]] = {}
        self.ids = itertools.count()
        self.stopping = False
        self.thread = threading.Thread(target=self._loop, name="deepsynth-vllm", daemon=True)
        self.thread.start()

    def submit(self, requests: Sequence[Request]) -> None:
        if self.stopping:
            raise RuntimeError("the vLLM engine is closed")
        self.inbox.put(list(requests))

    def close(self) -> None:
        self.stopping = True
        self.inbox.put(None)
        self.thread.join(timeout=60)

    def _add(self, request: Request) -> None:
        # The rendering `LLM.generate` applies to a prompt dict (tokenizing, the processor's image
        # expansion); the engine takes its output, and takes raw prompts only with a deprecation warning.
        (rendered,) = self.llm.renderer.render_cmpl([request.prompt])
        # Outputs and aborts name a request by the id given here (vLLM adds a suffix internally).
        rid = f"deepsynth-{next(self.ids)}"
        self.engine.add_request(rid, rendered, request.params, lora_request=request.lora)
        request.request_id = rid
        self.live[rid] = (request, None)

    def _loop(self) -> None:
        while True:
            idle = not self.live
            try:
                batch = self.inbox.get(block=idle, timeout=None)
            except queue.Empty:
                batch = []
            batches = [batch]
            while True:
                try:
                    batches.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            if any(b is None for b in batches):
                self._abort_all(RuntimeError("the vLLM engine was closed"))
                return
            for requests in batches:
                for request in requests:
                    try:
                        self._add(request)
                    except Exception as exc:  # the request's caller re-raises it
                        request.outputs.put(("error", exc))
            self._cancel_requested()
            if not self.live:
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # the engine failed: every caller waiting gets the error
                logger.exception("vLLM engine step failed")
                self._abort_all(exc)
                continue
            for out in outputs:
                entry = self.live.get(out.request_id)
                if entry is None:
                    continue
                request = entry[0]
                self.live[out.request_id] = (request, out)
                request.outputs.put(("output", out))
                if out.finished:
                    del self.live[out.request_id]

    def _cancel_requested(self) -> None:
        cancelled = [rid for rid, (req, _) in self.live.items() if req.cancel is not None and req.cancel.is_set()]
        if cancelled:
            self.engine.abort_request(cancelled)
            for rid in cancelled:
                request, last = self.live.pop(rid)
                request.outputs.put(("cancelled", last))

    def _abort_all(self, exc: BaseException) -> None:
        if self.live:
            try:
                self.engine.abort_request(list(self.live))
            except Exception:  # the engine may be the thing that failed; the callers still get `exc`
                logger.exception("aborting vLLM requests failed")
        for request, _ in self.live.values():
            request.outputs.put(("error", exc))
        self.live.clear()


def raise_if_failed(out) -> None:
    """Raise when vLLM finished a request it did not answer (finish reason "error" or "abort" that
    no caller asked for: a grammar that failed to compile, a KV-cache failure), rather than letting
    its empty output pass for an answer."""
    reason = out.outputs[0].finish_reason if out.outputs else "error"
    if reason in ("error", "abort"):
        raise RuntimeError(f"vLLM ended request {out.request_id} with finish reason {reason!r} "
                           "(the vLLM engine's log says why)")


def wait(request: Request) -> tuple[object, bool]:
    """(final output, cancelled) of a request; re-raises its error."""
    last = None
    while True:
        kind, value = request.outputs.get()
        if kind == "error":
            raise value
        if kind == "cancelled":
            return value if value is not None else last, True
        last = value
        if value.finished:
            raise_if_failed(value)
            return value, False
