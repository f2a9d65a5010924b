"""MLX through mlx-lm: GGUF files (the very file llama.cpp runs) and mlx-lm model folders.

The decode loop is ours rather than ``mlx_lm.generate_step``: it keeps the same
pipelining (the next step is queued with ``mx.async_eval`` before the current
token is handed out), and adds what the adapter protocol needs and
``generate_step`` cannot give: the raw logits of each step (for ``n_probs``),
logits processors that see the whole history (the cached prefix included),
a stop check between prefill chunks, and an exact count of what the KV cache holds.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Generator

from ...errors import BackendUnavailableError, InvalidParamsError, ModelLoadError, SessionError, UnsupportedFeatureError, map_exceptions
from ...models.gguf import load_model_info
from ..base import RUNTIME_FAILURES, Adapter, Capabilities, Interrupted, SamplingParams, reusable_prefix

try:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache, trim_prompt_cache
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise BackendUnavailableError("the mlx backend needs mlx and mlx-lm: pip install 'llamacompat[mlx]'") from err

from ...grammars.guidance import Guide
from ...vocab import Vocab, read_tokenizer_files, vocab_from_gguf
from .gguf import load_gguf, meta_value, model_from_gguf
from .grammar import GrammarMask, token_table
from .lora import apply_lora, read_lora
from .sampling import Sampling, token_id

if TYPE_CHECKING:
    from llguidance import LLTokenizer

__all__ = ["MlxAdapter"]

MULTIMODAL_MISSING = ("mlx-lm runs text models only (vision models are mlx-vlm's, a separate runtime with its own model classes)")

SESSION_FORMAT = "llamacompat-mlx-session/1"
_POOLING = ("mean", "cls", "last", "none")


class MlxAdapter(Adapter):
    name = "mlx"

    @classmethod
    def backend_devices(cls) -> list[dict[str, Any]]:
        gpu = mx.default_device() == mx.gpu
        memory = mx.metal.device_info().get("memory_size", 0) if gpu else os.sysconf("SC_PAGE_SIZE") * os.sysconf(
            "SC_PHYS_PAGES")
        return [{"backend": "mlx", "type": "gpu" if gpu else "cpu", "deviceName": str(mx.default_device()),
                 "maxMemorySize": int(memory)}]

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return os.path.isfile(os.path.join(model_path, "config.json")) or model_path.lower().endswith(".gguf")

    @classmethod
    def load(cls, params: dict[str, Any], on_progress: Callable[[float], bool] | None) -> "MlxAdapter":
        path = params["model"]
        report = on_progress or (lambda _fraction: True)

        def step(fraction: float) -> None:
            if report(fraction) is False:
                raise ModelLoadError(f"Failed to load model: {path}: loading was cancelled by on_progress")

        step(0.0)
        if os.path.isdir(path):
            model, vocab, template, info = _load_folder(path)
        elif os.path.isfile(path):
            tensors, meta = load_gguf(path)
            step(0.3)
            vocab = vocab_from_gguf(meta, path)
            model = model_from_gguf(tensors, meta, path)
            template = meta.get("tokenizer.chat_template")
            info = {"desc": _gguf_desc(meta), "size": os.path.getsize(path), "metadata": load_model_info(path),
                    "n_ctx_train": meta_value(meta, "llama.context_length", 0)}
        else:
            raise ModelLoadError(f"Failed to load model: no such file or folder: {path}")
        step(0.8)
        adapter = cls(model, vocab, template, info, params)
        adapter._warm_up()
        step(0.95)
        return adapter

    def __init__(self, model: Any, vocab: Vocab, template: str | None, info: dict[str, Any], params: dict[str, Any]) -> None:
        self._model = model
        self._vocab = vocab
        self._info = info
        # counted once: model_info() also serves every session save and load (the model fingerprint)
        flat: list[tuple[str, mx.array]] = tree_flatten(model.parameters())  # type: ignore[assignment]  # a list without destination
        self._n_params = sum(v.size for _, v in flat)
        self.n_vocab = vocab.size
        self.n_embd = model.args.hidden_size
        self.n_ctx = params["n_ctx"] or info.get("n_ctx_train") or 4096
        self._n_batch = max(1, min(params["n_batch"], self.n_ctx))
        self.add_bos = vocab.add_bos
        self.bos_text = vocab.pieces[vocab.bos].decode("utf-8", "replace") if vocab.bos is not None else ""
        self.eos_text = vocab.pieces[vocab.eos].decode("utf-8", "replace") if vocab.eos is not None else ""
        self.chat_template = template
        self.embedding_enabled = params["embedding"]
        self.gpu = mx.default_device() == mx.gpu  # Metal, on Apple silicon
        self.devices = [str(mx.default_device())]
        self.reason_no_gpu = "" if self.gpu else "GPU backend is not available (MLX runs on the CPU here)"
        pooling = params.get("pooling_type") or "mean"
        if pooling not in _POOLING:
            raise InvalidParamsError(f"init_llama: the mlx backend pools embeddings as {', '.join(_POOLING)}; got {pooling!r}")
        self._pooling = pooling
        self._n_logits = int(model.model.embed_tokens.weight.shape[0])
        self._eog = vocab.eog
        self._table: LLTokenizer | None = None  # llguidance's tokenizer, built on the first grammar
        self._table_lock = threading.Lock()
        self._cache = make_prompt_cache(model)
        self._lora_files: dict[str, Any] = {}  # path -> read_lora(path)
        self._lora_bases: dict[str, Any] = {}  # module path -> the layer a LoRA stack wraps
        self._tokens: list[int] = []  # what the KV cache holds, in order
        self._steps: Generator[tuple[int, mx.array], None, None] | None = None
        self._handed = False  # whether the last token next_token gave is in the cache (pipelined) but not counted
        self._last_logits: mx.array | None = None
        self.capabilities = Capabilities(self.name, {
            "completion": "native", "streaming": "native", "stop": "emulated", "grammar": "emulated", "lazy_grammar": "emulated",
            "temperature": "native", "top_k": "native", "top_p": "native", "min_p": "native", "xtc": "native",
            "top_n_sigma": "emulated", "penalties": "emulated", "logit_bias": "emulated", "ignore_eos": "emulated",
            "typical_p": "missing", "mirostat": "missing", "dry": "missing",
            "seed": "native", "n_probs": "native", "tokenize": "native", "detokenize": "native",
            "embedding": "native" if self.embedding_enabled else "missing", "bench": "native",
            "rerank": "emulated" if self.embedding_enabled else "missing", "lora": "emulated",
            "interrupt_prompt": "native", "chat_template": "emulated", "session": "native", "prefix_cache": "native",
            "parallel": "native",  # requests decoded together by mlx-lm's BatchGenerator (batch.py)
            "multimodal": "missing",  # MULTIMODAL_MISSING says why
        })

    def init_multimodal(self, path: str, use_gpu: bool, image_min_tokens: int, image_max_tokens: int) -> None:
        raise UnsupportedFeatureError(f"multimodal input is not supported by the {self.name} backend: {MULTIMODAL_MISSING}")

    def _warm_up(self) -> None:
        """Run one step with greedy and default sampling: the CPU backend compiles kernels with g++ on first use."""
        for temperature in (0.0, SamplingParams.temperature):
            cache = make_prompt_cache(self._model)
            logits = self._model(mx.array([[self._vocab.bos or 0]]), cache=cache)[:, -1, :]
            sampling = Sampling(SamplingParams(temperature=temperature), self._n_logits, self.n_ctx, self._eog, [])
            mx.eval(sampling.sample(logits))

    # -- model description -------------------------------------------------
    def model_info(self) -> dict[str, Any]:
        return {"desc": self._info["desc"], "size": self._info["size"], "n_embd": self.n_embd, "n_params": self._n_params,
                "n_ctx_train": self._info.get("n_ctx_train", 0), "is_recurrent": False, "is_hybrid": False,
                "metadata": dict(self._info["metadata"])}

    # -- tokens -------------------------------------------------------------
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        return self._vocab.encode(text, add_special)

    def token_to_piece(self, token: int) -> bytes:
        return self._vocab.pieces[token]

    def detokenize(self, tokens: list[int]) -> str:
        return self._vocab.decode(tokens)

    def is_eog(self, token: int) -> bool:
        return token in self._eog

    # -- generation ---------------------------------------------------------
    def _failures(self, what: str) -> ContextManager[None]:
        """An MLX failure as a typed error (``RUNTIME_FAILURES``). What the cache holds after one is unknown
        (the offset moves before the lazy arrays are computed), so it is emptied: the next completion works."""
        return map_exceptions(RUNTIME_FAILURES, f"the mlx backend failed while {what}", reset=self._drop_generation)

    def _drop_generation(self) -> None:
        self._steps, self._handed = None, False
        self.clear_cache(False)

    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        self._handed = False
        grammar = self.grammar_mask(sampling)  # grammar errors before any work
        with self._failures("evaluating the prompt"):
            if sampling.seed >= 0:
                mx.random.seed(sampling.seed)
            chain = Sampling(sampling, self._n_logits, self.n_ctx, self._eog, prompt, grammar)
            reuse = reusable_prefix(self._tokens, prompt)
            self._rewind(reuse)
            try:
                first = self._prefill(prompt[reuse:], chain, stop)
            except Interrupted as err:
                err.cache_n = reuse
                raise
        self._steps = self._run(first, chain)
        return reuse

    def grammar_mask(self, sampling: SamplingParams) -> GrammarMask | None:
        """The request's grammar as a logits mask (None without one); a bad grammar raises here."""
        if sampling.grammar is None:
            return None
        with self._table_lock:  # parallel requests may ask at once: llguidance's table is built once
            if self._table is None:
                self._table = token_table(self._vocab, self._eog)
        guide = Guide(self._table, sampling.grammar, self._n_logits, lazy=sampling.grammar_lazy,
                      triggers=sampling.grammar_triggers, piece=self.token_to_piece,
                      tokenize=lambda text: self._vocab.encode(text, False))
        self.last_guide = guide  # for bench/bench_grammar.py's figures
        return GrammarMask(guide, self._n_logits, sampling.banned(self._eog), self._eog)

    def _rewind(self, keep: int) -> None:
        if keep < len(self._tokens):
            trim_prompt_cache(self._cache, len(self._tokens) - keep)
            del self._tokens[keep:]

    def _step(self, inputs: mx.array, chain: Sampling, sampled: mx.array | None) -> tuple[mx.array, mx.array]:
        """Queue one forward pass and draw: (next token, raw logits), both lazy."""
        logits = self._model(inputs[None], cache=self._cache)[:, -1, :]
        return chain.sample(chain.process(logits, sampled)), logits

    def _prefill(self, todo: list[int], chain: Sampling, stop: threading.Event) -> tuple[mx.array, mx.array]:
        """Evaluate the prompt a chunk at a time (checking ``stop`` between chunks) and draw the first token."""
        for start in range(0, len(todo) - 1, self._n_batch):  # all but the last token
            if stop.is_set():
                raise Interrupted()
            chunk = todo[start:min(start + self._n_batch, len(todo) - 1)]
            self._model(mx.array([chunk]), cache=self._cache)
            mx.eval([c.state for c in self._cache])
            self._tokens.extend(chunk)
        if stop.is_set():
            raise Interrupted()
        first = self._step(mx.array(todo[-1:]), chain, None)
        mx.eval(first)
        self._tokens.append(todo[-1])
        return first

    def _run(self, first: tuple[mx.array, mx.array], chain: Sampling) -> Generator[tuple[int, mx.array], None, None]:
        """Tokens with the logits they were drawn from; each step is queued before the previous token is handed
        out, so the token handed out is already in the KV cache (``end`` takes the last one out again)."""
        token, logits = first
        tokens = self._tokens
        while True:
            chain.check()  # ``token`` was drawn from a mask that allowed nothing: never hand it out or accept it
            following = self._step(token, chain, token)  # puts ``token`` in the KV cache
            mx.async_eval(following[0])
            value = token_id(token)
            tokens.append(value)
            yield value, logits
            token, logits = following

    def next_token(self) -> int:
        assert self._steps is not None, "next_token before begin"
        self._handed = False  # asking for the next token evaluates the last one (llama.cpp's order too)
        with self._failures("generating"):
            value, self._last_logits = next(self._steps)
        self._handed = True
        return value

    def top_probs(self, n: int) -> list[tuple[int, float]]:
        assert self._last_logits is not None, "top_probs before next_token"
        with self._failures("computing probabilities"):
            logits = self._last_logits[0].astype(mx.float32)
            n = min(n, self.n_vocab)
            top = mx.argpartition(-logits, kth=n - 1)[:n]
            probs = mx.softmax(logits)[top]
            order = mx.argsort(-probs)
            ids: list[int] = top[order].tolist()  # type: ignore[assignment]  # a 1-d array: a list of ints
            values: list[float] = probs[order].tolist()  # type: ignore[assignment]
        return [(int(t), float(p)) for t, p in zip(ids, values, strict=True)]

    def end(self) -> None:
        if self._steps is not None:
            self._steps.close()
            self._steps = None
        if self._handed:  # the last token handed out was pipelined into the cache: n_past does not count it
            self._handed = False
            self._rewind(len(self._tokens) - 1)

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    def open_batch(self, n_parallel: int, n_batch: int) -> Any:
        from .batch import MlxBatch  # mlx-lm's batched generation, loaded only for parallel mode

        self.end()
        return MlxBatch(self, n_parallel, n_batch)

    def set_lora(self, adapters: list[tuple[str, float]]) -> None:
        files = [path for path, _ in adapters]
        loaded = [(*self._lora_file(path), scale) for path, scale in adapters]  # every file read before any change
        self._lora_bases = apply_lora(self._model, self._lora_bases, loaded, files)
        self.clear_cache(False)

    def _lora_file(self, path: str) -> tuple[Any, float]:
        if path not in self._lora_files:
            self._lora_files[path] = read_lora(path)
        return self._lora_files[path]

    def clear_cache(self, clear_data: bool) -> None:
        self._cache, self._tokens = make_prompt_cache(self._model), []  # a fresh cache holds no data either

    # -- embeddings and bench ----------------------------------------------
    def embedding(self, tokens: list[int]) -> list[float]:
        hidden = self._model.model(mx.array([tokens]))[0].astype(mx.float32)  # final-norm states, no KV cache
        pooled = {"mean": lambda: hidden.mean(axis=0), "cls": lambda: hidden[0]}.get(self._pooling, lambda: hidden[-1])()
        return pooled.tolist()

    def bench(self, pp: int, tg: int, pl: int, nr: int, stop: threading.Event) -> dict[str, Any]:
        def fresh() -> Callable[[list[int]], None]:  # a cache of its own: the context's stays as it is
            cache = make_prompt_cache(self._model)
            return lambda tokens: mx.eval(self._model(mx.array([tokens]), cache=cache))

        return self.timed_bench(pp, tg, pl, nr, fresh, {
            "nBatch": self._n_batch, "nUBatch": self._n_batch, "flashAttn": 0, "isPpShared": 0, "nGpuLayers": 0,
            "nThreads": 0, "nThreadsBatch": 0,
        }, stop)

    # -- sessions: mlx-lm's prompt cache with our header -------------------
    def save_session(self, path: str, n_tokens: int) -> int:
        tokens = self._tokens[:n_tokens] if n_tokens > 0 else list(self._tokens)
        cache = make_prompt_cache(self._model)
        for mine, copy in zip(self._cache, cache, strict=True):
            keys, values, _offset = mine.state
            if keys is not None:
                copy.state = (keys[..., : len(tokens), :], values[..., : len(tokens), :], len(tokens))
        header = {"format": SESSION_FORMAT, "backend": self.name,
                  "model": self.session_identity()["model"]["fingerprint"], "tokens": json.dumps(tokens)}
        with open(path, "wb") as out:  # a file object: mlx would append ".safetensors" to a name
            save_prompt_cache(out, cache, header)  # type: ignore[arg-type]  # the stub says str; mx.save_safetensors takes a file
        return len(tokens)

    def load_session(self, path: str) -> list[int]:
        with tempfile.TemporaryDirectory() as folder:  # mlx-lm picks the reader by the file's extension
            link = os.path.join(folder, "session.safetensors")
            os.symlink(os.path.abspath(path), link)
            try:
                cache, header = load_prompt_cache(link, return_metadata=True)
            except Exception as err:  # a foreign or damaged file: MLX raises RuntimeError/ValueError/KeyError
                raise SessionError(f"Failed to load session: {path}: not an mlx session file ({err})") from None
        if header.get("format") != SESSION_FORMAT or header.get("backend") != self.name:
            raise SessionError(f"Failed to load session: {path}: not an mlx session file "
                               f"(format {header.get('format')!r}, backend {header.get('backend')!r})")
        if header.get("model") != self.session_identity()["model"]["fingerprint"]:
            raise SessionError(f"Failed to load session: {path}: it was saved with another model")
        try:
            tokens = [int(t) for t in json.loads(header["tokens"])]
        except (KeyError, TypeError, ValueError):
            raise SessionError(f"Failed to load session: {path}: its token list is damaged") from None
        held = getattr(cache[0], "offset", len(tokens)) if cache else 0
        if len(cache) != len(self._cache) or held != len(tokens):
            raise SessionError(f"Failed to load session: {path}: its KV state holds {held} tokens for a list of {len(tokens)}")
        if len(tokens) > self.n_ctx:
            raise SessionError(f"Failed to load session: {path}: it holds {len(tokens)} tokens, more than n_ctx {self.n_ctx}")
        self._cache, self._tokens = cache, tokens
        return list(tokens)

    def close(self) -> None:
        self.end()
        self._model = None
        self._cache = []


