"""HF's continuous-batching manager API on our engine: what `init_continuous_batching`, HF's `generate_batch` and
`transformers serve --continuous-batching` call, with HF's types (`GenerationOutput`, `RequestStatus`).

One background thread owns the engine (engine.py): between two steps it takes the requests and cancellations the
callers queued, then runs a step and delivers what it produced — every new token of a streaming request, the last
output of every request — to the request's registered handler (on its asyncio loop, as HF does) or to the shared
output queue that `get_result` and iteration read. A request that cannot run (an empty prompt, more tokens than
the model's positions or the whole pool, settings the engine does not implement) gets a FAILED output with the
reason and harms no other; a step that raises fails the requests in flight, and the loop goes on with a fresh
engine.
"""

import asyncio
import contextlib
import gc
import logging
import queue
import threading
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from transformers import GenerationConfig
from transformers.generation.continuous_batching import RequestStatus
from transformers.generation.continuous_batching.requests import GenerationOutput

from .. import compat
from .engine import Engine
from .scheduler import Sequence, Status

logger = logging.getLogger(__name__)

BLOCK_SIZE = 16  # token slots per KV block (vLLM's default); HF's page_size x num_blocks sets the pool's tokens
# Tokens one step computes at most. On the CPU a step of 256 tokens already takes ~50 ms for the tiny models;
# on a GPU 2048 (vLLM's chunked-prefill default) keeps prompt chunks from stalling decodes. Not yet measured here.
MAX_BATCH_TOKENS = {"cpu": 256, "cuda": 2048}
MAX_BATCH_SIZE = 128  # sequences running at once (the 64-user target with room for arrivals)
KV_MEMORY_FRACTION = 0.8  # of the free device memory, HF's own default when logits are processed
IDLE_WAIT_S = 0.1  # how long the loop sleeps when it has nothing to run, unless a request wakes it
QUEUE_WAIT_S = 10.0  # how long add_request waits for room in a bounded queue (HF's put timeout)


@dataclass
class _Request:
    """A request as the manager tracks it beside the engine's Sequence."""

    request_id: str
    prompt: list[int]
    max_new_tokens: int
    eos_ids: list[int]
    streaming: bool
    record_timestamps: bool
    created: float = field(default_factory=time.perf_counter)
    started: float = -1.0
    timestamps: list[float] = field(default_factory=list)
    sequence: Sequence | None = None

    def output(self, status: RequestStatus, error: str | None = None) -> GenerationOutput:
        generated = list(self.sequence.generated) if self.sequence is not None else []
        finished = time.perf_counter() if status >= RequestStatus.FINISHED else -1.0
        return GenerationOutput(request_id=self.request_id, prompt_ids=list(self.prompt), generated_tokens=generated,
                                error=error, status=status, created_time=self.created,
                                lifespan=(self.started, finished),
                                timestamps=list(self.timestamps) if self.record_timestamps else None)


@dataclass
class _Hold:
    """What the loop holds pauses off for (see BatchingManager._unpaused)."""

    engine: Engine | None
    drained: list[Sequence] = field(default_factory=list)


class ThreadStatus:
    """What `transformers serve` reads to know whether the worker lives (`fatal_error`, HF's attribute name)."""

    def __init__(self) -> None:
        self.fatal_error: Exception | None = None


def sampling_settings(config: GenerationConfig) -> dict[str, Any]:
    """The engine's sampling settings from a generation config (HF's defaults where it sets none)."""
    if not config.do_sample:
        return dict(do_sample=False)
    settings = dict(do_sample=True, temperature=float(config.temperature if config.temperature is not None else 1.0),
                    top_k=int(config.top_k or 0), top_p=float(config.top_p if config.top_p is not None else 1.0))
    if settings["temperature"] <= 0 or settings["top_k"] < 0 or not 0 < settings["top_p"] <= 1:
        raise ValueError(f"invalid sampling settings {settings}: need temperature > 0, top_k >= 0 (0 = off) and "
                         "0 < top_p <= 1")
    return settings


def drain(q: queue.Queue) -> list:
    """Everything in the queue now, in order, without waiting."""
    items = []
    while True:
        try:
            items.append(q.get_nowait())
        except queue.Empty:
            return items


def eos_list(eos: int | list[int] | None) -> list[int]:
    """HF's convention: None or negative ids mean no stop token."""
    eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return [int(e) for e in eos if e >= 0]


