"""The ``llamacompat`` command: complete, chat and info on the default model or any GGUF."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Sequence

from . import init_llama, load_llama_model_info
from .errors import LlamaCompatWarning, LlamaError
from .models import DEFAULT_MODEL, local_path
from .sessions import read_header, read_sidecar

__all__ = ["main"]


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path, or 'smollm2' (the default, packaged model)")
    parser.add_argument("--backend", default="auto",
                        help="auto, llama_cpp, mlx, bridge (talk to `llamacompat serve`), or a registered adapter")
    parser.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    parser.add_argument("--n-predict", type=int, default=256, help="tokens to generate at most (-1: no limit)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--seed", type=int, default=-1)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--system", help="system message (chat only)")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON after the text")


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llamacompat", description="llama.rn's API for Python, on local backends.")
    sub = parser.add_subparsers(dest="command", required=True)
    complete = sub.add_parser("complete", help="continue a raw prompt, streaming tokens")
    complete.add_argument("prompt")
    _add_model_args(complete)
    chat = sub.add_parser("chat", help="answer one chat message with the model's chat template, streaming tokens")
    chat.add_argument("message")
    _add_model_args(chat)
    info = sub.add_parser("info", help="print a GGUF file's metadata without loading it")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.add_argument("--json", action="store_true")
    conformance = sub.add_parser("conformance", help="run the conformance checks against a backend and print a table")
    conformance.add_argument("--backend", action="append", default=[],
                             help="backend to check (repeatable; default: every installed built-in backend)")
    conformance.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                             help="init_llama param (repeatable; VALUE is JSON or a string), e.g. model=/path/to.gguf")
    conformance.add_argument("--check", action="append", default=[], help="run only this check (repeatable)")
    grammar = sub.add_parser("grammar", help="check and test GBNF grammars, convert JSON schemas, list and show the built-in ones")
    grammar_sub = grammar.add_subparsers(dest="action", required=True)
    check = grammar_sub.add_parser("check", help="parse and check GBNF files ('-' reads standard input)")
    check.add_argument("files", nargs="+")
    from_schema = grammar_sub.add_parser("from-schema", help="convert a JSON schema file to GBNF ('-' reads standard input)")
    from_schema.add_argument("file")
    from_schema.add_argument("--prop-order", default="", help="comma-separated properties to put first")
    from_schema.add_argument("--dotall", action="store_true", help="let '.' in patterns match line breaks")
    from_schema.add_argument("--strict", action="store_true", help="refuse keywords the grammar cannot enforce")
    test = grammar_sub.add_parser("test", help="say whether a text is in a grammar's language (exit 0 if it is)")
    test.add_argument("grammar", help="GBNF file, or the name of a built-in grammar")
    test.add_argument("text", help="the text, or '-' to read it from standard input")
    grammar_sub.add_parser("list", help="list the built-in grammars")
    show = grammar_sub.add_parser("show", help="print a built-in grammar")
    show.add_argument("name")
    serve = sub.add_parser("serve", help="serve one model to other processes over a Unix socket (or TCP with a token)")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path or model folder (default: smollm2)")
    serve.add_argument("--backend", default="auto", help="backend that loads the model (default: auto)")
    serve.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    serve.add_argument("--embedding", action="store_true", help="enable embedding requests")
    serve.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="another init_llama param (repeatable; VALUE is JSON or a string)")
    serve.add_argument("--socket", help="Unix socket path (default: $XDG_RUNTIME_DIR or the temp folder, "
                                        "llamacompat-<uid>.sock)")
    serve.add_argument("--host", default="127.0.0.1", help="TCP address with --port (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen on TCP too (0: any free port); needs a token")
    serve.add_argument("--token", default=os.environ.get("LLAMACOMPAT_BRIDGE_TOKEN"),
                       help="token TCP clients must send (default: $LLAMACOMPAT_BRIDGE_TOKEN)")
    serve.add_argument("--models-dir", help="folder LOAD may load models from (LOAD is disabled without it)")
    serve.add_argument("--sessions-dir", help="folder session files may be saved to and loaded from "
                                              "(sessions are disabled without it)")
    serve.add_argument("--n-predict", type=int, default=512, help="tokens INFER / INFER_STREAM generate at most")
    session = sub.add_parser("session", help="work with session files").add_subparsers(dest="action", required=True)
    inspect = session.add_parser("inspect", help="print a session file's header, identity and (with --model) its text")
    inspect.add_argument("file")
    inspect.add_argument("--model", help="model whose vocabulary turns the tokens back into text")
    inspect.add_argument("--json", action="store_true")
    return parser


def _grammar(args: argparse.Namespace) -> int:
    from .grammars import BUILTIN_GRAMMARS, builtin_grammar, parse_gbnf

    if args.action == "list":
        for name in BUILTIN_GRAMMARS:
            first = builtin_grammar(name).splitlines()[0].lstrip("# ")
            print(f"{name:<12} {first}")
        return 0
    if args.action == "show":
        sys.stdout.write(builtin_grammar(args.name))
        return 0
    if args.action == "from-schema":
        return _from_schema(args)
    if args.action == "test":
        return _test_grammar(args)
    failed = 0
    for path in args.files:
        try:
            source = _read(path)
        except (OSError, UnicodeDecodeError) as err:
            print(f"{path}: cannot read: {err}", file=sys.stderr)
            failed += 1
            continue
        try:
            grammar = parse_gbnf(source)
        except LlamaError as err:
            line, column = getattr(err, "line", 0), getattr(err, "column", 0)
            print(f"{path}:{line}:{column}: {getattr(err, 'problem', str(err))}"
                  + (f" (rule '{err.rule}')" if getattr(err, "rule", None) else ""), file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({len(grammar.rules)} rules)")
    return 1 if failed else 0


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()


def _from_schema(args: argparse.Namespace) -> int:
    import warnings

    from .grammars import convert_json_schema_to_grammar

    try:
        text = _read(args.file)
    except (OSError, UnicodeDecodeError) as err:
        print(f"{args.file}: cannot read: {err}", file=sys.stderr)
        return 1
    order = [name for name in args.prop_order.split(",") if name]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", LlamaCompatWarning)
        grammar = convert_json_schema_to_grammar(text, order or None, args.dotall, strict=args.strict)
    for warning in caught:
        print(f"llamacompat: warning: {warning.message}", file=sys.stderr)
    sys.stdout.write(grammar)
    return 0


def _test_grammar(args: argparse.Namespace) -> int:
    from .grammars import accepts, resolve_grammar

    source = args.grammar if "::=" in args.grammar else None
    if source is None:
        try:
            source = _read(args.grammar)
        except OSError:
            source = resolve_grammar(args.grammar)  # a built-in grammar's name
    text = _read(args.text) if args.text == "-" else args.text
    if accepts(source, text):
        print("accepted")
        return 0
    print("rejected")
    return 1


def _conformance(args: argparse.Namespace) -> int:
    from .conformance import CHECKS, run_checks
    from .conformance.kit import parse_params
    from .conformance.report import format_report
    from .registry import installed_builtin_backends

    unknown = [name for name in args.check if name not in CHECKS]
    if unknown:
        print(f"llamacompat: unknown check {unknown[0]!r}; checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    try:
        params = parse_params(args.param)
    except ValueError as err:
        print(f"llamacompat: --param: {err}", file=sys.stderr)
        return 2
    failed = False
    for backend in args.backend or installed_builtin_backends():
        outcomes = run_checks(backend, params, args.check or None)
        print(format_report(backend, outcomes))
        failed = failed or any(o.status == "failed" for o in outcomes)
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from .bridge.server import run_server
    from .conformance.kit import parse_params

    try:
        extra = parse_params(args.param)
    except ValueError as err:
        print(f"llamacompat: --param: {err}", file=sys.stderr)
        return 2
    params = {"model": args.model, "backend": args.backend, "n_ctx": args.n_ctx, "embedding": args.embedding, **extra}

    def ready(addresses: list[str]) -> None:
        print("llamacompat: serving on " + ", ".join(addresses), flush=True)

    run_server(params, socket_path=args.socket, host=args.host, port=args.port, token=args.token,
               models_dir=args.models_dir, sessions_dir=args.sessions_dir, n_predict=args.n_predict, on_ready=ready)
    return 0


def _inspect_session(args: argparse.Namespace) -> int:
    path = local_path(args.file)
    header = read_header(path)
    sidecar = read_sidecar(path)
    report: dict[str, Any] = {
        "file": path, "size": header.file_size, "format": "llama.cpp session (ggsn)", "version": header.version,
        "arch": header.arch, "n_tokens": header.n_tokens, "state_bytes": header.state_size,
        "saved_by": {k: sidecar[k] for k in ("backend", "model", "layout")} if sidecar else None,
    }
    if args.model:
        with init_llama({"model": args.model, "vocab_only": True}) as ctx:
            report["prompt"] = ctx.detokenize(header.tokens)
    if args.json:
        print(json.dumps({**report, "tokens": header.tokens}, indent=2, ensure_ascii=False))
        return 0
    saved_by = "unknown (no sidecar, or the file was rewritten since)"
    if sidecar:
        model, layout = sidecar["model"], sidecar["layout"]
        saved_by = f"{sidecar['backend']}: {model.get('name') or model.get('desc')} [{model.get('fingerprint', '')[:12]}]"
        saved_by += "".join(f", {k}={v}" for k, v in sorted(layout.items()))
    print(f"file      {path} ({header.file_size} bytes)")
    print(f"format    llama.cpp session (ggsn), version {header.version}, arch {header.arch}")
    print(f"tokens    {header.n_tokens} (+ {header.state_size} bytes of state)")
    print(f"saved by  {saved_by}")
    print(f"prompt    {report['prompt']!r}" if "prompt" in report else "prompt    (pass --model to show the text)")
    return 0


def _run_completion(args: argparse.Namespace, request: dict[str, Any]) -> int:
    params = {"model": args.model, "backend": args.backend, "n_ctx": args.n_ctx}
    request.update(n_predict=args.n_predict, temperature=args.temperature, seed=args.seed, stop=args.stop)

    def show(event: dict[str, Any]) -> None:
        sys.stdout.write(event["token"])
        sys.stdout.flush()

    with init_llama(params) as ctx:
        try:
            result = ctx.completion(request, show)
        except KeyboardInterrupt:  # Ctrl-C ends the answer, not with a traceback
            sys.stdout.write("\n")
            return 130
    sys.stdout.write("\n")
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    try:
        if args.command == "info":
            info = load_llama_model_info(args.model)
            if args.json:
                print(json.dumps(info, indent=2, ensure_ascii=False))
            else:
                width = max(map(len, info))
                for key, value in info.items():
                    value = value if len(value) <= 100 else value[:97] + "..."
                    print(f"{key:<{width}}  {value}".replace("\n", "\\n"))
            return 0
        if args.command == "grammar":
            return _grammar(args)
        if args.command == "conformance":
            return _conformance(args)
        if args.command == "session":
            return _inspect_session(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "complete":
            return _run_completion(args, {"prompt": args.prompt})
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.message}
        ]
        return _run_completion(args, {"messages": messages})
    except LlamaError as err:
        print(f"llamacompat: error [{err.code}]: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
