"""Requests that used to kill the process or hold its worker (issue 24): grammar dead ends that reached
llama.cpp's abort, chat templates that loop for hours, unbounded benches, limits that surfaced as
RecursionError or std::bad_alloc. Each attack runs against the real model; the ones that once aborted run
in a child process or on a live ``llamacompat serve``, so a regression fails a test instead of the runner.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from llamacompat import GrammarError, InvalidParamsError, TemplateError, init_llama
from llamacompat.chat.template import render
from llamacompat.registry import installed_builtin_backends

from .bridge_helpers import Raw, Served
from .conftest import GREEDY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GRAMMAR_BACKENDS = [name for name in ("llama_cpp", "mlx") if name in installed_builtin_backends()]
LOOPS = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
MESSAGES = [{"role": "user", "content": "Hi"}]


# -- grammar dead ends ----------------------------------------------------------------------------
@pytest.fixture(scope="module", params=GRAMMAR_BACKENDS)
def attacks(request):
    """tests/hostile_attacks.py on one backend, in a child process: its exit status and one outcome per attack."""
    child = subprocess.run([sys.executable, "-m", "tests.hostile_attacks", request.param], cwd=ROOT, capture_output=True,
                           text=True, timeout=600, env={**os.environ, "PYTHONPATH": ROOT})
    outcomes = {line["name"]: line for line in map(json.loads, child.stdout.splitlines())}
    return child, outcomes


def test_no_grammar_dead_end_kills_the_process(attacks):
    child, outcomes = attacks
    assert child.returncode == 0, child.stderr[-3000:]  # it was -6 (SIGABRT) at the first attack
    assert outcomes["after"]["text"] == " Paris.\n\n"  # and the context still answers correctly


@pytest.mark.parametrize("name, texts", [("ignore_eos_schema", {"true", "false"}),
                                         ("ignore_eos_schema_greedy", {"true", "false"}),
                                         ("ignore_eos_grammar", {"yes", "no"})])
def test_a_complete_grammar_ends_the_completion_despite_ignore_eos(attacks, name, texts):
    outcome = attacks[1][name]
    assert "error" not in outcome, outcome
    assert outcome["text"] in texts and outcome["stopped_eos"] is True and outcome["stopped_limit"] is False


def test_bans_on_every_token_the_grammar_allows_are_a_grammar_error(attacks):
    outcomes = attacks[1]
    first = outcomes["bias_bans_grammar"]
    assert first["error"] == "GrammarError" and "logit_bias (or ignore_eos) bans every token the grammar allows" in first["message"]
    midway = outcomes["bias_bans_midway"]  # after one streamed token, before a refused one is accepted
    assert midway["error"] == "GrammarError" and midway["streamed"] in ("a", "b"), midway
    assert f"the 1 generated ({midway['streamed']!r})" in midway["message"]


def test_grammars_no_token_can_match_are_refused_with_line_and_column(attacks):
    outcomes = attacks[1]
    assert outcomes["empty_class"]["error"] == "GbnfError"
    assert "line 1, column 10 (rule 'root'): character class [^\\x00-\\U0010FFFF] excludes every character" in (
        outcomes["empty_class"]["message"])
    assert outcomes["unknown_token_id"]["error"] == "GbnfError"
    assert "line 1, column 10 (rule 'root'): token <[99999999]> is outside the vocabulary" in outcomes["unknown_token_id"]["message"]
    assert outcomes["bans_every_token"]["error"] == "InvalidParamsError"
    assert "logit_bias bans every one of the 49152 tokens" in outcomes["bans_every_token"]["message"]


def test_grammars_at_the_nesting_and_rule_limits_run(attacks):
    for name in ("nested_100", "chain_1000_rules"):
        outcome = attacks[1][name]
        assert outcome.get("text") == "a" and outcome["stopped_eos"], outcome
    wide = attacks[1]["schema_300_optional_properties"]  # once parentheses nested 300 deep
    assert "error" not in wide and wide["text"].startswith("{"), wide


def test_a_grammar_dead_end_on_the_bridge_leaves_the_server_and_a_queued_client_working(tmp_path):
    served = Served(str(tmp_path))
    assert served.started, served.log()
    attacker, bystander = Raw(served.socket), Raw(served.socket)
    try:
        attacker.send({"id": 1, "method": "completion", "params": {"params": {
            "prompt": "A:", "n_predict": 8, "json_schema": {"type": "boolean"}, "ignore_eos": True}}})
        bystander.send({"id": 1, "method": "completion", "params": {"params": {"prompt": "B:", "n_predict": 4, **GREEDY}}})
        assert attacker.until(1)[1]["result"]["text"] in ("true", "false")
        attacker.send({"id": 2, "method": "completion", "params": {"params": {
            "prompt": "A:", "grammar": 'root ::= "a"', "logit_bias": [["a", False]]}}})
        assert attacker.until(2)[1]["error"]["code"] == "grammar_error"
        assert bystander.until(1)[1]["result"]["tokens_predicted"] == 4
        assert served.proc.poll() is None
        assert attacker.ask({"id": 3, "method": "tokenize", "params": {"text": "Hello world"}})["result"]["tokens"] == [19556, 905]
    finally:
        attacker.close()
        bystander.close()
        assert served.stop() == 0, served.log()


# -- chat templates ---------------------------------------------------------------------------------
def test_a_looping_chat_template_ends_with_a_template_error(ctx):
    started = time.perf_counter()
    with pytest.raises(TemplateError, match=r"chat template line 1: rendering used more than 1 s of CPU time"):
        ctx.completion({"messages": MESSAGES, "chat_template": LOOPS, "n_predict": 4})
    with pytest.raises(TemplateError, match="the template loops too much"):
        ctx.get_formatted_chat(MESSAGES, LOOPS)
    assert time.perf_counter() - started < 20  # about 1 s of CPU each; the loops alone would run for hours
    assert ctx.completion({"messages": MESSAGES, "n_predict": 2})["tokens_predicted"] == 2


def test_stop_completion_ends_a_template_render(ctx):
    box: dict = {}
    template = "{# a template of its own: one that ran past its budget fails at once #}" + LOOPS
    worker = threading.Thread(target=lambda: box.update(r=ctx.completion({"messages": MESSAGES, "chat_template": template})))
    worker.start()
    time.sleep(0.3)  # rendering: the budget (1 s of CPU) is not spent yet
    ctx.stop_completion()
    worker.join(10)
    assert not worker.is_alive()
    result = box["r"]  # a result, not the budget's TemplateError: stop ended the render
    assert result["interrupted"] is True and result["tokens_predicted"] == 0 and result["text"] == ""


@pytest.mark.parametrize("source, problem", [
    ("{{ 'a' * 10**10 }}", "a '*' would build more than the limit of 10000000"),
    ("{{ 2 ** 10000000 }}", "too large a number"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x ~ ns.x %}{% endfor %}",
     "a '~' built 16777216 characters"),
    ("{% set ns = namespace(x='ab') %}{% for i in range(64) %}{% set ns.x = ns.x + ns.x %}{% endfor %}",
     "a '+' would build more than"),
])
def test_template_operators_cannot_build_huge_values(source, problem):
    with pytest.raises(TemplateError, match=re.escape(problem)):
        render(source, {})
    assert render("{{ 'ab' * 3 }} {{ 2 ** 10 }} {{ [1] + [2] }} {{ 'a' ~ 'b' }}", {}) == "ababab 1024 [1, 2] ab"


def test_a_looping_template_inside_the_gguf_is_refused_and_the_model_still_serves(model_path, tmp_path):
    data = open(model_path, "rb").read()
    start = data.index(b"{% for message in messages %}")  # SmolLM2's template, embedded in the file
    tail = b"<|im_start|>assistant\n' }}{% endif %}"
    end = data.index(tail, start) + len(tail)
    hostile = LOOPS.encode().ljust(end - start)
    patched = tmp_path / "looping-template.gguf"
    patched.write_bytes(data[:start] + hostile + data[end:])
    started = time.perf_counter()
    with init_llama({"model": str(patched), "n_ctx": 512, "n_threads": 2}) as looping:
        for _ in range(2):  # the second request fails at once: the template's overrun is remembered
            with pytest.raises(TemplateError, match="the template loops too much"):
                looping.completion({"messages": MESSAGES, "n_predict": 2})
        assert time.perf_counter() - started < 30
        assert looping.completion({"prompt": "Hi", "n_predict": 2})["tokens_predicted"] == 2


# -- bench ------------------------------------------------------------------------------------------
def test_bench_is_bounded(ctx):
    with pytest.raises(InvalidParamsError, match="nr = 1000000000 is above the limit of 100 rounds"):
        ctx.bench(8, 4, 1, 10**9)
    with pytest.raises(InvalidParamsError, match="exceeds n_ctx 1024"):
        ctx.bench(10**9, 10**9)


def test_stop_completion_ends_a_bench(ctx):
    box: dict = {}
    worker = threading.Thread(target=lambda: box.update(r=ctx.bench(256, 512, 1, 100)))  # many minutes unstopped
    worker.start()
    time.sleep(1.0)
    ctx.stop_completion()
    worker.join(30)
    assert not worker.is_alive()
    assert box["r"]["interrupted"] is True
    assert ctx.completion({"prompt": "Hi", "n_predict": 2})["tokens_predicted"] == 2
    assert "interrupted" not in ctx.bench(8, 4)  # a stop before it does not carry over


# -- limits that were a RecursionError or std::bad_alloc ----------------------------------------------
def test_context_and_sampling_limits_are_typed_errors(ctx):
    with pytest.raises(InvalidParamsError, match="'n_threads' must be between 0 and 512"):
        init_llama({"n_threads": 100_000})
    with pytest.raises(InvalidParamsError, match="below \\+inf or false"):
        ctx.completion({"prompt": "Hi", "logit_bias": [["a", float("inf")]]})
    with pytest.raises(InvalidParamsError, match="logit_bias and ignore_eos ban every one of the 49152 tokens"):
        ctx.completion({"prompt": "Hi", "ignore_eos": True,
                        "logit_bias": [[t, False] for t in range(49152) if t not in (0, 2, 4)]})  # these end generation
    with pytest.raises(GrammarError, match="nested more than 100 levels deep"):
        ctx.completion({"prompt": "Hi", "grammar": "root ::= " + "(" * 200 + '"a"' + ")" * 200})
