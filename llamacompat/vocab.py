"""A vocabulary outside llama.cpp: a ``tokenizers.Tokenizer`` plus llama.cpp's token facts.

For backends whose runtime has no tokenizer of its own that we can call (mlx,
rkllm). A GGUF file carries its tokenizer as metadata (``tokenizer.ggml.*``); we
rebuild it with the ``tokenizers`` library so that ``tokenize`` gives llama.cpp's
ids (``transformers``' own GGUF loader needs torch). A model folder brings a
Hugging Face ``tokenizer.json`` that ``tokenizers`` reads as it is. Either way the
bytes of each token (``pieces``), the end-of-generation set and BOS handling
follow llama.cpp's rules, so every backend streams the same text.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import BackendUnavailableError, ModelLoadError
from .models.gguf import meta_value

try:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
except ImportError as err:  # pragma: no cover - the mlx and rkllm extras install it
    raise BackendUnavailableError("this backend needs tokenizers: pip install 'llamacompat[mlx]' or "
                                  "'llamacompat[rkllm]'") from err

__all__ = ["Vocab", "TokenizerFiles", "vocab_from_gguf", "vocab_from_tokenizer", "read_tokenizer_files"]

# llama.cpp's pre-tokenizer regexes (src/llama-vocab.cpp), by ``tokenizer.ggml.pre``.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# name -> (regexes applied in turn, ignore_merges: a word found whole in the vocab is one token)
_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool]] = {
    **dict.fromkeys(("default", "gpt-2", "gpt2", "olmo", "mpt", "jais", "roberta-bpe"), ((_GPT2,), False)),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"),
                    ((r"\p{N}", _GPT2), False)),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "pixtral"), ((_LLAMA3,), True)),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2"), ((_QWEN2,), False)),
}

# Token texts llama.cpp treats as end of generation (llama_vocab::impl::load), plus its FIM pad/repo/sep names.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<end_of_turn>", "<|endoftext|>",
    "<|eom_id|>", "<EOT>", "_<EOT>", "<|end_of_text|>", "<end_of_utterance>",
    "<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>",
    "<reponame>", "<|file_sep|>",
})
# GGUF token types (llama_token_type) that matter here
_NORMAL, _CONTROL, _USER_DEFINED = 1, 3, 4


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet, inverted: the printable stand-in character -> the byte it encodes."""
    visible = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes, extra = list(visible), 0
    for byte in range(256):
        if byte not in visible:
            visible.append(byte)
            codes.append(256 + extra)
            extra += 1
    return {chr(code): byte for byte, code in zip(visible, codes, strict=True)}


_BYTE_OF = _byte_decoder()


@dataclass
class Vocab:
    tokenizer: Tokenizer
    pieces: list[bytes]  # what each token prints, special tokens as their text (llama.cpp's token_to_piece)
    eog: frozenset[int]
    bos: int | None
    eos: int | None
    add_bos: bool

    @property
    def size(self) -> int:
        return len(self.pieces)

    def encode(self, text: str, add_special: bool) -> list[int]:
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if add_special and self.add_bos and self.bos is not None:
            ids.insert(0, self.bos)
        return ids

    def decode(self, tokens: Iterable[int]) -> str:
        pieces = self.pieces
        return b"".join(pieces[token] for token in tokens).decode("utf-8", "replace")


def _piece(text: str, byte_level: bool) -> bytes:
    if byte_level:
        try:
            return bytes(_BYTE_OF[char] for char in text)
        except KeyError:  # an added token written in plain text
            return text.encode("utf-8")
    if len(text) == 6 and text.startswith("<0x") and text.endswith(">"):  # SentencePiece byte fallback
        return bytes([int(text[3:5], 16)])
    return text.replace("\u2581", " ").encode("utf-8")


def _eog(texts: list[str], explicit: Iterable[int | None]) -> frozenset[int]:
    ids = {i for i, text in enumerate(texts) if text in _EOG_TEXTS}
    ids.update(i for i in explicit if i is not None and 0 <= i < len(texts))
    return frozenset(ids)


