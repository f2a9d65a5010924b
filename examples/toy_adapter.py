"""A complete adapter in pure Python: a toy bigram "model" that passes the conformance suite.

Read it beside docs/writing-an-adapter.md. The "model file" is any UTF-8 text file: its words become the
vocabulary (with the 256 bytes, so any text round-trips) and its bigram counts become the weights. There is
no native runtime, so everything a runtime would do (tokenizer, KV cache, sampler) is written out here,
small. Importing it registers the backend 'toy'; running it checks it:

    python examples/toy_adapter.py [/tmp/dragon.txt]   # the conformance report (the file is written if absent)
    PYTHONPATH=examples pytest -p toy_adapter --pyargs llamacompat.conformance \
        --llamacompat-backend toy --llamacompat-param model=/tmp/dragon.txt    # the same checks as pytest tests
"""

from __future__ import annotations

import hashlib
import os
import re
import struct
import tempfile
import threading
import time
from collections import Counter
from typing import Any, Callable

import numpy as np

from llamacompat.adapters.base import Adapter, Capabilities, Interrupted, SamplingParams, reusable_prefix
from llamacompat.errors import InvalidParamsError, ModelLoadError, SessionError
from llamacompat.registry import register_adapter
from llamacompat.sessions import check_header, read_header
from llamacompat.sessions.ggsn import MAGIC

BOS, EOS = 0, 1  # token ids; then the 256 bytes (2..257), then the corpus's words
SPECIAL = {"<s>": BOS, "</s>": EOS}
N_CTX_TRAIN = 4096  # what n_ctx=0 means: "the model's training context"
N_EMBD = 32
MAX_WORDS = 2000  # the table is n_vocab x n_vocab floats: 2258 tokens at most, 41 MB
STEP_S = 0.001  # a forward pass costs time on a real runtime; this lets stop_completion land mid-run here too
SESSION_VERSION = 1


