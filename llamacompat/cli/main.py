"""The ``llamacompat`` command: chat, complete, bench, info, serve, grammar, session and conformance."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import shutil
import sys
import traceback
from typing import Any, Sequence

from .. import LlamaContext, init_llama, load_llama_model_info
from ..bridge.protocol import MAX_CLIENTS, MAX_LINE
from ..errors import InvalidParamsError, LlamaCompatWarning, LlamaError
from ..media import MEDIA_MARKER
from ..models import DEFAULT_MODEL, local_path, resolve_model
from ..sessions import read_header, read_sidecar
from ..types import TokenData
from .models import add_models_parser, run_models

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
    parser.add_argument("--mmproj", help="a multimodal projector (mmproj GGUF) for the model: images (and audio)")
    parser.add_argument("--image", action="append", default=[], metavar="PATH",
                        help="an image for the prompt or message (repeatable; needs --mmproj)")


def _key_value(text: str) -> str:
    """``--param KEY=VALUE``, checked by argparse so a bad one is a usage error (exit 2)."""
    key, sep, _ = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return text


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


EXIT_CODES = """exit codes:
  0    done (grammar test: the text is accepted)
  1    an error (one line on stderr: llamacompat: error [code]: message; --debug adds the traceback),
       a failed conformance check, or a rejected text (grammar test)
  2    bad command-line usage
  130  interrupted with Ctrl-C"""


def _build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand's own default must not undo "llamacompat --debug chat"
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="log to stderr (native logs included) and show tracebacks")
    parser = argparse.ArgumentParser(prog="llamacompat", description="llama.rn's API for Python, on local backends.",
                                     epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter,
                                     parents=[common])
    sub = parser.add_subparsers(dest="command", required=True)
    add = functools.partial(sub.add_parser, parents=[common])
    complete = add("complete", help="continue a raw prompt, streaming tokens")
    complete.add_argument("prompt")
    _add_model_args(complete)
    chat = add("chat", help="chat with the model: interactive, or answer one MESSAGE and exit")
    chat.add_argument("message", nargs="?", help="answer this one message and exit (no message: interactive chat)")
    _add_model_args(chat)
    bench = add("bench", help="llama.rn's bench figures (prompt and generation tokens/s) as a table")
    bench.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path or model folder (default: smollm2)")
    bench.add_argument("--backend", action="append", default=[], help="backend to measure (repeatable; default auto)")
    bench.add_argument("--compare", action="store_true", help="measure every installed backend that loads the model")
    bench.add_argument("--pp", type=_positive, default=128, help="prompt tokens (default 128)")
    bench.add_argument("--tg", type=_positive, default=64, help="generated tokens (default 64)")
    bench.add_argument("--nr", type=_positive, default=3, help="rounds per backend; the table shows medians (default 3)")
    bench.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                       help="another init_llama param (repeatable; VALUE is JSON or a string)")
    bench.add_argument("--json", action="store_true", help="print the figures as JSON")
    add_models_parser(add)
    info = add("info", help="print a GGUF file's metadata without loading it")
    info.add_argument("model", nargs="?", default=DEFAULT_MODEL)
    info.add_argument("--json", action="store_true")
    conformance = add("conformance", help="run the conformance checks against a backend and print a table")
    conformance.add_argument("--backend", action="append", default=[],
                             help="backend to check (repeatable; default: every installed built-in backend)")
    conformance.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                             help="init_llama param (repeatable; VALUE is JSON or a string), e.g. model=/path/to.gguf")
    conformance.add_argument("--check", action="append", default=[], help="run only this check (repeatable)")
    grammar = add("grammar", help="check and test GBNF grammars, convert JSON schemas, list and show the built-in ones")
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
    serve = add("serve", help="serve one model to other processes over a Unix socket (or TCP with a token)")
    serve.add_argument("--model", default=DEFAULT_MODEL, help="GGUF path or model folder (default: smollm2)")
    serve.add_argument("--backend", default="auto", help="backend that loads the model (default: auto)")
    serve.add_argument("--n-ctx", type=int, default=2048, help="context size in tokens (default 2048)")
    serve.add_argument("--embedding", action="store_true", help="enable embedding requests")
    serve.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", type=_key_value,
                       help="another init_llama param (repeatable; VALUE is JSON or a string)")
    serve.add_argument("--socket", help="Unix socket path (default: $XDG_RUNTIME_DIR/llamacompat-<uid>.sock, "
                                        "else <temp>/llamacompat-<uid>/bridge.sock, in a folder of mode 0700)")
    serve.add_argument("--host", default="127.0.0.1", help="TCP address with --port (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="listen on TCP too (0: any free port); needs a token")
    serve.add_argument("--token", default=os.environ.get("LLAMACOMPAT_BRIDGE_TOKEN"),
                       help="token TCP clients must send (default: $LLAMACOMPAT_BRIDGE_TOKEN)")
    serve.add_argument("--models-dir", help="folder LOAD may load models from (LOAD is disabled without it)")
    serve.add_argument("--sessions-dir", help="folder session files may be saved to and loaded from "
                                              "(sessions are disabled without it)")
    serve.add_argument("--n-predict", type=int, default=512, help="tokens INFER / INFER_STREAM generate at most")
    serve.add_argument("--parallel", type=int, metavar="N",
                       help="parallel mode: up to N clients decode at once (each slot gets n_ctx / N tokens), "
                            "the rest wait in FIFO order; without it, one request at a time")
    serve.add_argument("--max-line", type=int, default=MAX_LINE, help=f"bytes in one request line (default {MAX_LINE})")
    serve.add_argument("--max-clients", type=int, default=MAX_CLIENTS,
                       help=f"connections at once (default {MAX_CLIENTS}, fewer under a low open-file limit)")
    session = add("session", help="work with session files").add_subparsers(dest="action", required=True)
    inspect = session.add_parser("inspect", help="print a session file's header, identity and (with --model) its text")
    inspect.add_argument("file")
    inspect.add_argument("--model", help="model whose vocabulary turns the tokens back into text")
    inspect.add_argument("--json", action="store_true")
    return parser


def _grammar(args: argparse.Namespace) -> int:
    from ..grammars import BUILTIN_GRAMMARS, GbnfError, builtin_grammar, parse_gbnf

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
            if isinstance(err, GbnfError):
                where = f"{err.line}:{err.column}: {err.problem}" + (f" (rule '{err.rule}')" if err.rule else "")
            else:  # not a grammar source at all
                where = f"0:0: {err.detail}"
            print(f"{path}:{where}", file=sys.stderr)
            failed += 1
            continue
        print(f"{path}: ok ({len(grammar.rules)} rules)")
    return 1 if failed else 0


def _read(path: str) -> str:
    return sys.stdin.read() if path == "-" else open(path, encoding="utf-8").read()


def _from_schema(args: argparse.Namespace) -> int:
    import warnings

    from ..grammars import convert_json_schema_to_grammar

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
    from ..grammars import accepts, resolve_grammar

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
    from ..conformance import CHECKS, run_checks
    from ..conformance.report import format_report
    from ..params import parse_params
    from ..registry import installed_builtin_backends

    unknown = [name for name in args.check if name not in CHECKS]
    if unknown:
        print(f"llamacompat: unknown check {unknown[0]!r}; checks: {', '.join(CHECKS)}", file=sys.stderr)
        return 2
    params = parse_params(args.param)
    failed = False
    for backend in args.backend or installed_builtin_backends():
        outcomes = run_checks(backend, params, args.check or None)
        print(format_report(backend, outcomes))
        failed = failed or any(o.status == "failed" for o in outcomes)
    return 1 if failed else 0


def _serve(args: argparse.Namespace) -> int:
    from ..bridge.server import run_server
    from ..params import parse_params

    extra = parse_params(args.param)
    params = {"model": args.model, "backend": args.backend, "n_ctx": args.n_ctx, "embedding": args.embedding, **extra}
    if not getattr(args, "debug", False):  # the server's warnings (refused connections, a forced exit) go to stderr
        logging.basicConfig(level=logging.WARNING, format="llamacompat serve: %(message)s")

    def ready(addresses: list[str]) -> None:
        print("llamacompat: serving on " + ", ".join(addresses), flush=True)

    run_server(params, socket_path=args.socket, host=args.host, port=args.port, token=args.token,
               models_dir=args.models_dir, sessions_dir=args.sessions_dir, n_predict=args.n_predict,
               max_line=args.max_line, max_clients=args.max_clients, on_ready=ready, parallel=args.parallel)
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


def _load(params: dict[str, Any], quiet: bool = False) -> LlamaContext:
    """``init_llama`` with a progress bar on stderr while the model loads (a terminal only)."""
    if quiet or not sys.stderr.isatty():
        return init_llama(params)
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    name = os.path.basename(str(params.get("model") or DEFAULT_MODEL))
    with Progress(TextColumn("loading {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(name, total=100)
        return init_llama(params, lambda percent: bar.update(task, completed=percent))


def _model_params(args: argparse.Namespace) -> dict[str, Any]:
    return {"model": args.model, "backend": args.backend, "n_ctx": args.n_ctx}


def _sampling(args: argparse.Namespace) -> dict[str, Any]:
    return {"n_predict": args.n_predict, "temperature": args.temperature, "seed": args.seed, "stop": args.stop}


def _run_completion(args: argparse.Namespace, request: dict[str, Any]) -> int:
    request.update(_sampling(args))

    def show(event: TokenData) -> None:
        sys.stdout.write(event["token"])
        sys.stdout.flush()

    with _load(_model_params(args), quiet=args.json) as ctx:
        _multimodal(ctx, args)
        try:
            result = ctx.completion(request, show)
        except KeyboardInterrupt:  # Ctrl-C ends the answer, not with a traceback
            sys.stdout.write("\n")
            return 130
    sys.stdout.write("\n")
    if args.json:
        print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


def _multimodal(ctx: Any, args: argparse.Namespace) -> None:
    if args.image and not args.mmproj:
        raise InvalidParamsError("--image needs --mmproj FILE (the model's multimodal projector)")
    if args.mmproj:
        ctx.init_multimodal({"path": args.mmproj})


def _with_images(text: str, images: list[str]) -> list[dict[str, Any]] | str:
    """A user message's content: ``text`` after one image_url part per image."""
    if not images:
        return text
    return [*({"type": "image_url", "image_url": {"url": path}} for path in images), {"type": "text", "text": text}]


