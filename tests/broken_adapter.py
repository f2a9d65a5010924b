"""A deliberately broken adapter: the llama.cpp adapter with one realistic bug, chosen by ``fault``.

The conformance suite's own tests run each check against the fault meant to
break it and require the check to fail; with ``fault: ""`` every check passes.
Each fault is a mistake an adapter author could plausibly make.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import threading
import time

import numpy as np

from llamacompat.adapters.base import Interrupted, NoTokenAllowed, SamplingParams
from llamacompat.adapters.llama_cpp import LlamaCppAdapter, lc
from llamacompat.errors import GenerationError, GrammarError, SessionError, UnsupportedFeatureError
from llamacompat.params import Field

FAULTS = {
    "bad_probs": "top_probs reports probabilities as strings",
    "claims_all_cached": "begin() reports the whole prompt as served from the cache",
    "not_greedy": "temperature 0 still samples at random",
    "eog_always": "is_eog() says every token ends generation",
    "counts_sampled": "n_past counts the last sampled token, which is not evaluated yet (as mlx did)",
    "stale_cache": "a new prompt reuses the cache without dropping the old tail",
    "abort_raises": "an interrupted decode raises instead of stopping quietly",
    "seed_ignored": "the seed is replaced by a random one",
    "grammar_ignored": "the grammar is dropped",
    "long_grammar_ignored": "grammars over 400 characters (every JSON schema) are dropped, as by an engine's size limit",
    "poisoned_after_error": "a failed sampler setup (or a grammar dead end) leaves the adapter unusable",
    "dry_unimplemented": "capabilities list dry, but using it raises",
    "close_raises": "close() raises",
    "lossy_detokenize": "detokenize drops every non-ASCII character",
    "random_embedding": "embeddings are random",
    "session_forgets": "load_session reports the tokens but does not restore the KV cache",
    "trusting_loader": "load_session hands any file to llama.cpp and loses the cache when it fails",
    "stop_leaks": "an interrupted run's abort flag stays installed, so the next request (in parallel mode, with "
                  "its own flag) aborts at once",
}


class BrokenAdapter(LlamaCppAdapter):
    name = "broken"
    context_fields = {"fault": Field((str,), "", lambda v: v in FAULTS or v == "", "a key of FAULTS or ''")}

    def __init__(self, model, params) -> None:
        super().__init__(model, params)
        self.fault = params["fault"]
        self._poisoned = False
        self._stop_event: threading.Event | None = None
        self._leaked: threading.Event | None = None  # stop_leaks: the flag of the last interrupted run
        self._counted = 0
        # Parallel requests take turns on this adapter (not llama_cpp's batch), so that the faults apply to them.
        self.capabilities.features["parallel"] = "emulated"

    def open_batch(self, n_parallel: int, n_batch: int):
        return None

    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        if self._poisoned:
            raise GenerationError("adapter state is corrupt after an earlier error")
        self._stop_event = stop
        self._counted = 0
        random_seed = int.from_bytes(os.urandom(4), "little")
        if self.fault == "not_greedy" and sampling.temperature <= 0:
            sampling = dataclasses.replace(sampling, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=random_seed)
        if self.fault == "seed_ignored" and sampling.seed >= 0:
            sampling = dataclasses.replace(sampling, seed=random_seed)
        if self.fault == "long_grammar_ignored" and sampling.grammar and len(sampling.grammar) > 400:
            sampling = dataclasses.replace(sampling, grammar=None)
        if self.fault == "grammar_ignored":
            sampling = dataclasses.replace(sampling, grammar=None)
        if self.fault == "dry_unimplemented" and sampling.dry_multiplier > 0:
            raise UnsupportedFeatureError("dry is not implemented")
        cached = super().begin(prompt, sampling, stop)
        if self.fault == "stop_leaks" and self._leaked is not None and self._leaked.is_set():
            raise Interrupted(cached)  # the old flag aborts this run's decode
        return len(prompt) if self.fault == "claims_all_cached" else cached

    def _build_sampler(self, s: SamplingParams, prompt: list[int]):
        try:
            return super()._build_sampler(s, prompt)
        except GrammarError:
            self._poison()
            raise

    def _guide_for(self, s: SamplingParams):  # the sampler setup's other half: the llguidance grammar
        try:
            return super()._guide_for(s)
        except GrammarError:
            self._poison()
            raise

    def _poison(self) -> None:
        if self.fault == "poisoned_after_error":
            self._poisoned = True

    def _rewind(self, keep: int) -> None:
        if self.fault == "stale_cache":
            del self._tokens[keep:]  # forgets the tail in the record only; the KV cache keeps it
            return
        super()._rewind(keep)

    def next_token(self) -> int:
        if self.fault == "abort_raises":
            time.sleep(0.05)  # a slow decode: stop_completion() lands inside it
            if self._stop_event is not None and self._stop_event.is_set():
                raise GenerationError("llama_decode aborted")
        try:
            return super().next_token()
        except NoTokenAllowed:  # a dead end the engine turns into a GrammarError
            self._poison()
            raise

    @property
    def n_past(self) -> int:
        return len(self._tokens) + (self._counted if self.fault == "counts_sampled" else 0)

    def end(self) -> None:
        self._counted = len(self._gen._pending[-1:])  # the sampled token end() drops, counted anyway
        if self.fault == "stop_leaks" and self._stop_event is not None and self._stop_event.is_set():
            self._leaked = self._stop_event  # taken down only after runs that were not interrupted
        super().end()

    def top_probs(self, n: int):
        probs = super().top_probs(n)
        return [(token, str(p)) for token, p in probs] if self.fault == "bad_probs" else probs

    def is_eog(self, token: int) -> bool:
        return True if self.fault == "eog_always" else super().is_eog(token)

    def detokenize(self, tokens: list[int]) -> str:
        text = super().detokenize(tokens)
        return text.encode("ascii", "ignore").decode() if self.fault == "lossy_detokenize" else text

    def embedding(self, tokens: list[int]) -> list[float]:
        vector = super().embedding(tokens)
        return np.random.default_rng().random(len(vector)).tolist() if self.fault == "random_embedding" else vector

    def load_session(self, path: str) -> list[int]:
        if self.fault == "session_forgets":
            tokens = super().load_session(path)
            lc.llama_memory_clear(self._mem, True)
            return tokens
        if self.fault == "trusting_loader":
            buf = (lc.llama_token * self.n_ctx)()
            count = ctypes.c_size_t(0)
            ok = lc.llama_state_load_file(self._ctx, os.fsencode(path), buf, self.n_ctx, ctypes.byref(count))
            self._tokens = buf[: count.value] if ok else []
            if not ok:
                raise SessionError("Failed to load session")
            return list(self._tokens)
        return super().load_session(path)

    def close(self) -> None:
        super().close()
        if self.fault == "close_raises":
            raise GenerationError("failed to free the model")