class ToyAdapter(Adapter):
    name = "toy"

    @classmethod
    def can_load(cls, model_path: str) -> bool:
        return model_path.endswith(".txt")  # asked by backend "auto" (for adapters with an entry point)

    @classmethod
    def load(cls, params: dict[str, Any], on_progress: Callable[[float], bool] | None) -> "ToyAdapter":
        path = params["model"]  # already resolved to a path; every other init param is validated, defaults filled
        try:
            with open(path, encoding="utf-8") as f:
                corpus = f.read()
        except (OSError, UnicodeError) as err:  # a load failure is always ModelLoadError, saying what and why
            raise ModelLoadError(f"Failed to load model: {path}: {err}") from err
        if on_progress is not None and on_progress(0.5) is False:
            raise ModelLoadError(f"Failed to load model: {path}: loading was cancelled by on_progress")
        return cls(path, corpus, params)

    def __init__(self, path: str, corpus: str, params: dict[str, Any]) -> None:
        # -- the vocabulary: special tokens, every byte, then each word of the corpus (with its leading space)
        self._pieces = [b"<s>", b"</s>", *(bytes([b]) for b in range(256))]
        words = Counter(w for w in re.findall(r" ?[A-Za-z]+", corpus) if len(w) > 1).most_common(MAX_WORDS)
        self._pieces += sorted(w.encode() for w, _ in words)
        self._ids = {piece: i for i, piece in enumerate(self._pieces) if i > EOS}  # specials are parsed apart
        self._longest = max(map(len, self._pieces))
        self.n_vocab, self.n_embd = len(self._pieces), N_EMBD
        self.n_ctx = params["n_ctx"] or N_CTX_TRAIN
        self._n_batch = min(params["n_batch"], self.n_ctx)  # n_threads: pure Python has one thread, 0 or not
        self.add_bos, self.bos_text, self.eos_text = True, "<s>", "</s>"
        self.chat_template = None  # the context then formats chats as chatml
        self._info = {
            "desc": f"toy bigram {os.path.basename(path)}", "size": len(corpus.encode()), "n_embd": N_EMBD,
            "n_params": self.n_vocab * (self.n_vocab + N_EMBD), "n_ctx_train": N_CTX_TRAIN,
            "is_recurrent": False, "is_hybrid": False,
            "metadata": {"general.architecture": "toy", "general.name": os.path.splitext(os.path.basename(path))[0],
                         "toy.corpus.sha256": hashlib.sha256(corpus.encode()).hexdigest()},  # values are strings
        }
        # -- the weights (skipped with vocab_only: a tokenizer-only context)
        self._table = self._vectors = None
        if not params["vocab_only"]:
            self._table = self._bigram_logprobs(corpus)
            self._vectors = np.random.default_rng(0).standard_normal((self.n_vocab, N_EMBD))
        self._pooling = params["pooling_type"] or "mean"
        if self._pooling not in ("mean", "cls", "last", "none"):
            raise InvalidParamsError(f"init_llama: the toy backend pools embeddings as mean, cls, last or none; "
                                     f"got {self._pooling!r} (it has no reranking head)")
        # -- the "KV cache": the evaluated tokens, and a running hash of the context after each of them
        self._tokens: list[int] = []
        self._states: list[int] = []
        self._pending: int | None = None  # sampled, not evaluated yet (not counted in n_past)
        self._sampling = SamplingParams()
        self._rng = np.random.default_rng()
        self._logits = np.zeros(0)
        has_model, embedding = self._table is not None, self._table is not None and params["embedding"]
        on = lambda flag, level="native": level if flag else "missing"  # noqa: E731
        self.capabilities = Capabilities(self.name, {
            "completion": on(has_model), "streaming": on(has_model), "stop": on(has_model, "emulated"),
            "tokenize": "native", "detokenize": "native", "chat_template": "emulated",
            "temperature": "native", "top_k": "native", "top_p": "native", "min_p": "native", "seed": "native",
            "logit_bias": "native", "ignore_eos": "native", "n_probs": "native",
            "typical_p": "missing", "xtc": "missing", "top_n_sigma": "missing", "penalties": "missing",
            "mirostat": "missing", "dry": "missing", "grammar": "missing", "lazy_grammar": "missing",
            "embedding": on(embedding), "rerank": on(embedding, "emulated"),  # the context ranks by cosine
            "session": on(has_model), "prefix_cache": on(has_model), "interrupt_prompt": on(has_model),
            "lora": "missing", "bench": "missing",
            "parallel": on(has_model, "emulated"),  # one sequence: parallel requests take turns
        })

    def _bigram_logprobs(self, corpus: str) -> np.ndarray:
        """log P(next | previous), counted over the corpus's paragraphs, smoothed towards unigram frequencies."""
        counts = np.zeros((self.n_vocab, self.n_vocab))
        for paragraph in filter(None, (p.strip() for p in corpus.split("\n\n"))):
            tokens = [*self.tokenize(paragraph, True), EOS]
            np.add.at(counts, (tokens[:-1], tokens[1:]), 1)
        unigram = (counts.sum(axis=0) + 0.01) / (counts.sum() + 0.01 * self.n_vocab)
        return np.log((counts + 2.0 * unigram) / (counts.sum(axis=1, keepdims=True) + 2.0))

    def model_info(self) -> dict[str, Any]:
        return dict(self._info)

    # -- tokens: may run on another thread beside a completion, so they touch no generation state
    def tokenize(self, text: str, add_special: bool) -> list[int]:
        ids = [BOS] if add_special and self.add_bos else []
        for part in re.split("(<s>|</s>)", text):  # special tokens written in the text are parsed
            if part in SPECIAL:
                ids.append(SPECIAL[part])
                continue
            data, at = part.encode(), 0
            while at < len(data):  # longest match first; every single byte is a token, so this always ends
                size = min(self._longest, len(data) - at)
                while data[at:at + size] not in self._ids:
                    size -= 1
                ids.append(self._ids[data[at:at + size]])
                at += size
        return ids

    def token_to_piece(self, token: int) -> bytes:
        return self._pieces[token]  # may be part of a UTF-8 character: the engine decodes incrementally

    def detokenize(self, tokens: list[int]) -> str:
        return b"".join(self._pieces[t] for t in tokens).decode("utf-8", "replace")

    def is_eog(self, token: int) -> bool:
        return token == EOS

    # -- generation: begin evaluates the prompt, next_token samples one token at a time, end cleans up
    def _evaluate(self, tokens: list[int]) -> None:
        """One forward pass: put ``tokens`` in the cache (each state hashes the whole context so far)."""
        time.sleep(STEP_S)
        for token in tokens:
            self._states.append(((self._states[-1] if self._states else 0) * 1_000_003 + token + 1) % 2**63)
            self._tokens.append(token)

    def begin(self, prompt: list[int], sampling: SamplingParams, stop: threading.Event) -> int:
        self._sampling, self._pending = sampling, None
        self._rng = np.random.default_rng(sampling.seed if sampling.seed >= 0 else None)  # -1: a random seed
        reuse = reusable_prefix(self._tokens, prompt)  # never the last prompt token: its logits are needed
        del self._tokens[reuse:], self._states[reuse:]
        for start in range(reuse, len(prompt), self._n_batch):  # a batch at a time, looking at stop in between
            if stop.is_set():
                raise Interrupted(reuse)
            self._evaluate(prompt[start:start + self._n_batch])
        return reuse

    def next_token(self) -> int:
        if self._pending is not None:  # the token sampled last time goes into the cache only now
            self._evaluate([self._pending])
        # A real model's logits depend on the whole context; here the bigram table plus noise drawn from the
        # context's hash: deterministic for a given context, and a greedy text that does not loop.
        noise = np.random.default_rng(self._states[-1]).standard_normal(self.n_vocab)
        self._logits = self._table[self._tokens[-1]] + noise
        self._pending = self._sample(self._logits.copy(), self._sampling)
        return self._pending

    def _sample(self, logits: np.ndarray, s: SamplingParams) -> int:
        for token, bias in s.logit_bias:
            logits[token] += bias
        if s.ignore_eos:
            logits[EOS] = -np.inf
        if s.temperature <= 0:
            return int(np.argmax(logits))
        probs = _softmax(logits)
        keep = probs > 0
        if s.top_k > 0:
            keep &= probs >= np.sort(probs)[-min(s.top_k, self.n_vocab)]
        if s.top_p < 1.0:  # the most likely tokens whose probabilities add up to top_p
            order = np.argsort(-probs)
            keep[order[np.searchsorted(np.cumsum(probs[order]), s.top_p) + 1:]] = False
        if s.min_p > 0.0:
            keep &= probs >= s.min_p * probs.max()
        weights = np.where(keep, _softmax(logits / s.temperature), 0.0)
        return int(self._rng.choice(self.n_vocab, p=weights / weights.sum()))

    def top_probs(self, n: int) -> list[tuple[int, float]]:
        probs = _softmax(self._logits)  # the model's own distribution, before the sampler's changes
        top = np.argsort(-probs)[:n]
        return [(int(t), float(probs[t])) for t in top]

    def end(self) -> None:
        self._pending = None  # the last sampled token is never evaluated: n_past does not count it

    @property
    def n_past(self) -> int:
        return len(self._tokens)

    def clear_cache(self, clear_data: bool) -> None:
        self._tokens, self._states, self._pending = [], [], None

    def embedding(self, tokens: list[int]) -> list[float]:
        vectors = self._vectors[tokens]
        pooled = {"mean": vectors.mean(axis=0), "cls": vectors[0]}.get(self._pooling, vectors[-1])
        return pooled.tolist()  # not normalised: the context applies embd_normalize

    # -- sessions: llama.cpp's ggsn layout (header, tokens, architecture name); the toy's KV is recomputed.
    # The context writes through a temporary file and renames it, and checks the sidecar (checksum, model).
    def save_session(self, path: str, n_tokens: int) -> int:
        tokens = self._tokens[:n_tokens] if n_tokens > 0 else list(self._tokens)
        with open(path, "wb") as f:
            f.write(struct.pack("<III", MAGIC, SESSION_VERSION, len(tokens)) + np.asarray(tokens, "<i4").tobytes()
                    + struct.pack("<I", 3) + b"toy")
        return len(tokens)

    def load_session(self, path: str) -> list[int]:
        header = read_header(path)  # SessionError for a foreign, truncated or damaged file...
        check_header(header, path, version=SESSION_VERSION, capacity=self.n_ctx, n_vocab=self.n_vocab, arch="toy")
        if header.state_size != 4 + 3:
            raise SessionError(f"Failed to load session: {path}: {header.state_size - 7} unexpected bytes after the tokens")
        self.clear_cache(False)  # ...all checked before the cache changes
        self._evaluate(header.tokens)
        return list(header.tokens)

    def close(self) -> None:
        self._table = self._vectors = None  # idempotent, never raises