class BatchingManager:
    """Continuous batching on an optimized model's kernels behind HF's `ContinuousBatchingManager` methods.

    Build it with `model.init_continuous_batching(generation_config, continuous_batching_config)` on a model
    `qwen3_accel.optimize` returned. From HF's `ContinuousBatchingConfig` it reads the pool (`num_blocks` x
    `page_size` tokens, else `max_memory_percent` of the free device memory), `max_batch_tokens` and
    `max_requests_per_batch`; our blocks hold BLOCK_SIZE tokens whatever the page size.
    """

    def __init__(self, model: torch.nn.Module, generation_config: GenerationConfig, cb_config: Any = None,
                 workload_hints: Any = None, on_stop: Callable[["BatchingManager", bool], None] | None = None):
        self.model = model
        self.generation_config = generation_config
        self.sampling = sampling_settings(generation_config)
        device = model.lm_head.weight.device.type
        cb = cb_config
        pool_tokens = None
        if cb is not None and getattr(cb, "num_blocks", None):
            pool_tokens = cb.num_blocks * getattr(cb, compat.CB_PAGE_FIELD)
        self.engine_options = dict(
            num_blocks=-(-pool_tokens // BLOCK_SIZE) if pool_tokens else None,  # None: sized by free memory, once
            block_size=BLOCK_SIZE,
            max_batch_tokens=(getattr(cb, "max_batch_tokens", None) or MAX_BATCH_TOKENS.get(device, 256)),
            max_batch_size=(getattr(cb, "max_requests_per_batch", None)
                            or min(MAX_BATCH_SIZE, getattr(workload_hints, "num_requests", None) or MAX_BATCH_SIZE)),
            kv_memory_fraction=(getattr(cb, "max_memory_percent", None) or KV_MEMORY_FRACTION),
        )
        self.max_queue_size = getattr(cb, "max_queue_size", 0) or 0
        # The longest sequence the caller expects (HF's WorkloadHints, as generate_batch passes them): the warm-up
        # compiles the decode graphs of every table width up to it.
        self.expected_tokens = ((getattr(workload_hints, "max_prompt_length", 0) or 0)
                                + (getattr(workload_hints, "max_generated_length", 0) or 0))
        self.engine: Engine | None = None
        self.background_thread_status = ThreadStatus()
        self.warmed_up = False
        self._on_stop = on_stop
        # Adds and cancels in the order they were made (a cancel right after its add must find it).
        self._events: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=self.max_queue_size)
        self._wake = threading.Event()
        # Guards what decides whether a request is accepted: the stop mode, the ids in flight, and the loop's exit.
        self._submit_lock = threading.Lock()
        self._stop_mode: str | None = None  # "flush" (finish what was asked) or "hard" (fail it)
        self._live_ids: set[str] = set()  # added and not finished yet
        self._release_engine = False  # the loop drops the engine (its KV pool) when it ends
        self._thread: threading.Thread | None = None
        self._pause = threading.Condition()  # pause(): the loop waits between two steps while any is held
        self._pauses, self._stepping = 0, False
        self._paused_here = threading.local()
        self._next_id = 0
        self._requests: dict[str, _Request] = {}  # queued or running, owned by the loop thread
        self.output_queue: queue.Queue[GenerationOutput] = queue.Queue()
        self._handlers: dict[str, tuple[Callable, asyncio.AbstractEventLoop]] = {}
        self._handlers_lock = threading.Lock()

    # ------------------------------------------------------------------------------------ control
    def _ensure_engine(self) -> Engine:
        if self.engine is None:
            self.engine = Engine(self.model, **self.engine_options)
            # Later engines of this manager (a restart, a recovery) get the same pool: sized by free memory again
            # they would find less, the old pool still in the allocator's cache.
            self.engine_options["num_blocks"] = len(self.engine.block_manager.blocks)
        return self.engine

    def _drop_engine(self) -> None:
        """Release the engine and its KV pool back to the device (HF's stop empties the cache too)."""
        self.engine = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def warmup(self) -> None:
        """Build the engine (its KV pool). The loop compiles its decode graphs (every row bucket, every table width
        up to the workload hints' longest sequence) and runs one token through it when it starts, before any
        request, in its own thread (where the graphs will replay): no request waits for a compilation."""
        self._ensure_engine()
        self.warmed_up = True

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if self.is_running():
            logger.warning("qwen3_accel: the continuous-batching manager is running already")
            return
        self._ensure_engine()
        with self._submit_lock:
            self._stop_mode, self._release_engine = None, False
        self.background_thread_status = ThreadStatus()
        self._thread = threading.Thread(target=self._loop, name="qwen3_accel-batching", daemon=True)
        self._thread.start()

    def stop(self, block: bool = True, timeout: float | None = None, keep_for_next_session: bool = False,
             hard_stop: bool = False) -> None:
        """Stop the loop: by default once the requests asked so far are answered; `hard_stop` fails them instead.
        Requests added after this call are refused. Without `keep_for_next_session` the KV pool is released."""
        if getattr(self._paused_here, "depth", 0):
            raise RuntimeError("Cannot stop the manager from inside a pause: the loop waits for the pause to end. "
                               "Leave the `pause` context before calling `stop`.")
        self._release_engine = not keep_for_next_session
        if self._thread is None:
            logger.warning("qwen3_accel: the continuous-batching manager is not running")
            if self._release_engine:
                self._drop_engine()
        else:
            with self._submit_lock:
                self._stop_mode = "hard" if hard_stop else "flush"
            self._wake.set()
            if block:
                self.join(timeout=timeout)
            if not self.is_running() and self._release_engine and self.engine is not None:
                self._drop_engine()  # (a loop that had died already did not)
        if self._on_stop is not None:
            self._on_stop(self, keep_for_next_session)

    def join(self, stop_trigger_time: float | None = None, timeout: float | None = None) -> None:
        """Wait for the loop to end, at most `timeout` s (HF's signature; the trigger time is not used)."""
        if self._thread is None:
            return
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("qwen3_accel: the continuous-batching loop did not stop within %s s", timeout)
        else:
            self._thread = None

    def destroy(self) -> None:
        if self.is_running():
            self.stop(block=True)
        self._drop_engine()

    @contextlib.contextmanager
    def pause(self):
        """Hold the loop between two steps (to change the model in place); requests and cache are kept. Several
        threads may hold it at once; the loop resumes when the last one leaves."""
        if not self.is_running():
            raise RuntimeError("Cannot pause generation while no generation loop is running.")
        with self._pause:
            self._pauses += 1
            while self._stepping:
                self._pause.wait()
        self._paused_here.depth = getattr(self._paused_here, "depth", 0) + 1
        try:
            yield
        finally:
            self._paused_here.depth -= 1
            with self._pause:
                self._pauses -= 1
                self._pause.notify_all()

    # ----------------------------------------------------------------------------------- requests
    def add_request(self, input_ids: list[int], request_id: str | None = None, max_new_tokens: int | None = None,
                    streaming: bool = False, record_timestamps: bool = False,
                    eos_token_id: int | list[int] | None = None, **logit_processor_kwargs: Any) -> str | None:
        """Queue one request (HF's signature); its outputs arrive by `get_result`, iteration or a handler. A
        request that cannot run gets a FAILED output with the reason; a stopping manager refuses it (None)."""
        if isinstance(input_ids, torch.Tensor):
            input_ids = input_ids.reshape(-1).tolist()
        config = self.generation_config
        max_new_tokens = config.max_new_tokens if max_new_tokens is None else max_new_tokens
        if max_new_tokens is None:  # HF: no limit; here, until eos or the model's positions run out
            max_new_tokens = max(1, self.model.config.max_position_embeddings - len(input_ids))
        eos = config.eos_token_id if eos_token_id is None else eos_token_id
        deadline, auto_id = time.monotonic() + QUEUE_WAIT_S, request_id is None
        while True:
            with self._submit_lock:
                if self._stop_mode is not None:
                    logger.warning("qwen3_accel: the manager is stopping; request %s is refused", request_id)
                    return None
                if auto_id and request_id is None:
                    while f"req_{self._next_id}" in self._live_ids:  # an explicit id may look like ours
                        self._next_id += 1
                    request_id = f"req_{self._next_id}"
                    self._next_id += 1
                elif not auto_id and request_id in self._live_ids:
                    raise ValueError(f"request {request_id!r} is already queued or running: ids must be unique")
                request = _Request(request_id, [int(t) for t in input_ids], int(max_new_tokens), eos_list(eos),
                                   streaming, record_timestamps)
                if logit_processor_kwargs:
                    break
                try:  # never wait for room under the lock: the loop takes it to finish requests
                    self._events.put_nowait(("add", request))
                    self._live_ids.add(request_id)
                    break
                except queue.Full:
                    pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the request queue is full ({self.max_queue_size} requests waiting)")
            time.sleep(0.01)
        if logit_processor_kwargs:
            self._deliver(request.output(RequestStatus.FAILED, (
                f"per-request logits-processor settings {sorted(logit_processor_kwargs)} are not supported by "
                "qwen3_accel's engine (give them in the manager's generation config)")))
            return request_id
        self._wake.set()
        return request_id

    def add_requests(self, inputs: list[list[int]], max_new_tokens: int | None = None, streaming: bool = False,
                     record_timestamps: bool = False, **logit_processor_kwargs: Any) -> list[str]:
        """`add_request` for each prompt, in order; the eos ids of the generation config, else the model's."""
        eos = self.generation_config.eos_token_id
        eos = self.model.config.eos_token_id if eos is None else eos
        return [self.add_request(ids, max_new_tokens=max_new_tokens, streaming=streaming,
                                 record_timestamps=record_timestamps, eos_token_id=-1 if eos is None else eos,
                                 **logit_processor_kwargs) for ids in inputs]

    def cancel_request(self, request_id: str) -> None:
        """Stop a request (a client that went away): its blocks go back to the pool at the next step and its last
        output is FAILED with error "cancelled" (HF's manager sends none). An unknown or finished id is a no-op."""
        self._events.put(("cancel", request_id), block=True, timeout=10)
        self._wake.set()

    def get_result(self, request_id: str | None = None, timeout: float | None = None) -> GenerationOutput | None:
        """The next output (of `request_id`, if given; others are put back), or None after `timeout` s or when the
        loop has ended with nothing left."""
        if self.output_queue.empty() and not self.is_running():
            return None
        try:
            result = self.output_queue.get(block=True, timeout=timeout)
        except queue.Empty:
            return None
        if request_id is not None and result.request_id != request_id:
            self.output_queue.put(result)
            return None
        return result

    def __iter__(self) -> Iterator[GenerationOutput]:
        while self.is_running() or not self.output_queue.empty():
            result = self.get_result(timeout=IDLE_WAIT_S)
            if result is not None:
                yield result

    def request_id_iter(self, request_id: str) -> Iterator[GenerationOutput]:
        """This request's outputs as they come, until its last one; once the loop has ended, what is left of them
        in the queue (one pass: the others' outputs stay queued)."""
        while self.is_running():
            result = self.get_result(request_id=request_id, timeout=IDLE_WAIT_S)
            if result is not None:
                yield result
                if result.is_finished():
                    return
        for result in self._take_queued(request_id):
            yield result

    def _take_queued(self, request_id: str) -> list[GenerationOutput]:
        """This request's outputs waiting in the shared queue, in order; the others are put back in theirs."""
        mine, others = [], []
        for output in drain(self.output_queue):
            (mine if output.request_id == request_id else others).append(output)
        for output in others:
            self.output_queue.put(output)
        return mine

    def register_result_handler(self, request_id: str, callback: Callable[[GenerationOutput], Any]) -> None:
        """Deliver this request's outputs to `callback` on the caller's running asyncio loop (HF's contract:
        every token when streaming, else the last output); dropped once the request finishes. Outputs made
        before the registration (`transformers serve` registers after adding a streaming request) come first."""
        loop = asyncio.get_running_loop()

        def deliver_and_clean_up(output: GenerationOutput) -> None:
            callback(output)
            if output.is_finished():
                with self._handlers_lock:  # only this registration's: the id may have been reused since
                    if self._handlers.get(request_id, (None,))[0] is deliver_and_clean_up:
                        del self._handlers[request_id]

        with self._handlers_lock:
            for output in self._take_queued(request_id):
                loop.call_soon(deliver_and_clean_up, output)
            self._handlers[request_id] = (deliver_and_clean_up, loop)

    def _deliver(self, output: GenerationOutput) -> None:
        """To the request's handler, else the shared queue (under the handlers' lock, so that a registration
        that takes the queued outputs never misses one put in between)."""
        with self._handlers_lock:
            handler = self._handlers.get(output.request_id)
            if handler is None:
                self.output_queue.put(output)
                return
        callback, loop = handler
        try:
            loop.call_soon_threadsafe(callback, output)
        except RuntimeError:  # the caller's loop has closed: nobody is listening any more
            with self._handlers_lock:
                self._handlers.pop(output.request_id, None)

    def _finish(self, request: _Request, status: RequestStatus, error: str | None = None) -> None:
        """A request's last output; its id may be used again (from the moment the output is delivered)."""
        with self._submit_lock:
            self._live_ids.discard(request.request_id)
        self._deliver(request.output(status, error))

    # --------------------------------------------------------------------------------------- loop
    def _loop(self) -> None:
        device = self.model.lm_head.weight.device
        if device.type == "cuda":
            torch.cuda.set_device(device)
        try:
            engine = self.engine
            with self._unpaused():  # before any request; pause() waits for it
                engine.warm_up(self.expected_tokens)
            while True:
                self._take_events()
                with self._submit_lock:  # no request can be accepted between this check and the exit
                    if self._stop_mode == "hard" or (self._stop_mode == "flush" and not self._requests
                                                     and self._events.empty()):
                        break
                if not engine.has_work():
                    self._wake.wait(IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                failure = None
                with self._unpaused(engine) as hold:
                    try:
                        stepped = engine.step()
                    except Exception as error:  # a bug of ours: fail what was in flight, keep serving
                        # The traceback as text: a log record holding the exception would hold the old pool too.
                        logger.error("qwen3_accel: a continuous-batching step failed\n%s", traceback.format_exc())
                        failure = repr(error)
                        hold.engine = None  # a failed step's engine is not read again (dropped below)
                    else:
                        self._publish(stepped)  # (before a pause's drain adds the next tokens: one at a time)
                if failure is not None:  # (outside the except clause: its traceback holds the old pool)
                    self._fail_all(f"the step failed: {failure}", events=False)
                    engine = None
                    self._drop_engine()
                    engine = self._ensure_engine()
                    continue
                if hold.drained:
                    self._publish(hold.drained)
            self._fail_all("the manager stopped before this request finished")
            engine.drain()  # nothing left on the device for a kept engine's next session
        except Exception as error:
            logger.exception("qwen3_accel: the continuous-batching loop died")
            with self._submit_lock:
                self._stop_mode = "hard"  # refuse what comes next: nothing would answer it
            self.background_thread_status.fatal_error = error
            self._fail_all(f"the continuous-batching loop died: {error!r}")
        finally:
            if self._release_engine:
                self._drop_engine()

    @contextlib.contextmanager
    def _unpaused(self, engine: Engine | None = None):
        """Wait until no pause() is held, then hold pauses off while the loop works on the engine. With `engine`
        (kept on the yielded hold unless the work failed), a pause asked for meanwhile gets the device idle: the
        engine's step in flight (overlap) is read first, in the same lock as the pause is granted, and the
        sequences that got a token are in `hold.drained`."""
        with self._pause:
            while self._pauses:
                self._pause.wait()
            self._stepping = True
        hold = _Hold(engine)
        try:
            yield hold
        finally:
            with self._pause:
                if self._pauses and hold.engine is not None:
                    hold.drained = hold.engine.drain()
                self._stepping = False
                self._pause.notify_all()

    def _take_events(self) -> None:
        """The adds and cancels made since the last step, in their order."""
        for kind, item in drain(self._events):
            if kind == "add":
                self._admit(item)
            else:
                self._cancel(item)

    def _admit(self, request: _Request) -> None:
        try:
            request.sequence = self.engine.add_request(request.prompt, request.max_new_tokens,
                                                       eos_token_id=request.eos_ids, request_id=request.request_id,
                                                       **self.sampling)
        except ValueError as error:
            self._finish(request, RequestStatus.FAILED, str(error))
            return
        self._requests[request.request_id] = request

    def _cancel(self, request_id: str) -> None:
        request = self._requests.pop(request_id, None)
        if request is None:
            return  # unknown, or finished already
        engine = self.engine
        engine.cancel(request_id)
        self._finish(request, RequestStatus.FAILED, "cancelled")
        blocks = engine.block_manager
        logger.info("qwen3_accel: request %s cancelled after %d tokens; %d of %d KV blocks free", request_id,
                    len(request.sequence.generated), blocks.num_free, len(blocks.blocks))

    def _publish(self, stepped: list[Sequence]) -> None:
        now = time.perf_counter()
        got_token = {seq.request_id for seq in stepped}
        for request_id, request in list(self._requests.items()):
            seq = request.sequence
            if request.started < 0 and seq.status is not Status.WAITING:
                request.started = now
            if request_id in got_token and request.record_timestamps:
                request.timestamps.append(now)
            if seq.finished:
                del self._requests[request_id]
                status = RequestStatus.FINISHED if seq.status is Status.FINISHED else RequestStatus.FAILED
                self._finish(request, status, seq.error)
            elif request.streaming and request_id in got_token:
                self._deliver(request.output(RequestStatus.DECODING))

    def _fail_all(self, reason: str, events: bool = True) -> None:
        """Fail every request running (the engine drops them too, and frees their blocks) and, with `events`,
        every one still queued (pending cancels are dropped)."""
        for request_id, request in list(self._requests.items()):
            if self.engine is not None:
                self.engine.cancel(request_id)
            self._finish(request, RequestStatus.FAILED, reason)
        self._requests.clear()
        for kind, item in drain(self._events) if events else ():
            if kind == "add":
                self._finish(item, RequestStatus.FAILED, reason)