def _chat(args: argparse.Namespace) -> int:
    if args.message is not None:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": _with_images(args.message, args.image)}
        ]
        return _run_completion(args, {"messages": messages})
    from .repl import Repl

    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:  # pragma: no cover - not on every platform
        pass
    with _load(_model_params(args)) as ctx:
        _multimodal(ctx, args)
        return Repl(ctx, _sampling(args), args.system, images=args.image).run()


def _bench(args: argparse.Namespace) -> int:
    from ..params import parse_params
    from .benchmark import backends_for, format_table, run_bench, summarize

    params = parse_params(args.param)
    backends = backends_for(args.model) if args.compare else args.backend or [_auto_backend(args.model)]
    if not backends:
        print(f"llamacompat: error: no installed backend loads {args.model}", file=sys.stderr)
        return 1
    steps = len(backends) * args.nr
    if args.json or not sys.stderr.isatty():
        rows = run_bench(args.model, backends, args.pp, args.tg, args.nr, params)
    else:
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        with Progress(TextColumn("bench"), BarColumn(), MofNCompleteColumn(), console=Console(stderr=True),
                      transient=True) as bar:
            task = bar.add_task("bench", total=steps)
            rows = run_bench(args.model, backends, args.pp, args.tg, args.nr, params, lambda: bar.advance(task))
    summary = summarize(rows)
    if args.json:
        print(json.dumps({"model": args.model, "pp": args.pp, "tg": args.tg, "nr": args.nr, "results": summary},
                         indent=2))
        return 0
    header, cells = format_table(summary)
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{os.path.basename(args.model)}: pp {args.pp}, tg {args.tg}, median of {args.nr}")
    for i, name in enumerate(header):
        table.add_column(name, justify="left" if i == 0 else "right")
    for row in cells:
        table.add_row(*row)
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)
    return 0


def _auto_backend(model: str) -> str:
    from ..registry import select_backend

    return select_backend("auto", resolve_model(model)).name


def _dispatch(args: argparse.Namespace) -> int:
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
    commands = {"grammar": _grammar, "conformance": _conformance, "session": _inspect_session, "serve": _serve,
                "bench": _bench, "chat": _chat, "models": run_models}
    if args.command in commands:
        return commands[args.command](args)
    prompt = args.prompt
    if args.image and MEDIA_MARKER not in prompt:  # one marker per image, before the text
        prompt = MEDIA_MARKER * len(args.image) + prompt
    return _run_completion(args, {"prompt": prompt, **({"media_paths": args.image} if args.image else {})})


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    debug = getattr(args, "debug", False)
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        print("llamacompat: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # one clear line; the traceback only with --debug
        if debug:
            traceback.print_exc()
        code, text = (err.code, err.detail) if isinstance(err, LlamaError) else (type(err).__name__, str(err))
        print(f"llamacompat: error [{code}]: {text}", file=sys.stderr)
        return 1

