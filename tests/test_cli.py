"""The llamacompat command, run in-process and as the installed console script."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

from llamacompat.cli import main


def test_chat_streams_the_answer(capsys):
    assert main(["chat", "Name the capital of France.", "--n-predict", "24"]) == 0
    assert "Paris" in capsys.readouterr().out


def test_complete_with_json_result(capsys):
    assert main(["complete", "The sky is", "--n-predict", "5", "--json"]) == 0
    out = capsys.readouterr().out
    result = json.loads(out[out.index("{"):])
    assert result["tokens_predicted"] == 5 and out.startswith(result["text"])


def test_info_prints_metadata(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "general.architecture" in out and "llama" in out
    assert main(["info", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["llama.context_length"] == "8192"


def test_errors_are_one_line_with_code(capsys, tmp_path):
    assert main(["complete", "x", "--model", str(tmp_path / "none.gguf")]) == 1
    err = capsys.readouterr().err
    assert "model_load_error" in err and "Traceback" not in err


def test_console_script_is_installed():
    exe = shutil.which("llamacompat")
    assert exe, "the llamacompat console script is not on PATH (pip install -e .)"
    out = subprocess.run([exe, "chat", "Name the capital of France.", "--n-predict", "24"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "Paris" in out.stdout
    assert out.stderr == ""  # llama.cpp's own logging stays out of the terminal


def test_library_logs_nothing_to_stderr_on_interrupts():
    """An expected prompt abort makes llama.cpp log warnings; they go to logging, not the terminal."""
    code = (
        "import threading, time\n"
        "from llamacompat import init_llama\n"
        "ctx = init_llama({'n_ctx': 1024})\n"
        "t = threading.Thread(target=lambda: ctx.completion({'prompt': 'word ' * 900, 'n_predict': 2}))\n"
        "t.start(); time.sleep(0.1); ctx.stop_completion(); t.join(); ctx.release()\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == ""


def test_session_inspect(capsys, ctx, tmp_path):
    path = str(tmp_path / "s.session")
    ctx.completion({"prompt": "Hello, sea", "n_predict": 0})
    n = ctx.save_session(path)
    assert main(["session", "inspect", path, "--model", "smollm2"]) == 0
    out = capsys.readouterr().out
    assert f"tokens    {n} " in out and "saved by  llama_cpp: Smollm2" in out and "prompt    'Hello, sea'" in out
    assert main(["session", "inspect", "file://" + path, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["tokens"] == ctx.tokenize("Hello, sea")["tokens"] and report["saved_by"]["backend"] == "llama_cpp"
    (tmp_path / "junk").write_bytes(b"not a session at all")
    assert main(["session", "inspect", str(tmp_path / "junk")]) == 1
    assert "not a llama.cpp session file" in capsys.readouterr().err
