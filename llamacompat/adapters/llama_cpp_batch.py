"""Parallel decoding on llama.cpp: several sequences of one context, decoded together in one ``llama_batch``.

``LlamaCppAdapter.open_batch`` makes a ``BatchEngine``: ``n_parallel`` slots (llama.cpp sequences), each
holding up to ``n_ctx / n_parallel`` tokens. Each request runs the ordinary engine
loop (``engine.generate``) on its own ``SequenceAdapter``, whose steps are llama_cpp's ``_Generation``
(the same sampler chain, grammar matcher and forced tokens as a plain completion) over a ``_Slot``: where a
plain completion decodes at once, a slot hands its tokens to the next step and waits.

Each step puts every generating slot's next token into one batch and fills the rest of
``n_batch`` with chunks of waiting prompts (continuous batching and chunked prefill, as llama-server does),
then wakes the slots, which sample from their own output rows side by side. A step waits for the slots that
are about to submit (a moment, ``_GATHER_S``), so that one decode serves them all; the slot that completes
the set decodes it (there is no scheduler thread to hop through). A request goes to the free slot
whose cached tokens share the longest prefix with its prompt (prefix reuse: ``cache_n``). A decode failure
fails the requests in that batch alone; stopping or finishing one request touches no other slot's cache.
A request may load its slot from a state file and save it (llama.rn's ``load_state_path`` and the others:
``llama_cpp_state``), between steps, before its prompt, after it and at its end.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import TYPE_CHECKING, Any, Callable

import numpy as np

from ..errors import ContextFullError, GenerationError, LlamaError, MultimodalNotEnabledError, compat_warning
from . import compute_thread
from . import llama_cpp_state as state_files
from .base import BatchSequence, Interrupted, SamplingParams
from .llama_cpp import LlamaCppAdapter, _Generation, _native_detail, lc
from .llama_cpp_mtmd import is_media, token_runs

if TYPE_CHECKING:
    from ..local import StateFiles
    from ..types import CompletionResult

__all__ = ["BatchEngine", "SequenceAdapter"]

#: How long a step waits for slots that are sampling or about to submit their next token (so one batch serves
#: them all), once the first submission is in. A slot resubmits within microseconds; this only bounds the wait
#: for one that is held up (a long grammar mask), which then joins the next step.
_GATHER_S = 0.004
#: How long a step waits for requests that are still being built (chat template, tokens, sampler) before they
#: claim a slot, so that prompts sent together are evaluated together (time to first token on a GPU).
_ARRIVING_S = 0.025


class _Job:
    """Tokens one slot wants evaluated: a prompt (chunked over steps) or the last sampled token(s)."""

    __slots__ = ("slot", "tokens", "done_at", "stop", "row", "error", "finished")

    def __init__(self, slot: "_Slot", tokens: list[int], stop: threading.Event | None) -> None:
        self.slot, self.tokens, self.stop = slot, tokens, stop
        self.done_at = 0  # tokens of ``tokens`` evaluated so far
        self.row = -1  # the batch index of the last token's logits
        self.error: BaseException | None = None
        self.finished = False


class _Slot:
    """One llama.cpp sequence of the batch, as ``_Generation``'s evaluator (see ``llama_cpp._Solo``)."""

    def __init__(self, engine: "BatchEngine") -> None:
        self._engine = engine
        self.seq: int | None = None  # claimed for one request
        self._arrived = False

    @property
    def tokens(self) -> list[int]:
        assert self.seq is not None
        return self._engine.cached[self.seq]

    def claim(self, prompt: list[int] | None) -> None:
        if self.seq is None:
            self.seq = self._engine.claim(prompt)
            self.arrived()

    def arrived(self) -> None:
        """Once per request: it has a slot now, or will never claim one."""
        if not self._arrived:
            self._arrived = True
            self._engine.arrived()

    def release(self) -> None:
        if self.seq is not None:
            seq, self.seq = self.seq, None
            self._engine.release(seq)

    def rewind(self, keep: int) -> None:
        assert self.seq is not None
        self._engine.rewind(self.seq, keep)

    def evaluate(self, tokens: list[int], stop: threading.Event | None = None,
                 beside: Callable[[], Any] | None = None) -> int:
        """``tokens`` into this slot: text in the shared batches, each medium's run of placeholders through the
        projector with the context to itself (``BatchEngine.medium``); the output row of the last token (a prompt
        never ends with a medium: ``LocalCore`` refuses it)."""
        assert self.seq is not None
        engine = self._engine
        if not any(is_media(t) for t in tokens):
            return engine.evaluate(self, tokens, stop, beside)
        row, unread = 0, False
        for start, end in token_runs(tokens):
            if is_media(tokens[start]):
                if unread:  # the row of a text run before a medium is nobody's to read (and would hold it off)
                    engine.row_read()
                    unread = False
                engine.medium(self, tokens[start], stop)
                continue
            row, unread = engine.evaluate(self, tokens[start:end], stop, beside), True
            beside = None
        return row

    def row_read(self) -> None:
        self._engine.row_read()


