"""Parallel decoding on MLX: the requests of ``ctx.parallel`` decoded together by mlx-lm's ``BatchGenerator``.

``MlxAdapter.open_batch`` makes an ``MlxBatch``: ``n_parallel`` slots, each holding up to ``n_ctx / n_parallel``
tokens, and one scheduler thread that owns the ``BatchGenerator`` (every MLX call of the batch runs on it: mlx-lm's
generation stream is thread-local, and Metal wants one thread per stream). Each request runs the ordinary engine
loop on its own ``SequenceAdapter``, which hands its wishes (join with a prompt, want the next token, leave) to the
scheduler and waits.

How the adapter contract is met over ``BatchGenerator``:

- One token at a time, stop at any token: ``BatchGenerator.next()`` advances every generating row by one token.
  A step waits (briefly, ``_GATHER_S``) until every generating request has asked for its next token, so rows
  rarely run ahead; a row that did is buffered, and what it ran ahead is trimmed from its cache when it ends.
- Logits processors per request see each step: bias, penalties and the llguidance grammar mask (``Sampling``),
  plus a capture of the raw logits for ``n_probs`` (computed on the scheduler thread) and of the grammar's dead
  end (``NoTokenAllowed`` is raised when the engine asks for the token drawn from it, never later).
- Seeds: each seeded request draws from its own key (the global MLX state is shared by the rows).
- Prefix reuse: a slot keeps the KV cache a request left (``remove(..., return_prompt_caches=True)``, trimmed to
  what ``n_past`` counts); a request takes the free slot sharing the longest prefix and inserts only the rest.
- Forced tokens (thinking budgets) are not offered: the mlx backend declares ``thinking_budget`` missing, and
  ``BatchGenerator`` samples a row's next token inside its step, with no way to replace it.
- A failure inside a step leaves the generator's state unknown: every request in that batch fails with a
  ``GenerationError``, the slots are emptied and a fresh generator serves the next requests.
"""

from __future__ import annotations

import concurrent.futures
import importlib
import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import mlx.core as mx
from mlx_lm.models.cache import trim_prompt_cache

from ...errors import ContextFullError, GenerationError
from ..base import BatchSequence, Interrupted, NoTokenAllowed, SamplingParams, reusable_prefix
from .sampling import Sampling

if TYPE_CHECKING:
    from .adapter import MlxAdapter

__all__ = ["MlxBatch", "SequenceAdapter"]

# ``mlx_lm.generate`` the module (the package's ``generate`` attribute is the function of that name)
_generate = importlib.import_module("mlx_lm.generate")

#: How long a step waits for generating requests that have not asked for their next token yet (so one step
#: serves them all); a request asks again within microseconds, this only bounds the wait for one held up.
_GATHER_S = 0.004


class _Request:
    """One request's life in the batch, shared by its SequenceAdapter (caller side) and the scheduler."""

    def __init__(self, prompt: list[int], chain: Callable[[], Sampling], n_probs: int, stop: threading.Event) -> None:
        self.prompt, self.make_chain, self.n_probs, self.stop = prompt, chain, n_probs, stop
        self.chain: Sampling | None = None  # built on the scheduler thread, where its arrays are used
        self.kept: int | None = None  # what the slot holds once the request left (its final n_past)
        self.uid = -1
        self.slot = -1
        self.reuse = 0
        self.state = "new"  # new -> prefill -> generating -> done
        self.pending: deque[tuple[int, list[tuple[int, float]], NoTokenAllowed | None]] = deque()
        self.captured: deque[tuple[mx.array, NoTokenAllowed | None]] = deque()  # per processed step, in order
        self.first = True  # the next processor call is the one after the prompt
        self.failure: BaseException | None = None  # raised by the processor (a grammar that refused a token)
        self.error: BaseException | None = None  # what the caller raises
        self.wanting = False
        self.consumed = 0  # tokens the engine took
        self.leaving = False
        self.finished: tuple[list[Any], list[int]] | None = None  # the generator ended the row (its length limit)

    def process(self, context: mx.array, logits: mx.array) -> mx.array:
        """The row's logits processor (on the scheduler thread, inside ``BatchGenerator``'s step)."""
        if self.failure is not None or self.chain is None:
            return logits
        try:
            token = None if self.first else context[-1:]
            self.first = False
            processed = self.chain.process(logits, token)
            grammar = getattr(self.chain, "_grammar", None)
            self.captured.append((logits, getattr(grammar, "dead_end", None)))
            return processed
        except Exception as err:  # noqa: BLE001 - a step must not fail for the other rows: this request fails alone
            self.failure = err
            self.captured.append((logits, None))
            return logits


