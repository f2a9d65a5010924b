"""``llamacompat models list | info | pull | remove | clean``: the model cache from the command line."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from typing import Any, Callable

from ..models import resolve_model
from ..models.cache import ModelCache
from ..models.facts import model_facts
from ..models.pull import SOURCES, pull
from ..registry import installed_builtin_backends

__all__ = ["add_models_parser", "run_models"]


def add_models_parser(add: Callable[..., argparse.ArgumentParser]) -> None:
    models = add("models", help="the model cache ($LLAMACOMPAT_HOME): list, info, pull, remove, clean")
    actions = models.add_subparsers(dest="action", required=True)
    listing = actions.add_parser("list", help="the cached models")
    listing.add_argument("--json", action="store_true")
    info = actions.add_parser("info", help="what a model is, read without loading it (a cache name or a path)")
    info.add_argument("model")
    info.add_argument("--json", action="store_true")
    get = actions.add_parser("pull", help=f"add a model to the cache: {SOURCES}")
    get.add_argument("source")
    get.add_argument("--name", help="the name to load it by (default: from the file or repository)")
    get.add_argument("--link", action="store_true", help="file: only: symlink instead of copying")
    get.add_argument("--json", action="store_true")
    remove = actions.add_parser("remove", help="delete a cached model (a linked one loses only its link)")
    remove.add_argument("name")
    clean = actions.add_parser("clean", help="delete partial downloads no pull holds and files no cached model uses")
    clean.add_argument("--json", action="store_true")


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 2**20:.1f} MB"


def _when(stamp: float | None) -> str:
    return "never" if not stamp else datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M")


def _table(header: list[str], rows: list[list[str]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*header)
    for row in rows:
        table.add_row(*row)
    Console(width=160).print(table)


def run_models(args: argparse.Namespace) -> int:
    cache = ModelCache()
    if args.action == "list":
        entries = cache.entries()
        if args.json:
            print(json.dumps(entries, indent=2))
        elif not entries:
            print(f"no models in {cache.root}; add one with: llamacompat models pull {SOURCES}")
        else:
            _table(["name", "format", "quant", "size", "backends", "source", "last used"],
                   [[e["name"], e["format"], e["quantization"] or "-", _mb(e["size"]), ", ".join(e["backends"]),
                     e["source"], _when(e["last_used"])] for e in entries])
        return 0
    if args.action == "info":
        return _info(cache, args)
    if args.action == "pull":
        entry = pull(args.source, cache, name=args.name, link=args.link, progress=sys.stderr.isatty() and not args.json)
        if args.json:
            print(json.dumps(entry, indent=2))
        else:
            print(f"{entry['name']}: {entry['format']} {entry['quantization'] or ''}, {_mb(entry['size'])}, runs on "
                  f"{', '.join(entry['backends'])} (sha256 {entry['sha256'][:16]}...)\n"
                  f"load it with init_llama({{'model': '{entry['name']}'}})")
        return 0
    if args.action == "remove":
        freed = cache.remove(args.name)
        print(f"removed {args.name} ({_mb(freed)} freed)")
        return 0
    removed, freed, skipped = cache.clean()
    if args.json:
        print(json.dumps({"removed": removed, "freed": freed, "skipped": skipped}))
    else:
        print(f"removed {len(removed)} item(s), {_mb(freed)} freed" + "".join(f"\n  {p}" for p in removed)
              + "".join(f"\nskipped {p}: a pull in progress holds it" for p in skipped))
    return 0


def _info(cache: ModelCache, args: argparse.Namespace) -> int:
    entry = cache.get(args.model)
    path = entry["path"] if entry else resolve_model(args.model)
    facts: dict[str, Any] = {"path": path, **model_facts(path)}
    installed = set(installed_builtin_backends())
    facts["installed_backends"] = [b for b in facts["backends"] if b in installed]
    if entry:
        facts.update(name=entry["name"], source=entry["source"], sha256=entry["sha256"],
                     last_used=entry["last_used"], linked=entry["linked"])
    if args.json:
        print(json.dumps(facts, indent=2))
        return 0
    n_params = facts["n_params"]
    lines = {
        "path": path, "format": facts["format"], "architecture": facts["architecture"] or "-",
        "parameters": f"{n_params / 1e6:.1f} M" if n_params else "-",
        "context length": facts["context_length"] or "-", "quantization": facts["quantization"] or "-",
        "chat template": {True: "yes", False: "no", None: "-"}[facts["chat_template"]], "size": _mb(facts["size"]),
        "backends": ", ".join(f"{b}{'' if b in installed else ' (not installed)'}" for b in facts["backends"]),
    }
    if entry:
        lines.update(source=entry["source"], sha256=entry["sha256"], **{"last used": _when(entry["last_used"])})
    for key, value in lines.items():
        print(f"{key:<15} {value}")
    return 0