class _StateSlot(_Slot):
    """A slot that, while ``held``, stays its request's after ``end`` until the request's state is saved
    (``SequenceAdapter.finish``): no other request may claim the sequence before it is written."""

    def __init__(self, engine: "BatchEngine") -> None:
        super().__init__(engine)
        self.held = False

    def release(self) -> None:
        if not self.held:
            super().release()


class BatchEngine:
    """The slots of one llama.cpp context in parallel mode, decoded together."""

    #: its sequences load and save llama.rn's per-sequence state files (``sequence(progress, state)``, ``finish``)
    state_files = True

    def __init__(self, adapter: LlamaCppAdapter, n_parallel: int, n_batch: int) -> None:
        self.adapter = adapter
        self.n_parallel = n_parallel
        self.n_batch = max(1, min(n_batch, adapter._n_batch))  # llama_decode takes at most the context's n_batch
        self.n_ctx_slot = min(adapter.n_ctx_context // n_parallel, adapter.n_ctx)  # llama.rn: n_ctx / n_parallel
        if self.n_ctx_slot < 2:
            raise ContextFullError(f"parallel.enable: {n_parallel} slots of a {adapter.n_ctx_context}-token context "
                                   f"leave {self.n_ctx_slot} tokens each; use fewer slots or a larger n_ctx")
        mem = adapter._mem
        # Slot 0 starts with what plain completions left in sequence 0 (its prefix is reused); the others empty.
        self.cached: list[list[int]] = [list(adapter._tokens)] + [[] for _ in range(n_parallel - 1)]
        for seq in range(1, lc.llama_n_seq_max(adapter._ctx)):
            lc.llama_memory_seq_rm(mem, seq, 0, -1)
        if len(self.cached[0]) > self.n_ctx_slot:
            self._drop_tail(0, self.n_ctx_slot - 1)
        self._free = list(range(n_parallel))
        self._used_at = [0.0] * n_parallel  # when each slot last served (least recently used goes first)
        self._batch = lc.llama_batch_init(self.n_batch, 0, 1)
        self._token = np.ctypeslib.as_array(self._batch.token, shape=(self.n_batch,))
        self._pos = np.ctypeslib.as_array(self._batch.pos, shape=(self.n_batch,))
        self._logits = np.ctypeslib.as_array(self._batch.logits, shape=(self.n_batch,))
        n_seq_id = np.ctypeslib.as_array(self._batch.n_seq_id, shape=(self.n_batch,))
        n_seq_id[:] = 1
        self._lock = threading.Condition()
        self._jobs: list[_Job] = []  # submitted, in order
        self._claimed = 0  # slots serving a request now
        self._arriving = 0  # requests given a SequenceAdapter that have not claimed a slot yet
        self._reading = 0  # slots reading their output row of the last decode (no decode until they are done)
        self._busy = False  # a thread is decoding (or running exclusive work) now
        self._closed = False
        self._beside = concurrent.futures.ThreadPoolExecutor(n_parallel, thread_name_prefix="llamacompat-grammar")
        self.steps = 0  # decodes run

    # -- what the pool's workers call (through SequenceAdapter) -----------------------------------------------
    def sequence(self, progress: Any = None, state: "StateFiles | None" = None) -> "SequenceAdapter":
        """The adapter for one request (``state``: the files it loads and saves, llama.rn's load_state_path and
        the others); it counts as arriving until it claims a slot (or closes)."""
        with self._lock:
            self._arriving += 1
        return SequenceAdapter(self, progress, state)

    def arrived(self) -> None:
        """A request claimed its slot, or ended without one."""
        with self._lock:
            self._arriving = max(0, self._arriving - 1)
            self._lock.notify_all()

    def claim(self, prompt: list[int] | None) -> int:
        """The free slot whose cache shares the longest prefix with ``prompt`` (the least recently used among
        equals, an empty one for ``None``)."""
        with self._lock:
            if not self._free:  # the pool runs at most n_parallel requests: a free slot always exists
                raise GenerationError("parallel mode: no free slot (more requests than slots ran at once)")

            def score(seq: int) -> tuple[int, float]:
                cached = self.cached[seq]
                if prompt is None:
                    return (-len(cached), -self._used_at[seq])
                shared = 0
                for a, b in zip(cached, prompt, strict=False):
                    if a != b:
                        break
                    shared += 1
                return (shared, -self._used_at[seq])

            seq = max(self._free, key=score)
            self._free.remove(seq)
            self._claimed += 1
            return seq

    def release(self, seq: int) -> None:
        with self._lock:
            self._used_at[seq] = time.monotonic()
            self._free.append(seq)
            self._claimed -= 1
            self._lock.notify_all()

    def rewind(self, seq: int, keep: int) -> None:
        """Keep the first ``keep`` cached tokens of ``seq`` (between steps: the KV cache is not in use)."""
        if keep < len(self.cached[seq]):
            self.exclusive(lambda: self._drop_tail(seq, keep))

    def _drop_tail(self, seq: int, keep: int) -> None:
        if not lc.llama_memory_seq_rm(self.adapter._mem, seq, keep, -1):
            lc.llama_memory_seq_rm(self.adapter._mem, seq, 0, -1)  # recurrent models cannot drop a tail
            keep = 0
        del self.cached[seq][keep:]

    def evaluate(self, slot: _Slot, tokens: list[int], stop: threading.Event | None,
                 beside: Callable[[], Any] | None) -> int:
        """Queue ``tokens`` for ``slot``'s next step(s) and wait (``beside`` runs on a helper thread meanwhile);
        the output row of the last token.

        There is no scheduler thread: the waiting slot that completes a step's set of submissions (or whose wait
        for the others ran out) decodes the batch itself, for everyone, so a lone request costs no thread hop.
        """
        job = _Job(slot, list(tokens), stop)
        masked = self._beside.submit(beside) if beside is not None else None
        with self._lock:
            if self._closed:
                raise GenerationError("parallel mode was turned off while this request ran")
            self._jobs.append(job)
            self._lock.notify_all()
            gather_until = 0.0
            while not job.finished:
                plan = self._ready(gather_until)
                if job.finished:  # stopped while it waited (``_ready`` gave up its prompt)
                    break
                if isinstance(plan, float):
                    gather_until = plan
                    self._lock.wait(max(0.0, plan - time.monotonic()))
                elif plan is None:
                    self._lock.wait()
                else:
                    self._busy = True
                    self._lock.release()
                    try:
                        rc = self._decode(plan)
                    finally:
                        self._lock.acquire()
                        self._busy = False
                    self._settle(plan, rc)
                    gather_until = 0.0
        if masked is not None:
            masked.result()
        if job.error is not None:
            raise job.error
        return job.row

    def medium(self, slot: _Slot, token: int, stop: threading.Event | None) -> None:
        """The medium placeholder ``token`` stands for, through the projector into ``slot``'s sequence, between
        steps (its encoder and decode are the projector's own). A stopped or failed medium leaves none of its
        positions in the sequence."""
        adapter, seq = self.adapter, slot.seq
        assert seq is not None
        projector = adapter._projector
        if projector is None:
            raise MultimodalNotEnabledError()
        if stop is not None and stop.is_set():
            raise Interrupted()

        def work() -> None:
            n_past = len(self.cached[seq])
            try:
                # the context's n_batch, as alone: a non-causal projector needs its medium in one batch
                n = projector.evaluate(adapter._ctx, token, n_past, adapter._n_batch, stop, seq)
            except (Interrupted, LlamaError):
                self._drop_tail(seq, n_past)
                raise
            self.cached[seq].extend([token] * n)

        self.exclusive(work)

    def _ready(self, gather_until: float) -> list[tuple[_Job, int, int]] | float | None:
        """Under the lock: the batch to decode now, a time to wait until for more submissions, or None (wait)."""
        if self._busy:  # a decode is running: its jobs are not to be touched until it settles
            return None
        self._fail_stopped()
        if self._reading or not self._jobs:
            return None
        waiting = self._claimed - len({id(job.slot) for job in self._jobs})
        if (waiting > 0 or self._arriving) and not self._closed:  # let those about to submit join this step
            now = time.monotonic()
            gather_until = gather_until or now + (_ARRIVING_S if self._arriving else _GATHER_S)
            if now < gather_until:
                return gather_until
        return self._plan()

    def row_read(self) -> None:
        with self._lock:
            self._reading = max(0, self._reading - 1)
            if not self._reading:
                self._lock.notify_all()

    def exclusive(self, work: Callable[[], Any]) -> Any:
        """Run ``work`` with the context to itself, between steps (embeddings, rewinds)."""
        with self._lock:
            while self._busy or self._reading:
                self._lock.wait()
            self._busy = True
        try:
            return work()
        finally:
            with self._lock:
                self._busy = False
                self._lock.notify_all()

    def _fail_stopped(self) -> None:
        """A prompt whose request was stopped gives up between chunks: its slot raises ``Interrupted``."""
        for job in [j for j in self._jobs if j.stop is not None and j.stop.is_set()]:
            self._jobs.remove(job)
            job.error, job.finished = Interrupted(), True
            self._lock.notify_all()

    def _plan(self) -> list[tuple[_Job, int, int]]:
        """(job, first, end) token ranges for one batch: every one-token step first, then prompt chunks, in order."""
        room = self.n_batch
        plan: list[tuple[_Job, int, int]] = []
        for job in sorted(self._jobs, key=lambda j: len(j.tokens) - j.done_at > 1):  # steps, then prompts (stable)
            if room == 0:
                break
            start = job.done_at
            end = min(len(job.tokens), start + room)
            plan.append((job, start, end))
            room -= end - start
        return plan

    def _decode(self, plan: list[tuple[_Job, int, int]]) -> int:
        """One llama_decode of the planned tokens (outside the lock: ``_busy`` keeps everyone else off)."""
        adapter, batch, at = self.adapter, self._batch, 0
        token, pos, logits, seq_id = self._token, self._pos, self._logits, batch.seq_id
        for job, start, end in plan:
            seq = job.slot.seq
            assert seq is not None
            n = end - start
            base = len(self.cached[seq])
            token[at:at + n] = job.tokens[start:end]
            pos[at:at + n] = np.arange(base, base + n, dtype=np.int32)
            logits[at:at + n] = 0
            if end == len(job.tokens):
                logits[at + n - 1] = 1
            for i in range(at, at + n):
                seq_id[i][0] = seq
            at += n
        batch.n_tokens = at
        rc = compute_thread.run(lc.llama_decode, adapter._ctx, batch)
        if rc == 0:
            lc.llama_get_logits(adapter._ctx)  # sync and put the output rows in order once, before slots read them
        return rc

    def _settle(self, plan: list[tuple[_Job, int, int]], rc: int) -> None:
        """Under the lock, after a decode: record what each slot's cache holds now, hand out the rows."""
        self.steps += 1
        at = 0
        for job, start, end in plan:
            seq = job.slot.seq
            assert seq is not None
            if rc == 0:
                self.cached[seq].extend(job.tokens[start:end])
                job.done_at = end
                if end == len(job.tokens):
                    job.row, job.finished = at + (end - start) - 1, True
                    self._jobs.remove(job)
                    self._reading += 1
            else:
                self._jobs.remove(job)
                job.error, job.finished = self._failure(rc, seq), True
            at += end - start
        self._lock.notify_all()

    def _failure(self, rc: int, seq: int) -> LlamaError:
        """After a failed decode: keep what both the cache and our record hold for ``seq``, and say why."""
        kept = min(len(self.cached[seq]), lc.llama_memory_seq_pos_max(self.adapter._mem, seq) + 1)
        self._drop_tail(seq, max(kept, 0))
        detail = _native_detail()
        if rc == 1:
            return ContextFullError(f"Context is full: no KV cache slot for the batch ({detail or 'n_ctx ' + str(self.adapter.n_ctx)})")
        return GenerationError(f"llama_decode failed with code {rc}" + (f" ({detail})" if detail else ""))

    # -- lifetime -----------------------------------------------------------------------------------------
    def close(self) -> None:
        """After every request has ended (the pool waits for its workers): sequence 0 keeps slot 0's cache for
        the plain completions that follow, the other sequences are emptied."""
        with self._lock:
            self._closed = True
            for job in self._jobs:  # none should be left: the pool closes us after its workers stopped
                job.error, job.finished = GenerationError("parallel mode was turned off"), True
            self._jobs.clear()
            self._lock.notify_all()
        self._beside.shutdown(wait=True)
        adapter = self.adapter
        for seq in range(1, self.n_parallel):
            lc.llama_memory_seq_rm(adapter._mem, seq, 0, -1)
        adapter._tokens = list(self.cached[0])
        lc.llama_batch_free(self._batch)


class SequenceAdapter(BatchSequence):
    """The adapter one parallel request runs on: llama_cpp's per-sequence steps over one slot of the batch;
    everything about the vocabulary comes from the context's adapter."""

    name = "llama_cpp"

    def __init__(self, engine: BatchEngine, progress: Any = None, state: "StateFiles | None" = None) -> None:
        parent = engine.adapter
        super().__init__(parent, engine.n_ctx_slot)
        self._parent: LlamaCppAdapter = parent
        self._engine, self._progress = engine, progress
        self._slot = _StateSlot(engine)
        self._gen = _Generation(parent, self._slot)
        # llama.rn's per-sequence state: the slot is kept until finish() has saved what the request asks
        self._state = state
        self._slot.held = state is not None and bool(state.save_path or state.save_prompt_path)
        self._prompt_pending = state is not None and bool(state.save_prompt_path)  # the prompt's state, to save
        self._prompt: list[int] | None = None  # the prompt once it is evaluated

    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        state = self._state
        if state is not None and state.load_path:
            self._load(state.load_path, state.load_size, prompt)
        cached = self._gen.begin(prompt, sampling, stop)
        self._prompt = list(prompt)
        if self._progress is not None:
            self._progress.generating()
        return cached

    def next_token(self) -> int:
        token = self._gen.next_token()
        if self._prompt_pending:
            self._save_prompt()
        if self._progress is not None:
            self._progress.token()
        return token

    def force_token(self, token: int) -> int:
        forced = self._gen.force_token(token)
        if self._prompt_pending:
            self._save_prompt()
        if self._progress is not None:
            self._progress.token()
        return forced

    # -- llama.rn's per-sequence state (load_state_path, save_prompt_state_path, save_state_path) -------------
    def _load(self, path: str, size: int, prompt: list[int]) -> None:
        """Before the prompt: the checked file into this request's slot (the one whose cache is most like it),
        whose tokens then count as cached, so the prompt's shared prefix is reused."""
        engine, slot = self._engine, self._slot
        state = state_files.read_checked(engine, path)  # no slot is touched by a file that fails its checks
        slot.claim(state.tokens or prompt)
        assert slot.seq is not None
        state_files.load(engine, slot.seq, state, size)

    def _save_prompt(self) -> None:
        """Once the prompt is evaluated and before any generated token is (the first draw leaves it pending):
        the slot's state with the prompt's tokens listed."""
        self._prompt_pending = False
        state, seq, prompt = self._state, self._slot.seq, self._prompt
        if state is None or state.save_prompt_path is None or seq is None or prompt is None:
            return  # (the prompt was not evaluated: stopped or failed before)
        state_files.save(self._engine, seq, state.save_prompt_path, len(prompt), "completion: 'save_prompt_state_path'")

    def finish(self, result: "CompletionResult | None") -> None:
        """After the request, holding its slot still: the prompt's state if no token was drawn, and the final
        state when the completion ended on its own (an end of generation, a stop word, n_predict; not when it
        was interrupted, ran out of context or failed: ``result`` None), as llama.rn saves it. Then the slot is
        free."""
        slot, state = self._slot, self._state
        try:
            if slot.seq is not None and state is not None:
                if self._prompt_pending:
                    self._save_prompt()
                if (state.save_path is not None and result is not None and not result["interrupted"]
                        and not result["context_full"]):
                    self._save_final(slot.seq, state.save_path, state.save_size)
        finally:
            slot.held = False
            slot.release()

    def _save_final(self, seq: int, path: str, size: int) -> None:
        """The tokens the slot evaluated (the prompt and all generated tokens but the last, which is never
        evaluated), the first ``size`` of them where it is > 0."""
        engine = self._engine
        n = len(engine.cached[seq])
        if 0 < size < n:
            if state_files.can_cut(engine):
                n = size
            else:  # llama.rn: a recurrent state holds every position, so the file lists them all
                compat_warning(f"completion: 'save_state_size' {size} is ignored: this model's memory cannot be "
                               f"cut (recurrent or hybrid); all {n} tokens are saved")
        state_files.save(engine, seq, path, n, "completion: 'save_state_path'")

    def top_probs(self, n: int) -> list[tuple[int, float]]:
        return self._gen.top_probs(n)

    def end(self) -> None:
        self._gen.end()

    @property
    def n_past(self) -> int:
        slot = self._slot
        return len(slot.tokens) if slot.seq is not None else 0

    def embedding(self, tokens: list[int]) -> list[float]:
        return self._pooled(tokens, self._parent.n_embd, "embed")

    def rank(self, query: list[int], document: list[int]) -> float:
        return self._pooled(self._parent._rerank_input(query, document), 1, "rerank")[0]

    def _pooled(self, tokens: list[int], width: int, what: str) -> list[float]:
        """One pooled output, computed in a slot of its own with the context to itself (the other slots' caches
        stay as they are; this slot's is emptied, as llama.rn empties the cache for an embedding)."""
        engine, slot = self._engine, self._slot
        if len(tokens) > engine.n_ctx_slot:
            raise ContextFullError(f"Context is full: {len(tokens)} tokens to {what}, and each of the "
                                   f"{engine.n_parallel} slots holds {engine.n_ctx_slot}")
        slot.claim(None)
        try:
            seq = slot.seq
            assert seq is not None

            def pooled() -> list[float]:
                engine._drop_tail(seq, 0)
                try:
                    return self._parent._pooled(tokens, width, what, seq)
                finally:
                    engine._drop_tail(seq, 0)

            return engine.exclusive(pooled)
        finally:
            slot.release()

    def clear_cache(self, clear_data: bool) -> None:
        raise GenerationError("clear_cache is not a parallel request")

    def close(self) -> None:
        """The request is over (LocalSlots closes every sequence it made, whether or not it ran)."""
        self._slot.arrived()
