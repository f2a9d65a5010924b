"""Building what the rkllm tests run on: the simulator library per ABI, and a model folder.

The simulator (tests/rkllm_sim/) is compiled here with the system C compiler, once
per ABI. The model folder holds a simulator "model" file (``smollm2.rkllm``: the
SmolLM2 vocabulary as hex pieces) and the Hugging Face tokenizer files that the
adapter needs, rebuilt from the packaged GGUF's metadata: nothing is downloaded.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
from pathlib import Path

SIM_DIR = Path(__file__).parent / "rkllm_sim"
# ABI name -> (RKLLM_ABI value in rkllm_abi.h, the release the simulated library says it is)
ABI_BUILDS = {"1.1": (110, "1.1.4"), "1.2.0": (120, "1.2.0"), "1.2.1": (121, "1.2.3"), "1.3.0": (130, "1.3.0")}
N_EMBD = 576
MAX_CONTEXT = 4096


def compiler() -> str:
    found = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not found:
        raise RuntimeError("the rkllm tests need a C compiler (cc or gcc) to build the simulator")
    return found


def build_sim(folder: Path, abi: str, banner: bool = True, release: str | None = None) -> str:
    """Compile librkllmrt.so for ``abi``; without ``banner`` the file carries no version string."""
    level, default_release = ABI_BUILDS[abi]
    out = folder / f"{abi}{'' if banner else '-nobanner'}" / "librkllmrt.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    flags = [f"-DRKLLM_ABI={level}", f'-DSIM_VERSION="{release or default_release}"']
    if not banner:
        flags.append("-DSIM_NO_BANNER")
    subprocess.run([compiler(), "-std=c11", "-D_GNU_SOURCE", "-O2", "-Wall", "-Werror", "-shared", "-fPIC", *flags,
                    "-o", str(out), str(SIM_DIR / "rkllm_sim.c"), "-lpthread", "-lm"], check=True)
    return str(out)


def build_model_folder(folder: Path, gguf_path: str) -> str:
    """``folder/smollm2.rkllm`` plus tokenizer.json, tokenizer_config.json and config.json; returns the .rkllm path."""
    import mlx.core as mx

    from llamacompat.vocab import vocab_from_gguf

    _, meta = mx.load(gguf_path, format="gguf", return_metadata=True)
    vocab = vocab_from_gguf(meta, gguf_path)
    folder.mkdir(parents=True, exist_ok=True)
    vocab.tokenizer.save(str(folder / "tokenizer.json"))
    texts = list(meta["tokenizer.ggml.tokens"])
    settings = {"bos_token": texts[vocab.bos] if vocab.bos is not None else None, "eos_token": texts[vocab.eos],
                "add_bos_token": vocab.add_bos, "chat_template": meta.get("tokenizer.chat_template")}
    (folder / "tokenizer_config.json").write_text(json.dumps(settings))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": N_EMBD,
                                                    "max_position_embeddings": 8192}))
    model = folder / "smollm2.rkllm"
    lines = [f"RKLLM-SIM-1\n{vocab.size} {vocab.eos} {N_EMBD} {MAX_CONTEXT}\n"]
    lines += [(piece.hex() or "-") + "\n" for piece in vocab.pieces]
    model.write_text("".join(lines))
    return str(model)


def sim_record(lib_path: str, handle: int) -> dict:
    """What the simulator behind ``handle`` received (its rkllm_sim_record, parsed)."""
    lib = ctypes.CDLL(lib_path)
    lib.rkllm_sim_record.restype = ctypes.c_char_p
    lib.rkllm_sim_record.argtypes = [ctypes.c_void_p]
    return json.loads(lib.rkllm_sim_record(handle))