def _softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max())
    return shifted / shifted.sum()


register_adapter("toy", ToyAdapter)  # for this process; a package declares an entry point instead (see the doc)

CORPUS = """Here is a long story about a dragon who learns to bake bread. Once upon a time, a small green dragon
lived in a cave above the village. Every morning the baker opened her shop, and the smell of warm bread rose
up the hill.

The dragon wanted to bake bread too. She asked the baker to teach her, and the baker said yes. They mixed flour,
water, salt and yeast, and the dragon warmed the oven with her breath. The first loaf was burnt, the second was
raw, and the third was perfect.

The three primary colours are red, yellow and blue. Mixing red and yellow gives orange, and blue and yellow
give green. A list of fruit: apple, pear, plum, cherry, banana, mango, grape, kiwi, lemon and lime.

Now the village eats the dragon's bread every day, and children bring her apples and plums as a thank you."""

if __name__ == "__main__":
    import sys

    from llamacompat.cli import main

    with tempfile.TemporaryDirectory() as folder:
        # the model: a path given on the command line (written with CORPUS if it is absent), else a temporary file
        model = sys.argv[1] if len(sys.argv) > 1 else os.path.join(folder, "dragon.txt")
        if not os.path.exists(model):
            with open(model, "w", encoding="utf-8") as f:
                f.write(CORPUS)
        # `llamacompat conformance` as a command finds a backend by its entry point; here it runs in this process
        code = main(["conformance", "--backend", "toy", "--param", f"model={model}"])
    print("toy: every conformance check passed (or n/a)" if code == 0 else "toy: a conformance check failed")
    raise SystemExit(code)