def _gguf_desc(meta: dict[str, Any]) -> str:
    """A description like llama.cpp's ``llama_model_desc``: architecture, size label, file type."""
    parts = [str(meta.get("general.architecture", "?")), str(meta.get("general.size_label", ""))]
    return " ".join(p for p in parts if p) + " (mlx)"


def _load_folder(path: str) -> tuple[Any, Vocab, str | None, dict[str, Any]]:
    """An mlx-lm model folder: config.json, safetensors weights, tokenizer files."""
    try:
        from mlx_lm.utils import load_model
    except ImportError as err:  # pragma: no cover
        raise BackendUnavailableError(f"the mlx backend cannot load folders: {err}") from err
    try:
        model, config = load_model(Path(path))
    except (ValueError, FileNotFoundError, KeyError) as err:
        raise ModelLoadError(f"Failed to load model: {path}: mlx-lm cannot load this folder ({err})") from err
    files = read_tokenizer_files(path)
    vocab, template = files.vocab, files.chat_template
    size = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))
    metadata = {f"config.{k}": json.dumps(v) if not isinstance(v, str) else v for k, v in sorted(config.items())}
    info = {"desc": f"{config.get('model_type', '?')} (mlx folder)", "size": size, "metadata": metadata,
            "n_ctx_train": int(config.get("max_position_embeddings") or 0)}
    return model, vocab, template, info