class MlxBatch:
    """The slots of one mlx model in parallel mode, and the scheduler thread that steps mlx-lm's BatchGenerator."""

    def __init__(self, adapter: "MlxAdapter", n_parallel: int, n_batch: int) -> None:
        self.adapter = adapter
        self.n_parallel = n_parallel
        self.n_batch = max(1, min(n_batch, adapter._n_batch))
        self.n_ctx_slot = adapter.n_ctx // n_parallel  # llama.rn: n_ctx / n_parallel
        if self.n_ctx_slot < 2:
            raise ContextFullError(f"parallel.enable: {n_parallel} slots of a {adapter.n_ctx}-token context leave "
                                   f"{self.n_ctx_slot} tokens each; use fewer slots or a larger n_ctx")
        # Slot 0 starts with what plain completions left in the cache (its prefix is reused); the others empty.
        kept = min(len(adapter._tokens), self.n_ctx_slot - 1)
        adapter._rewind(kept)
        _settle_arrays(adapter._cache)  # computed here: a graph left pending on this thread's stream cannot move
        self._slots: list[tuple[list[Any] | None, list[int]]] = [(adapter._cache, list(adapter._tokens))]
        self._slots += [(None, []) for _ in range(n_parallel - 1)]
        self._free = list(range(n_parallel))
        self._used_at = [0.0] * n_parallel
        self._cv = threading.Condition()
        self._joins: list[_Request] = []
        self._leaves: list[_Request] = []
        self._work: list[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = []
        self._live: dict[int, _Request] = {}  # uid -> request inside the generator
        self._closed = False
        self.steps = 0  # BatchGenerator.next() calls that decoded at least one row
        self._generator = self._new_generator()
        self._thread = threading.Thread(target=self._loop, name="llamacompat-mlx-batch", daemon=True)
        self._thread.start()

    def _new_generator(self) -> Any:
        return _generate.BatchGenerator(self.adapter._model, max_tokens=self.n_ctx_slot,
                                        completion_batch_size=self.n_parallel, prefill_batch_size=self.n_parallel,
                                        prefill_step_size=self.n_batch)

    def sequence(self, progress: Any = None) -> "SequenceAdapter":
        return SequenceAdapter(self, progress)

    # -- caller side (a pool worker, through SequenceAdapter) ------------------------------------------------
    def join(self, request: _Request) -> int:
        """Insert the request and wait until its prompt is evaluated; how many prompt tokens came from the cache."""
        with self._cv:
            if self._closed:
                raise GenerationError("parallel mode was turned off while this request ran")
            self._joins.append(request)
            self._cv.notify_all()
            while request.state in ("new", "prefill") and request.error is None:
                self._cv.wait()  # the scheduler looks at ``stop`` between prompt chunks
            if request.error is not None:
                raise request.error
            return request.reuse

    def want(self, request: _Request) -> tuple[int, list[tuple[int, float]]]:
        """The request's next token (and its top probabilities when it asked for them)."""
        with self._cv:
            request.wanting = True
            self._cv.notify_all()
            while not request.pending and request.error is None:
                if request.finished is not None:
                    request.error = ContextFullError(f"Context is full: the slot holds {self.n_ctx_slot} tokens")
                    break
                self._cv.wait()
            request.wanting = False
            if request.pending:
                token, top, dead_end = request.pending.popleft()
                if dead_end is not None:
                    raise dead_end
                request.consumed += 1
                return token, top
            assert request.error is not None
            raise request.error

    def leave(self, request: _Request) -> None:
        """The request ended: its slot keeps the cache it left (trimmed to what ``n_past`` counts)."""
        with self._cv:
            if request.leaving or request.state == "new":
                return
            request.leaving = True
            self._leaves.append(request)
            self._cv.notify_all()
            while request.state != "done" and not self._closed:
                self._cv.wait()

    def exclusive(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` on the scheduler thread between steps (MLX work of the model outside the batch)."""
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        with self._cv:
            if self._closed:
                raise GenerationError("parallel mode was turned off while this request ran")
            self._work.append((work, future))
            self._cv.notify_all()
        return future.result()

    def n_past(self, request: _Request) -> int:
        if request.kept is not None:
            return request.kept
        if request.state == "generating":
            return len(request.prompt) + max(request.consumed - 1, 0)  # the last token handed out is not counted
        return request.reuse

    # -- the scheduler thread ----------------------------------------------------------------------------
    def _loop(self) -> None:
        with mx.stream(self._generator.stream):
            while True:
                with self._cv:
                    if not self._prepare():
                        return
                    step = self._due()
                    if step is None:
                        self._cv.wait(0.05)
                        continue
                try:
                    prompts, generated = self._generator.next()
                except Exception as err:  # noqa: BLE001 - the generator's state is unknown: fail the batch, start afresh
                    with self._cv:
                        self._fail_all(GenerationError(f"the mlx backend failed while decoding the batch: {err}"))
                    continue
                with self._cv:
                    self._settle(prompts, generated)

    def _prepare(self) -> bool:
        """Under the lock: run queued work, insert joins, remove leavers and stopped prompts. False once closed."""
        if self._closed:
            return False
        for work, future in self._work:
            try:
                future.set_result(work())
            except BaseException as err:  # noqa: BLE001 - handed to the caller
                future.set_exception(err)
        self._work.clear()
        for request in self._joins:
            self._insert(request)
        self._joins.clear()
        for request in [r for r in self._live.values() if r.state == "prefill" and r.stop.is_set()]:
            self._remove(request, Interrupted(request.reuse))
        for request in self._leaves:
            self._remove(request, None)
        self._leaves.clear()
        self._cv.notify_all()
        return True

    def _insert(self, request: _Request) -> None:
        prompt = request.prompt

        def shared(slot: int) -> tuple[int, float]:
            return reusable_prefix(self._slots[slot][1], prompt), -self._used_at[slot]

        slot = max(self._free, key=shared)
        self._free.remove(slot)
        cache, cached = self._slots[slot]
        reuse = reusable_prefix(cached, prompt)
        if cache is not None and reuse < len(cached):
            trim_prompt_cache(cache, len(cached) - reuse)
        if reuse == 0:
            cache = None
        request.slot, request.reuse, request.state = slot, reuse, "prefill"
        self._slots[slot] = (None, [])  # the generator holds it now
        try:
            request.chain = request.make_chain()
            [request.uid] = self._generator.insert(
                [prompt[reuse:]], max_tokens=[self.n_ctx_slot - len(prompt) + 1],
                caches=[cache] if cache is not None else None, all_tokens=[prompt[:reuse]],
                samplers=[request.chain.sample], logits_processors=[[request.process]])
        except Exception as err:  # noqa: BLE001 - refused before it joined: this request alone
            self._release(request, None, [])
            request.state, request.kept = "done", 0
            request.error = GenerationError(f"the mlx backend refused the request: {err}")
            return
        self._live[request.uid] = request

    def _remove(self, request: _Request, error: BaseException | None) -> None:
        """Take the request out of the generator; its slot keeps the cache it leaves."""
        cache, tokens = None, []
        if self._live.get(request.uid) is request:  # uids start again at 0 in a generator made after a failure
            del self._live[request.uid]
            extracted = self._generator.remove([request.uid], return_prompt_caches=True)
            if request.uid in extracted:
                cache, tokens = extracted[request.uid]
        elif request.finished is not None:
            cache, tokens = request.finished
        tokens = list(tokens)
        if request.state == "generating":
            keep = len(request.prompt) + max(request.consumed - 1, 0)  # the last token handed out is not counted
        else:  # stopped in its prompt: what was evaluated of the prompt, no more
            keep = min(len(tokens), len(request.prompt) - 1)
        keep = min(keep, len(tokens))
        if cache is not None and keep < len(tokens):
            trim_prompt_cache(cache, len(tokens) - keep)
        if cache is not None and keep:
            _settle_arrays(cache)  # computed on this thread: plain completions use it after parallel mode
        self._release(request, cache if keep else None, tokens[:keep])
        request.state, request.kept = "done", keep
        if error is not None:
            request.error = error

    def _release(self, request: _Request, cache: list[Any] | None, tokens: list[int]) -> None:
        if request.slot >= 0:
            self._slots[request.slot] = (cache, tokens)
            self._used_at[request.slot] = time.monotonic()
            self._free.append(request.slot)
            request.slot = -1

    def _due(self) -> bool | None:
        """Under the lock: True to step now, None to wait (nothing to do, or generating rows about to ask)."""
        live = list(self._live.values())
        if any(r.state == "prefill" for r in live):
            return True
        generating = [r for r in live if r.state == "generating" and r.finished is None]
        if not any(r.wanting and not r.pending for r in generating):
            return None
        deadline = time.monotonic() + _GATHER_S
        while not all(r.wanting or r.leaving for r in generating):  # let the others ask, so one step serves all
            left = deadline - time.monotonic()
            if left <= 0 or self._joins or self._leaves or self._work:
                break
            self._cv.wait(left)
        return True

    def _settle(self, prompts: list[Any], generated: list[Any]) -> None:
        """Under the lock, after a step: hand tokens to their requests."""
        for response in prompts:
            request = self._live.get(response.uid)
            if request is not None and response.end_of_prompt:
                request.state = "generating"
        if generated:
            self.steps += 1
        for response in generated:
            request = self._live.get(response.uid)
            if request is None:
                continue
            logits, dead_end = request.captured.popleft()
            if request.failure is not None:  # its processor failed: the request fails, the batch goes on
                request.error = request.failure
            elif request.error is None:
                top = _top(logits, request.n_probs) if request.n_probs else []
                request.pending.append((int(response.token), top, dead_end))
            if response.finish_reason is not None:  # the generator ended the row itself (the slot is full)
                del self._live[response.uid]
                request.finished = (response.prompt_cache, list(response.all_tokens))
        self._cv.notify_all()

    def _fail_all(self, error: GenerationError) -> None:
        for request in self._live.values():
            request.error, request.state, request.kept = error, "done", 0
            self._release(request, None, [])
        self._live.clear()
        self._slots = [(None, []) for _ in range(self.n_parallel)]
        self._generator.close()
        self._generator = self._new_generator()
        self._cv.notify_all()

    # -- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """After every request ended (the pool waits for its workers): the model's own cache becomes slot 0's."""
        with self._cv:
            self._closed = True
            for request in [*self._live.values(), *self._joins]:
                request.error = GenerationError("parallel mode was turned off")
            self._cv.notify_all()
        self._thread.join()
        self._generator.close()
        cache, tokens = self._slots[0]
        adapter = self.adapter
        if cache is None:
            adapter.clear_cache(False)
        else:
            adapter._cache, adapter._tokens = cache, list(tokens)


def _settle_arrays(cache: list[Any]) -> None:
    """Compute a cache's arrays now, on this thread's stream (mlx-lm's stream is thread-local: an array whose graph
    is still pending there cannot be evaluated from another thread)."""
    mx.eval([c.state for c in cache])


def _top(logits: mx.array, n: int) -> list[tuple[int, float]]:
    """The ``n`` most probable tokens of one row of raw logits, with probabilities."""
    row = logits[0].astype(mx.float32)
    n = min(n, row.shape[0])
    top = mx.argpartition(-row, kth=n - 1)[:n]
    probs = mx.softmax(row)[top]
    order = mx.argsort(-probs)
    ids: list[int] = top[order].tolist()  # type: ignore[assignment]  # a 1-d array: a list of ints
    values: list[float] = probs[order].tolist()  # type: ignore[assignment]
    return [(int(t), float(p)) for t, p in zip(ids, values, strict=True)]


class SequenceAdapter(BatchSequence):
    """The adapter one parallel request runs on: a row of the batch; the vocabulary is the model adapter's."""

    name = "mlx"

    def __init__(self, batch: MlxBatch, progress: Any = None) -> None:
        parent = batch.adapter
        super().__init__(parent, batch.n_ctx_slot)
        self._parent: MlxAdapter = parent
        self._batch, self._progress = batch, progress
        self._request: _Request | None = None
        self._top: list[tuple[int, float]] = []

    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        parent = self._parent
        grammar = parent.grammar_mask(sampling)  # a bad grammar fails here, before the request joins

        def chain() -> Sampling:
            key = mx.random.key(sampling.seed) if sampling.seed >= 0 else None
            return Sampling(sampling, parent._n_logits, self.n_ctx, parent._eog, prompt, grammar, key)

        self._request = _Request(list(prompt), chain, sampling.n_probs, stop)
        cached = self._batch.join(self._request)
        if self._progress is not None:
            self._progress.generating()
        return cached

    def next_token(self) -> int:
        assert self._request is not None, "next_token before begin"
        token, self._top = self._batch.want(self._request)
        if self._progress is not None:
            self._progress.token()
        return token

    def top_probs(self, n: int) -> list[tuple[int, float]]:
        return self._top[:n]

    def end(self) -> None:
        if self._request is not None:
            self._batch.leave(self._request)

    @property
    def n_past(self) -> int:
        return self._batch.n_past(self._request) if self._request is not None else 0

    def embedding(self, tokens: list[int]) -> list[float]:
        return self._batch.exclusive(lambda: self._parent.embedding(tokens))

    def clear_cache(self, clear_data: bool) -> None:
        raise GenerationError("clear_cache is not a parallel request")

    def close(self) -> None:
        self.end()
