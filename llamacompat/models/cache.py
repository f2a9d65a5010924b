"""The model cache: ``$LLAMACOMPAT_HOME`` (default: the platform's cache folder) holding pulled models.

Layout::

    index.json         name -> entry (backends, format, quantisation, size, source, sha256, last used)
    models/NAME/...    one folder per model: the GGUF or .rkllm file, or an mlx-lm folder's files
    partial/KEY/...    downloads in progress (a later pull of the same source resumes them)
    partial/KEY.lock   held while a pull uses partial/KEY: ``clean`` skips what a pull holds
    .lock              held while the index changes, so two processes never lose each other's entries

A model appears in ``models/`` and the index only once it is complete and verified:
files are staged in ``partial/`` and moved in with one rename. ``remove`` and
``clean`` delete only what lies under ``models/`` and ``partial/``; a model
registered with ``link`` is a symlink there, and only the link is removed.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import secrets
import shutil
import time
from typing import Any, Iterator, Literal, overload

from ..errors import InvalidParamsError, ModelLoadError
from ..sessions.atomic import atomic_write_bytes
from .facts import model_facts

__all__ = ["ModelCache", "cache_home", "HOME_ENV", "file_sha256", "folder_sha256"]

HOME_ENV = "LLAMACOMPAT_HOME"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def cache_home() -> str:
    """``$LLAMACOMPAT_HOME``, else the platform's user cache folder (``~/.cache/llamacompat`` on Linux)."""
    home = os.environ.get(HOME_ENV)
    if home:
        return os.path.abspath(os.path.expanduser(home))
    import platformdirs

    return platformdirs.user_cache_dir("llamacompat", appauthor=False)


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_sha256(path: str) -> str:
    """One digest for a folder: sha256 over its files' relative paths and digests, in order."""
    lines = []
    for folder, _, files in sorted(os.walk(path)):
        for name in sorted(files):
            full = os.path.join(folder, name)
            lines.append(f"{os.path.relpath(full, path)} {file_sha256(full)}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def _size(path: str) -> int:
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files
               if not os.path.islink(os.path.join(d, f)))


@overload
def _lock(path: str, wait: Literal[True] = True) -> int: ...


@overload
def _lock(path: str, wait: bool) -> int | None: ...


def _lock(path: str, wait: bool = True) -> int | None:
    """An exclusive ``flock`` on ``path`` (created if missing): its descriptor, or None when ``wait`` is
    False and another process holds it. Close the descriptor to release it.

    A holder may unlink the lock file before it releases it (a finished pull, or ``clean``): a waiter
    then wakes up holding a file nobody else can see, so after locking we check that ``path`` still
    names the very file we hold, and start again if not.
    """
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
            held = os.fstat(fd)
            with contextlib.suppress(FileNotFoundError):
                now = os.stat(path)
                if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                    return fd
        except BlockingIOError:
            os.close(fd)
            return None
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)