def vocab_from_gguf(meta: dict[str, Any], path: str) -> Vocab:
    """Rebuild a GGUF file's BPE tokenizer from its metadata; ``ModelLoadError`` for what we cannot."""
    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise ModelLoadError(
            f"Failed to load model: {path}: the mlx backend rebuilds byte-level BPE ('gpt2') GGUF tokenizers only, "
            f"this file's is {kind!r}; use the llama_cpp backend or an mlx-lm model folder"
        )
    pre = meta.get("tokenizer.ggml.pre", "default")
    if pre not in _PRE_TOKENIZERS:
        raise ModelLoadError(
            f"Failed to load model: {path}: the mlx backend does not know the pre-tokenizer {pre!r} "
            f"(known: {', '.join(sorted(_PRE_TOKENIZERS))}); use the llama_cpp backend"
        )
    regexes, ignore_merges = _PRE_TOKENIZERS[pre]
    texts: list[str] = list(meta["tokenizer.ggml.tokens"])
    types = meta.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else [_NORMAL] * len(texts)  # (iterating an mx.array is slow)
    if len(types) != len(texts):
        raise ModelLoadError(f"Failed to load model: {path}: the GGUF tokenizer has {len(texts)} tokens but "
                             f"{len(types)} token types (tokenizer.ggml.token_type); the file is damaged")
    merges = [tuple(merge.split(" ", 1)) for merge in meta.get("tokenizer.ggml.merges", [])]
    tokenizer = Tokenizer(models.BPE(vocab={text: i for i, text in enumerate(texts)}, merges=merges,
                                     ignore_merges=ignore_merges))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(regex), behavior="isolated") for regex in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    tokenizer.decoder = decoders.ByteLevel()
    # llama.cpp parses control and user-defined tokens in the text (parse_special=True).
    tokenizer.add_special_tokens([
        AddedToken(text, special=kind_ == _CONTROL, normalized=False)
        for text, kind_ in zip(texts, types, strict=True) if kind_ in (_CONTROL, _USER_DEFINED)
    ])
    pieces = [text.encode("utf-8") if kind_ in (_CONTROL, _USER_DEFINED) else _piece(text, True)
              for text, kind_ in zip(texts, types, strict=True)]

    bos, eos, eot, eom = (meta_value(meta, f"tokenizer.ggml.{kind}_token_id") for kind in ("bos", "eos", "eot", "eom"))
    add_bos = bool(meta_value(meta, "tokenizer.ggml.add_bos_token", False))
    return Vocab(tokenizer, pieces, _eog(texts, (eos, eot, eom)), bos, eos, add_bos)


def vocab_from_tokenizer(tokenizer: Tokenizer, eos_ids: Iterable[int], bos: int | None, add_bos: bool) -> Vocab:
    """The vocabulary of an mlx-lm folder's ``tokenizer.json``."""
    spec = json.loads(tokenizer.to_str())
    byte_level = "ByteLevel" in json.dumps(spec.get("decoder")) or "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    added = {token["id"] for token in spec.get("added_tokens", [])}
    texts = [tokenizer.id_to_token(i) or "" for i in range(size)]
    pieces = [text.encode("utf-8") if i in added else _piece(text, byte_level) for i, text in enumerate(texts)]
    eos = next(iter(eos_ids), None)
    return Vocab(tokenizer, pieces, _eog(texts, eos_ids), bos, eos, add_bos)


@dataclass
class TokenizerFiles:
    """What a Hugging Face model folder says about its tokens: the vocabulary and the chat template."""

    vocab: Vocab
    chat_template: str | None
    config: dict[str, Any]  # config.json ({} when absent)


def read_tokenizer_files(folder: str) -> TokenizerFiles:
    """``tokenizer.json``, ``tokenizer_config.json``, ``generation_config.json``, ``config.json`` and
    ``chat_template.jinja`` of ``folder``; ``ModelLoadError`` when there is no ``tokenizer.json``."""
    tokenizer_file = os.path.join(folder, "tokenizer.json")
    if not os.path.isfile(tokenizer_file):
        raise ModelLoadError(f"Failed to load model: {folder} has no tokenizer.json")
    try:
        tokenizer = Tokenizer.from_file(tokenizer_file)
    except Exception as err:  # tokenizers raises a bare Exception for a malformed file
        raise ModelLoadError(f"Failed to load model: {tokenizer_file} is not a tokenizers file ({err})") from err
    settings = _read_json(os.path.join(folder, "tokenizer_config.json"))
    generation = _read_json(os.path.join(folder, "generation_config.json"))
    config = _read_json(os.path.join(folder, "config.json"))

    def token_id(value: Any) -> int | None:
        text = value.get("content") if isinstance(value, dict) else value
        return tokenizer.token_to_id(text) if isinstance(text, str) else None

    configured = config.get("eos_token_id", generation.get("eos_token_id"))
    eos_ids = [token_id(settings.get("eos_token")), *([configured] if isinstance(configured, int) else configured or [])]
    eos_ids = [i for i in eos_ids if i is not None]  # the tokenizer's own EOS first: it is the one rendered as eos_text
    bos = token_id(settings.get("bos_token"))
    vocab = vocab_from_tokenizer(tokenizer, eos_ids, bos, bool(settings.get("add_bos_token", False)))
    template = settings.get("chat_template")
    template_file = os.path.join(folder, "chat_template.jinja")
    if template is None and os.path.isfile(template_file):
        with open(template_file, encoding="utf-8") as handle:
            template = handle.read()
    return TokenizerFiles(vocab, template, config)


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as err:
        raise ModelLoadError(f"Failed to load model: cannot read {path}: {err}") from err
