"""The adapter protocol: what the generation loop needs from a runtime.

An adapter loads a model, tokenizes, evaluates a prompt, produces the next
token with the sampling it can do natively, and reports what it can do. It
never builds result dicts or matches stop strings: that is the engine's job,
so every backend behaves the same.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Literal, Mapping, get_args

import numpy as np

from ..errors import GenerationError, InvalidParamsError, LlamaError, OutOfMemoryError, UnsupportedFeatureError
from ..grammars.triggers import Trigger
from ..params import Field

__all__ = ["Adapter", "BatchSequence", "Capabilities", "Feature", "FEATURES", "SUPPORT", "check_features", "Interrupted", "NoTokenAllowed",
           "SamplingParams", "Support", "reusable_prefix", "MAX_BENCH_ROUNDS", "RUNTIME_FAILURES",
           "END_OF_RUN", "default_threads"]

#: llama.rn's bench has no bound on ``nr``; ours keeps one call to a bounded amount of work
MAX_BENCH_ROUNDS = 100

#: What ``next_token`` returns when a runtime that generates by itself ended the answer without handing out an
#: end-of-generation token id (RKLLM's FINISH: the model's EOS, or the runtime's own limit). ``is_eog`` says True
#: for it, so the engine ends the completion as at an EOS (``stopped_eos``; it counts in ``tokens_predicted`` as
#: an EOS does and, like one, never in ``n_past``); ``token_to_piece`` and ``top_probs`` are never asked about it.
END_OF_RUN = -1

#: What a Python-level runtime (mlx, a native library through its bindings) raises when it fails, as the typed
#: error the caller gets: ``errors.map_exceptions(RUNTIME_FAILURES, ...)`` at an adapter's boundaries. The
#: protocol's own signals (``Interrupted``, ``NoTokenAllowed``) and our ``LlamaError`` pass through; so does
#: anything else (a TypeError is a bug to see, not a runtime failure).
RUNTIME_FAILURES: Mapping[type[BaseException], type[LlamaError]] = {
    MemoryError: OutOfMemoryError,  # std::bad_alloc through nanobind / pybind11
    RuntimeError: GenerationError,  # std::runtime_error: Metal allocation limits, failed kernels
    ValueError: GenerationError,  # std::invalid_argument: shapes and dtypes the runtime refuses
    IndexError: GenerationError,  # std::out_of_range
}

Support = Literal["native", "emulated", "missing"]
SUPPORT: frozenset[str] = frozenset(get_args(Support))

# The feature catalogue: every name ``Capabilities.features`` (and a remote core's capabilities) may list,
# so a check such as ``supports("ignore_eos")`` can never ask for a name that nobody writes.
Feature = Literal[
    # -- what a completion can do
    "completion",  # generate text at all (missing on a vocab_only context)
    "streaming",  # TokenData handed out token by token
    "stop",  # stop strings (the engine matches them: emulated everywhere but a server that takes them)
    "interrupt_prompt",  # stop_completion() also ends a long prompt evaluation, not only generation
    "prefix_cache",  # the KV cache is reused across completions and tokens_cached / cache_n report it
    # -- constrained output
    "grammar",  # GBNF 'grammar' (and JSON schemas turned into one)
    "lazy_grammar",  # 'grammar_lazy' with 'grammar_triggers': the grammar starts at a trigger
    "json_schema",  # 'json_schema' / 'response_format' where no GBNF grammar is taken (a server's own schema mode)
    # -- sampling (params.FEATURE_PARAMS says which request params belong to each)
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "typical_p",
    "xtc",  # xtc_probability / xtc_threshold
    "top_n_sigma",
    "penalties",  # penalty_repeat / penalty_freq / penalty_present (over penalty_last_n)
    "mirostat",  # mirostat 1 and 2, with mirostat_tau / mirostat_eta
    "dry",  # DRY repetition penalty (dry_multiplier and its settings)
    "seed",  # a fixed seed reproduces a sampled text
    "logit_bias",
    "ignore_eos",  # the end-of-generation tokens are banned
    "n_probs",  # top-n probabilities of each generated token
    "thinking_budget",  # thinking_budget_tokens: the reasoning is closed after N tokens (Adapter.force_token)
    # -- other methods
    "tokenize",
    "detokenize",
    "chat_template",  # the model's chat template renders 'messages' (our Jinja renderer: emulated)
    "formatted_chat",  # get_formatted_chat()
    "embedding",
    "rerank",  # native: a reranker's rank pooling; emulated: cosine similarity of embeddings
    "bench",
    "lora",  # apply_lora_adapters() / remove_lora_adapters()
    "session",  # save_session() / load_session()
    "parallel",  # ctx.parallel: native = requests decoded together (one batch); emulated = they take turns
    "multimodal",  # init_multimodal(): media (images, audio) in prompts through a projector (mmproj)
]
FEATURES: frozenset[str] = frozenset(get_args(Feature))


class Interrupted(Exception):
    """Raised by an adapter when ``stop`` was set while it evaluated the prompt (``begin``), or while it
    waited for a runtime that produces tokens on its own (``next_token``).

    ``cache_n`` is how many prompt tokens came from the cache, as ``begin`` returns.
    """

    def __init__(self, cache_n: int = 0) -> None:
        super().__init__("interrupted during prompt evaluation")
        self.cache_n = cache_n


class NoTokenAllowed(Exception):
    """Raised by ``next_token`` when no token may be sampled: the grammar allows none that sampling does not ban.

    The adapter reports the fact; the engine decides: with ``grammar_complete`` (the grammar allows only the
    end of generation, which ``ignore_eos`` or a ``logit_bias`` bans) the completion ends cleanly, otherwise
    it fails with a ``GrammarError`` carrying ``reason``. Raised before any token is accepted, so the
    runtime's grammar state (and the KV cache) stays consistent.
    """

    def __init__(self, grammar_complete: bool, reason: str) -> None:
        super().__init__(reason)
        self.grammar_complete, self.reason = grammar_complete, reason

    @classmethod
    def judge(cls, allowed: np.ndarray, eog: np.ndarray) -> "NoTokenAllowed":
        """Why nothing can be drawn, from boolean masks over the vocabulary: what the grammar ``allowed`` (all
        of it banned by sampling) and which tokens end generation."""
        if not allowed.any():
            return cls(False, "the grammar allows no token of this vocabulary here (no token starts with a "
                              "character it accepts)")
        if not (allowed & ~eog).any():
            return cls(True, "the grammar is complete; ignore_eos or logit_bias bans the end of generation")
        return cls(False, "logit_bias (or ignore_eos) bans every token the grammar allows here")


def default_threads() -> int:
    """Threads for ``n_threads: 0``: half the cores, at least one (llama.rn's iOS rule; the decode is memory bound)."""
    return max(1, (os.cpu_count() or 2) // 2)


def reusable_prefix(cached: list[int], prompt: list[int]) -> int:
    """How many leading prompt tokens the cache already holds; the last one is always evaluated, for its logits."""
    reuse = 0
    for a, b in zip(cached, prompt, strict=False):  # the shorter one bounds the prefix
        if a != b:
            break
        reuse += 1
    return min(reuse, len(prompt) - 1)


@dataclass(frozen=True)
class SamplingParams:
    """Validated sampling settings for one completion (llama.rn names)."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    typical_p: float = 1.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    top_n_sigma: float = -1.0
    penalty_last_n: int = 64
    penalty_repeat: float = 1.0
    penalty_freq: float = 0.0
    penalty_present: float = 0.0
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = -1
    dry_sequence_breakers: tuple[str, ...] = ("\n", ":", '"', "*")
    seed: int = -1
    ignore_eos: bool = False
    logit_bias: tuple[tuple[int, float], ...] = ()  # token ids, already resolved
    grammar: str | None = None
    grammar_lazy: bool = False
    grammar_triggers: tuple[Trigger, ...] = ()  # already parsed (grammars.triggers)
    preserved_tokens: tuple[str, ...] = ()
    grammar_engine: str = "auto"
    # The loop enforces n_predict on every backend; a runtime that takes a per-run limit (RKLLM 1.3) gets it too.
    n_predict: int = -1
    # The loop asks top_probs at every token when set: an adapter keeps each position's logits (no skipping ahead).
    n_probs: int = 0

    def banned(self, eog: Iterable[int]) -> set[int]:
        """Tokens sampling never draws: a bias of -inf (``false``), and the end-of-generation tokens with ``ignore_eos``."""
        out = {token for token, bias in self.logit_bias if bias == -math.inf}
        if self.ignore_eos:
            out.update(eog)
        return out

    @classmethod
    def from_params(cls, params: dict[str, Any], logit_bias: tuple[tuple[int, float], ...]) -> "SamplingParams":
        tuples = ("dry_sequence_breakers", "grammar_triggers", "preserved_tokens")
        names = cls.__dataclass_fields__.keys() - {"logit_bias", *tuples}
        values = {name: params[name] for name in names if name in params}
        values.update({name: tuple(params[name]) for name in tuples if name in params})
        return cls(**values, logit_bias=logit_bias)


@dataclass
class Capabilities:
    """What a backend does natively, emulates, or lacks: ``FEATURES`` names, each ``SUPPORT`` value.

    A feature left out is missing. A name outside the catalogue (a typo, or a feature nobody added to
    ``Feature``) or another support value is refused here, when the adapter is built.
    """

    backend: str
    features: dict[Feature, Support] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_features(self.features, f"the {self.backend} backend's capabilities")

    def supports(self, feature: str) -> bool:
        return self.features.get(feature, "missing") != "missing"  # type: ignore[call-overload]

    def as_dict(self) -> dict[str, Any]:
        return {"backend": self.backend, "features": dict(self.features)}


def check_features(features: Mapping[Any, str], where: str) -> None:  # Any: a dict[Feature, ...] or one built of str
    """``ValueError`` naming what is wrong when ``features`` uses a name outside ``FEATURES`` or a value outside
    ``SUPPORT`` (a programming error of whoever wrote the table, not bad input)."""
    unknown = sorted(set(features) - FEATURES)
    if unknown:
        raise ValueError(f"{where} name unknown features {unknown}; the catalogue is llamacompat.adapters.base.Feature "
                         f"(add a new feature there, with a comment saying what it means)")
    bad = {name: value for name, value in features.items() if value not in SUPPORT}
    if bad:
        raise ValueError(f"{where} give support values {bad}; each must be one of {sorted(SUPPORT)}")


class Adapter(ABC):
    """One loaded model on one runtime.

    Threads. Two kinds of call, and what the callers (``LocalCore`` under a context, the bridge server) promise:

    - **Serialised**: a generation (``begin``, then ``next_token`` / ``token_to_piece`` / ``is_eog`` /
      ``top_probs`` / ``n_past`` until ``end``, with ``runtime_timings`` after it), ``embedding``, ``rank``,
      ``bench``, ``set_lora``, ``clear_cache``, ``save_session`` / ``load_session`` / ``session_identity``,
      ``model_info`` and ``close``. At most one of them runs at a time (the context's busy lock, the bridge's
      single worker), though not always on the same thread; nothing else of this list runs between ``begin``
      and ``end``. The request building before ``begin`` (tokenize, ``is_eog``) is on the same turn.
    - **Concurrent**: ``tokenize`` and ``detokenize``, and reading the attributes ``load`` set (``n_ctx``,
      ``n_vocab``, ``add_bos``, ``bos_text``, ``eos_text``, ``chat_template``, ``capabilities``, ...), may run
      on another thread at any time between ``load`` and ``close``: beside a generation or any serialised call
      (``LlamaContext.tokenize`` and ``get_formatted_chat``, the bridge's side pool), and beside each other. So
      they read only what ``load`` built (the vocabulary), never per-completion state; ``close`` never overlaps
      them (the context and the bridge hold a lock around it). ``token_to_piece`` and ``is_eog`` are not in
      this list: they may keep per-completion state (see ``token_to_piece``).

    The ``stop`` event given to ``begin`` (and ``bench``) is set from another thread: that is how a
    serialised call is interrupted.
    """

    #: registry name, e.g. "llama_cpp"
    name: ClassVar[str]
    #: init params this backend accepts beyond the common ContextParams
    context_fields: ClassVar[dict[str, Field]] = {}

    # Facts about the loaded model, set by ``load``.
    n_ctx: int
    n_vocab: int
    n_embd: int
    add_bos: bool
    bos_text: str
    eos_text: str
    chat_template: str | None
    capabilities: Capabilities
    #: llama.rn's context attributes: whether a GPU runs the model, why not, and the devices in use
    gpu: bool = False
    reason_no_gpu: str = "GPU backend is not available"
    devices: list[str] = ["CPU"]
    #: sampling params (llama.rn names) the runtime fixes when the model is loaded: a request asking for the
    #: same value gets it silently, another value is warned about as missing
    fixed_sampling: dict[str, Any] = {}

    @classmethod
    @abstractmethod
    def load(cls, params: dict[str, Any], on_progress: Callable[[float], bool] | None) -> "Adapter":
        """Load ``params["model"]`` (a resolved path). ``on_progress(fraction)`` returning False cancels."""

    @classmethod
    def runtime_found(cls) -> bool:
        """Whether the runtime is on this machine. An adapter over a native library imports without it;
        ``installed_builtin_backends`` (the conformance suite's default) lists only backends that have it."""
        return True

    @classmethod
    def backend_devices(cls) -> list[dict[str, Any]]:
        """llama.rn's getBackendDevicesInfo entries for this runtime: backend, type, deviceName, maxMemorySize."""
        return []

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        """Whether ``backend: "auto"`` should pick this adapter for the file."""
        return False

    # -- model description -------------------------------------------------
    @abstractmethod
    def model_info(self) -> dict[str, Any]:
        """llama.rn's ``model`` object: desc, size, nEmbd, nParams, metadata, ..."""

    # -- tokens -------------------------------------------------------------
    @abstractmethod
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        """Tokenize with special tokens parsed; ``add_special`` adds BOS when the vocab wants it."""

    @abstractmethod
    def token_to_piece(self, token: int) -> bytes:
        """The bytes of one token, special tokens rendered as text.

        A runtime that produces text as well as token ids (RKLLM) may return its own text for the token
        ``next_token`` has just returned, the first time it is asked about it: b"" while the runtime holds back
        an incomplete UTF-8 character, then that character's bytes together with the next token's. Every other
        call gives the vocabulary's piece. The engine asks about each generated token once, right after
        ``next_token`` and before ``top_probs`` (whose tokens it renders with this method too).
        """

    @abstractmethod
    def detokenize(self, tokens: list[int]) -> str:
        """Text of a token list."""

    @abstractmethod
    def is_eog(self, token: int) -> bool:
        """Whether ``token`` ends generation (EOS, EOT, ...)."""

    # -- generation ---------------------------------------------------------
    @abstractmethod
    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        """Evaluate ``prompt`` (reusing the cached prefix) and prepare sampling.

        Returns how many prompt tokens came from the cache. Raises
        ``Interrupted`` if ``stop`` is set during evaluation.
        """

    @abstractmethod
    def next_token(self) -> int:
        """Sample the next token (evaluating the previous one first if needed): a token id, or ``END_OF_RUN``.

        An adapter over a runtime that generates by itself may raise ``Interrupted`` when ``stop``
        (from ``begin``) is set while it waits for the token, and returns ``END_OF_RUN`` when the runtime
        ended the answer without a token id. ``NoTokenAllowed`` when a grammar leaves nothing to draw.
        """

    @abstractmethod
    def top_probs(self, n: int) -> list[tuple[int, float]]:
        """The ``n`` most probable tokens at the last sampled position, with probabilities (the engine asks only
        where ``n_probs`` is listed, and never for an end-of-generation token or ``END_OF_RUN``)."""

    @abstractmethod
    def end(self) -> None:
        """Free per-completion state (sampler). Called after every ``begin``."""

    def force_token(self, token: int) -> int:
        """Like ``next_token``, but hand out ``token`` instead of drawing one: the previous token is evaluated as
        usual, and the sampler's state (penalties, a grammar) takes ``token`` as generated. The engine forces
        tokens for a thinking budget; an adapter that cannot declares ``thinking_budget`` missing."""
        raise UnsupportedFeatureError(f"forcing tokens (thinking budgets) is not supported by the {self.name} backend")

    def open_batch(self, n_parallel: int, n_batch: int) -> Any:
        """Parallel mode: an object whose ``sequence(progress)`` gives a fresh ``Adapter`` for one request on one
        of ``n_parallel`` sequences decoded together (``n_batch`` tokens a step), and whose ``close()`` ends it;
        None (the default) where the runtime runs one sequence, so parallel requests take turns on this adapter.
        A batch with ``state_files = True`` also takes llama.rn's per-sequence state files: ``sequence(progress,
        state)``, and ``finish(result)`` on the sequence after the request (llama_cpp_batch's ``BatchEngine``).
        While it is open, the context calls nothing else of this adapter that needs the model."""
        return None

    def set_threads(self, n_threads: int) -> int | None:
        """Evaluate with ``n_threads`` CPU threads from now on (a completion's own ``n_threads``); return the count
        in use before, which the caller restores afterwards, or None where the runtime fixes its threads at load."""
        return None

    def system_info(self) -> str:
        """llama.rn's ``systemInfo``: what the runtime says of the machine it runs on (llama.cpp's
        llama_print_system_info); an adapter without such a report names its backend."""
        return f"{self.name}: no system report from this runtime"

    def runtime_timings(self) -> tuple[float, float] | None:
        """(prompt ms, generation ms) as the runtime measured the completion that just ended, or None to use
        the loop's clock. Asked after ``end``."""
        return None

    @property
    @abstractmethod
    def n_past(self) -> int:
        """Tokens whose KV is in the cache, in order from the start (llama.rn's ``tokens_cached``).

        A sampled token counts once it is evaluated, which happens when the next one is asked for: the last
        token ``next_token`` returned is not counted. So after a completion stopped by ``n_predict`` (or by an
        end-of-generation token) ``n_past == tokens_evaluated + tokens_predicted - 1``, llama.rn's rule; after
        ``n_predict: 0`` it is the prompt's length. A runtime that evaluates the last token anyway (to pipeline
        the next step) drops it from the cache in ``end``, so that what ``n_past`` counts is what the next
        ``begin`` reuses and what ``save_session`` writes.
        """

    # -- multimodal: serialised, but tokenize_media and multimodal_support are concurrent, as tokenize is ----
    def init_multimodal(self, path: str, use_gpu: bool, image_min_tokens: int, image_max_tokens: int) -> None:
        """Load the projector at ``path`` (replacing one loaded before); raises a typed error on failure."""
        raise UnsupportedFeatureError(f"multimodal input is not supported by the {self.name} backend")

    def release_multimodal(self) -> None:
        """Unload the projector (nothing when none is loaded)."""
        return None

    @property
    def multimodal_enabled(self) -> bool:
        return False

    def multimodal_support(self) -> dict[str, bool]:
        """llama.rn's getMultimodalSupport: ``{"vision", "audio"}`` of the loaded projector."""
        return {"vision": False, "audio": False}

    def tokenize_media(self, text: str, media: list[Any], add_special: bool) -> Any:
        """``text`` with one media marker per item of ``media`` (``llamacompat.media.Media``) as one token list
        whose media positions hold negative placeholders (the same for the same medium), with llama.rn's
        tokenize fields: an object with ``tokens``, ``bitmap_hashes``, ``chunk_pos``, ``chunk_pos_media``.
        ``begin`` takes such a list."""
        raise UnsupportedFeatureError(f"multimodal input is not supported by the {self.name} backend")

    # -- other methods ------------------------------------------------------
    def embedding(self, tokens: list[int]) -> list[float]:
        """The pooled embedding of ``tokens`` (not normalised)."""
        raise UnsupportedFeatureError(f"embedding is not supported by the {self.name} backend")

    def rank(self, query: list[int], document: list[int]) -> float:
        """A reranker's relevance score of ``document`` for ``query`` (llama.cpp's rank pooling)."""
        raise UnsupportedFeatureError(f"rerank is not supported by the {self.name} backend")

    def set_lora(self, adapters: list[tuple[str, float]]) -> None:
        """Apply exactly these (path, scale) LoRA adapters, replacing the current set; ``[]`` removes them all.

        A refused file raises with the previous set still applied. The KV cache is emptied on a change,
        since it was computed with other weights.
        """
        raise UnsupportedFeatureError(f"LoRA adapters are not supported by the {self.name} backend")

    @abstractmethod
    def clear_cache(self, clear_data: bool) -> None:
        """Forget the KV cache (``tokens_cached`` becomes 0); ``clear_data`` also zeroes its buffers."""

    def bench(self, pp: int, tg: int, pl: int, nr: int, stop: threading.Event) -> dict[str, Any]:
        """llama.rn's bench result (camelCase keys); ``stop`` set ends it early (``interrupted: True``)."""
        raise UnsupportedFeatureError(f"bench is not supported by the {self.name} backend")

    def timed_bench(self, pp: int, tg: int, pl: int, nr: int, fresh: Callable[[], Callable[[list[int]], None]],
                    settings: dict[str, Any], stop: threading.Event) -> dict[str, Any]:
        """llama.rn's bench over random tokens: ``fresh()`` empties the cache and returns an evaluate function.

        The prompt goes in ``settings["nBatch"]`` tokens at a time, as a completion's prompt does, and
        ``stop`` is looked at between evaluations: once set, the figures are those of the rounds that
        finished, and ``interrupted`` is set.
        """
        if pl != 1:
            raise InvalidParamsError(f"bench: pl must be 1 (this context holds one sequence), got {pl}")
        if pp + tg > self.n_ctx:
            raise InvalidParamsError(f"bench: pp + tg = {pp + tg} exceeds n_ctx {self.n_ctx}")
        if nr > MAX_BENCH_ROUNDS:
            raise InvalidParamsError(f"bench: nr = {nr} is above the limit of {MAX_BENCH_ROUNDS} rounds")
        rng = np.random.default_rng(0)
        t_pp = t_tg = 0.0
        done = 0
        try:
            for _ in range(nr):
                evaluate = fresh()
                prompt, batch = rng.integers(0, self.n_vocab, pp).tolist(), settings["nBatch"]
                start = time.perf_counter()
                for at in range(0, pp, batch):
                    if stop.is_set():
                        raise Interrupted()
                    evaluate(prompt[at:at + batch])
                round_pp = time.perf_counter() - start
                start = time.perf_counter()
                for token in rng.integers(0, self.n_vocab, tg).tolist():
                    if stop.is_set():
                        raise Interrupted()
                    evaluate([token])
                t_tg += time.perf_counter() - start
                t_pp += round_pp
                done += 1
        except Interrupted:
            pass
        t_pp, t_tg = (t_pp / done, t_tg / done) if done else (0.0, 0.0)
        result = {
            "nKvMax": self.n_ctx, **settings, "pp": pp, "tg": tg, "pl": pl, "nKv": pp + tg,
            "tPp": t_pp, "speedPp": pp / t_pp if t_pp else 0.0,
            "tTg": t_tg, "speedTg": tg / t_tg if t_tg else 0.0,
            "t": t_pp + t_tg, "speed": (pp + tg) / (t_pp + t_tg) if t_pp + t_tg else 0.0,
        }
        if done < nr:
            result["interrupted"] = True
        return result

    # -- sessions -----------------------------------------------------------
    def save_session(self, path: str, n_tokens: int) -> int:
        """Write the first ``n_tokens`` cached tokens (all if <= 0) and the state to ``path``; return the count.

        ``path`` is a fresh temporary file: the context makes the write atomic.
        """
        raise UnsupportedFeatureError(f"sessions are not supported by the {self.name} backend")

    def session_media(self, n_tokens: int) -> list[str]:
        """The bitmap hashes of the media a save of ``n_tokens`` keeps, in order, for llama.rn's ``.meta`` sidecar
        (``sessions.media_meta``); [] when it keeps none or cuts one off."""
        return []

    def load_session(self, path: str) -> list[int]:
        """Check and load the session at ``path``; return its tokens.

        Raises ``SessionError`` with the cache exactly as it was before the call.
        """
        raise UnsupportedFeatureError(f"sessions are not supported by the {self.name} backend")

    def session_identity(self) -> dict[str, Any]:
        """Who would write a session: backend, model fingerprint and KV layout (the sidecar's content)."""
        info = self.model_info()
        summary = {key: info.get(key) for key in ("desc", "size", "n_params", "n_embd", "metadata")}
        digest = hashlib.sha256(json.dumps(summary, sort_keys=True, default=str).encode()).hexdigest()
        name = (info.get("metadata") or {}).get("general.name")
        return {"backend": self.name, "model": {"desc": info.get("desc"), "name": name, "fingerprint": digest},
                "layout": {}}

    @abstractmethod
    def close(self) -> None:
        """Free the model and context. Idempotent."""


class BatchSequence(Adapter):
    """The base of the adapter one parallel request runs on (``open_batch(...).sequence()``): what belongs to the
    model (the vocabulary, its facts, capabilities) comes from the context's adapter ``parent``; the subclass does
    the generation on its slot, whose room is ``n_ctx``."""

    def __init__(self, parent: Adapter, n_ctx: int) -> None:
        self._parent = parent
        self.n_ctx, self.n_vocab, self.n_embd = n_ctx, parent.n_vocab, parent.n_embd
        self.add_bos, self.bos_text, self.eos_text = parent.add_bos, parent.bos_text, parent.eos_text
        self.chat_template, self.capabilities = parent.chat_template, parent.capabilities
        self.fixed_sampling = parent.fixed_sampling

    @classmethod
    def load(cls, params: dict[str, Any], on_progress: Callable[[float], bool] | None) -> "BatchSequence":
        raise TypeError("a parallel request's adapter comes from open_batch(...).sequence(), not from load")

    def model_info(self) -> dict[str, Any]:
        return self._parent.model_info()

    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self._parent.tokenize(text, add_special)

    def token_to_piece(self, token: int) -> bytes:
        return self._parent.token_to_piece(token)

    def detokenize(self, tokens: list[int]) -> str:
        return self._parent.detokenize(tokens)

    def is_eog(self, token: int) -> bool:
        return self._parent.is_eog(token)