class ModelCache:
    """One cache folder; every method is safe to call from several processes at once."""

    def __init__(self, home: str | None = None) -> None:
        self.root = os.path.abspath(home or cache_home())
        self.models_dir = os.path.join(self.root, "models")
        self.partial_dir = os.path.join(self.root, "partial")
        self.index_path = os.path.join(self.root, "index.json")

    # -- the index ----------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, dict[str, Any]]]:
        """The index, under the lock; written back (atomically) when the block ends without an error."""
        os.makedirs(self.models_dir, exist_ok=True)
        fd = _lock(os.path.join(self.root, ".lock"))
        try:
            models = self._read()
            before = json.dumps(models, sort_keys=True)
            yield models
            if json.dumps(models, sort_keys=True) != before:
                atomic_write_bytes(self.index_path, json.dumps({"version": 1, "models": models}, indent=1).encode())
        finally:
            os.close(fd)

    def _read(self) -> dict[str, dict[str, Any]]:
        try:
            with open(self.index_path, encoding="utf-8") as f:
                return dict(json.load(f)["models"])
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise ModelLoadError(f"the model cache index {self.index_path} is damaged ({err}); move it away and "
                                 "pull the models again") from err

    def entries(self) -> list[dict[str, Any]]:
        """Every model, sorted by name, with its absolute ``path``."""
        return [self._public(name, entry) for name, entry in sorted(self._read().items())]

    def get(self, name: str) -> dict[str, Any] | None:
        entry = self._read().get(name)
        return self._public(name, entry) if entry else None

    def _public(self, name: str, entry: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, **entry, "path": os.path.join(self.models_dir, entry["path"])}

    def resolve(self, name: str) -> str | None:
        """The path of the cached model ``name`` (its last use recorded), or None."""
        if not _NAME.match(name) or not os.path.isfile(self.index_path):
            return None
        with self._locked() as models:
            entry = models.get(name)
            if entry is None:
                return None
            entry["last_used"] = time.time()
            return os.path.join(self.models_dir, entry["path"])

    # -- changes ------------------------------------------------------------------
    def check_name(self, name: str) -> str:
        if not isinstance(name, str) or not _NAME.match(name):
            raise InvalidParamsError(f"model name {name!r}: use letters, digits, '.', '_' and '-' (at most 128, "
                                     "starting with a letter or digit)")
        return name

    @contextlib.contextmanager
    def staging(self, resume_key: str | None = None) -> Iterator[str]:
        """A folder under ``partial/`` for one pull, locked while the pull uses it (``clean`` skips it) and
        removed once the block succeeds.

        With ``resume_key`` (a source whose downloads can resume) it is the same folder for every pull of
        that source, kept when the pull fails; a second pull of it waits for the first. Without, a fresh
        folder that goes either way.
        """
        os.makedirs(self.partial_dir, exist_ok=True)
        key = hashlib.sha256(resume_key.encode()).hexdigest()[:16] if resume_key else f"tmp-{secrets.token_hex(8)}"
        path = os.path.join(self.partial_dir, key)
        fd = _lock(path + ".lock")  # before the folder exists, so clean never sees it unlocked
        try:
            os.makedirs(path, exist_ok=True)
            try:
                yield path
            except BaseException:
                if resume_key is None:
                    shutil.rmtree(path, ignore_errors=True)
                raise
            shutil.rmtree(path, ignore_errors=True)
            os.unlink(path + ".lock")  # while held: a waiter sees it gone and locks a new file
        finally:
            os.close(fd)

    def add(self, name: str, staged: str, source: str, sha256: str, *, link_to: str | None = None) -> dict[str, Any]:
        """Move ``staged`` (a file or folder under ``partial/``, or None with ``link_to``) into the cache as
        ``name``; with ``link_to``, the cache holds a symlink to that path instead of a copy."""
        self.check_name(name)
        target = link_to or staged
        facts = model_facts(target)
        with self._locked() as models:
            if name in models:
                raise InvalidParamsError(f"a model named {name!r} is already in the cache; remove it first or pass "
                                         "another --name")
            folder = os.path.join(self.models_dir, name)
            if os.path.lexists(folder):  # an unreferenced leftover: clean would remove it
                shutil.rmtree(folder) if os.path.isdir(folder) and not os.path.islink(folder) else os.unlink(folder)
            os.makedirs(folder)
            placed = os.path.join(folder, os.path.basename(os.path.normpath(target)))
            if link_to:
                os.symlink(os.path.abspath(link_to), placed)
            else:
                os.replace(staged, placed)
            models[name] = {
                "path": os.path.relpath(placed, self.models_dir), "format": facts["format"],
                "backends": facts["backends"], "quantization": facts["quantization"],
                "architecture": facts["architecture"], "size": facts["size"], "source": source,
                "sha256": sha256, "linked": bool(link_to), "added": time.time(), "last_used": None,
            }
        return self.get(name)  # type: ignore[return-value]

    def remove(self, name: str) -> int:
        """Delete ``name``'s folder (a linked model loses only its link); the bytes freed."""
        with self._locked() as models:
            entry = models.pop(name, None)
            if entry is None:
                raise InvalidParamsError(f"no model named {name!r} in the cache ({self.root}); "
                                         "`llamacompat models list` shows them")
            folder = os.path.join(self.models_dir, name)
            return self._delete_inside(folder)

    def clean(self) -> tuple[list[str], int, list[str]]:
        """Remove partial downloads no pull holds and anything under ``models/`` that no entry refers to:
        (paths removed, bytes freed, partial downloads skipped because a pull holds them)."""
        removed, freed, skipped = [], 0, []
        names = os.listdir(self.partial_dir) if os.path.isdir(self.partial_dir) else []
        for key in sorted({name.removesuffix(".lock") for name in names}):
            path = os.path.join(self.partial_dir, key)
            fd = _lock(path + ".lock", wait=False)  # by name, whatever the listing showed: it may be stale
            if fd is None:
                skipped.append(path)
                continue
            try:
                if os.path.lexists(path):
                    freed += self._delete_inside(path)
                    removed.append(path)
                os.unlink(path + ".lock")
            finally:
                os.close(fd)
        with self._locked() as models:
            known = {entry["path"].split(os.sep)[0] for entry in models.values()}
            for child in sorted(os.listdir(self.models_dir)):
                if child not in known:
                    path = os.path.join(self.models_dir, child)
                    freed += self._delete_inside(path)
                    removed.append(path)
        return removed, freed, skipped

    def _delete_inside(self, path: str) -> int:
        """Delete ``path``, which must lie in this cache; symlinks are removed, never followed."""
        parent = os.path.realpath(os.path.dirname(path))
        if parent not in (os.path.realpath(self.models_dir), os.path.realpath(self.partial_dir)):
            raise InvalidParamsError(f"refusing to delete {path}: it is outside the cache {self.root}")
        if not os.path.lexists(path):
            return 0
        if os.path.islink(path) or not os.path.isdir(path):
            size = 0 if os.path.islink(path) else os.path.getsize(path)
            os.unlink(path)
            return size
        size = _size(path)
        shutil.rmtree(path)  # does not follow symlinks inside
        return size
