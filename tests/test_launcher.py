"""``shmengine-run`` as a new user meets it (issue 9): the real console script in a subprocess, on
the bundled models. Expected outputs come from ``number_to_words`` (what the models were trained
to write) or from ONNX Runtime driven directly, never from shmengine itself."""

from __future__ import annotations

import json
import os
import pty
import select
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import ROOT, descendants, remove_segments, shm_segments, wait_until

from models.train_numbers import number_to_words

MARIAN = ROOT / "models" / "numbers-marian"


def _launcher() -> list[str]:
    """The installed ``shmengine-run`` beside this interpreter, as a user runs it."""
    script = Path(sys.executable).parent / "shmengine-run"
    return [str(script)] if script.exists() else [sys.executable, "-m", "shmengine.cli"]


def run(*args, stdin: str | bytes | None = None, timeout: float = 240, **kwargs) -> subprocess.CompletedProcess:
    if isinstance(stdin, bytes):  # bytes in, text out
        out = subprocess.run([*_launcher(), *map(str, args)], input=stdin, capture_output=True, timeout=timeout, cwd=ROOT)
        return subprocess.CompletedProcess(out.args, out.returncode, out.stdout.decode(), out.stderr.decode())
    return subprocess.run(
        [*_launcher(), *map(str, args)], input=stdin, capture_output=True, text=True, timeout=timeout, cwd=ROOT, **kwargs
    )


def shell(command: str, timeout: float = 240) -> subprocess.CompletedProcess:
    """``command`` through bash with ``shmengine-run`` meaning the launcher under test."""
    launcher = " ".join(f"'{part}'" for part in _launcher())
    return subprocess.run(["bash", "-c", f"shmengine-run() {{ {launcher} \"$@\"; }}\n{command}"],
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def assert_clean_error(out: subprocess.CompletedProcess, *fragments: str) -> None:
    """A user mistake: exit 2, a one-line message naming what was wrong, no traceback."""
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    for fragment in fragments:
        assert fragment in out.stderr, out.stderr


def marian_copy(tmp_path: Path, name: str = "marian", **generation_config) -> Path:
    """The bundled Marian model with its generation_config.json replaced (the graphs are hard
    links: nothing big is copied)."""
    model = tmp_path / name
    model.mkdir()
    for f in MARIAN.iterdir():
        if f.is_file():  # not a cache directory an engine may have left beside the model
            os.link(f, model / f.name) if f.suffix == ".onnx" else shutil.copy(f, model / f.name)
    (model / "generation_config.json").unlink()
    (model / "generation_config.json").write_text(json.dumps({"decoder_start_token_id": 42, "eos_token_id": 0,
                                                             "pad_token_id": 42, **generation_config}))
    return model


# -- 1. right answers by default -----------------------------------------------------------------


def test_the_readme_command_is_right_on_every_number_0_to_9999():
    numbers = range(10000)
    out = run("translate", "--inter-threads", 2, "--intra-threads", 1, stdin="".join(f"{n}\n" for n in numbers))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    wrong = [(n, line) for n, line in zip(numbers, lines) if line != number_to_words(n)]
    assert len(lines) == 10000 and not wrong, wrong[:10]


def test_beam_search_from_the_launcher_uses_the_exact_stop_rule():
    # 123 and 798 are two the bundled model gets wrong at beam 2 under CTranslate2's stop rule
    numbers = [123, 798, *range(0, 10000, 7)]
    text = "".join(f"{n}\n" for n in numbers)
    exact = run("translate", "--beam-size", 2, stdin=text)
    assert exact.returncode == 0, exact.stderr
    assert exact.stdout.splitlines() == [number_to_words(n) for n in numbers]
    ctranslate2_rule = run("translate", "--beam-size", 2, "--early-stopping", "true", stdin="123\n798\n")
    assert ctranslate2_rule.returncode == 0, ctranslate2_rule.stderr
    assert ctranslate2_rule.stdout.splitlines() != [number_to_words(123), number_to_words(798)]


def test_decoding_defaults_come_from_generation_config(tmp_path):
    # num_beams 2 + early_stopping true is CTranslate2's rule at beam 2: "one hundred two" for 123
    beam = marian_copy(tmp_path, num_beams=2, early_stopping=True)
    assert run("translate", beam, stdin="123\n").stdout == "one hundred two\n"
    # what the user says wins over the model's file
    assert run("translate", beam, "--beam-size", 1, stdin="123\n").stdout == "one hundred twenty three\n"
    # max_length counts the decoder start token, as in transformers: 3 -> two tokens
    short = marian_copy(tmp_path, "short", max_length=3)
    assert run("translate", short, stdin="1984\n").stdout == "one thousand\n"
    verbose = run("-v", "translate", beam, stdin="1\n")
    assert "beam_size = 2 (generation_config.json)" in verbose.stderr


# -- 2. stdout is the one the shell gave ---------------------------------------------------------


def test_output_goes_to_the_inherited_stdout_without_truncating_it(tmp_path):
    (tmp_path / "in.txt").write_text("5\n12\n")
    log = tmp_path / "log"
    log.write_text("earlier entry\n")
    for command in ("translate --input in.txt", "score --source in.txt --target words.txt"):
        (tmp_path / "words.txt").write_text("five\ntwelve\n")
        out = shell(f"cd {tmp_path} && shmengine-run {command} >> log 2>/dev/null")
        assert out.returncode == 0, out.stderr
    lines = log.read_text().splitlines()
    assert lines[:3] == ["earlier entry", "five", "twelve"] and len(lines) == 5
    assert all(" ||| " in line for line in lines[3:])
    out = shell(f"cd {tmp_path} && {{ shmengine-run translate --input in.txt 2>/dev/null; echo done; }} > out")
    assert out.returncode == 0 and (tmp_path / "out").read_text() == "five\ntwelve\ndone\n"


# -- 3, 4. score ---------------------------------------------------------------------------------


def _onnx_mean_log_prob(source: str, target: str) -> float:
    """Mean log-probability of the target words and </s>, teacher-forced through the bundled
    ONNX graphs with ONNX Runtime directly (one full pass, no cache)."""
    import onnxruntime as ort

    vocab = json.loads((MARIAN / "tokenizer.json").read_text())["model"]["vocab"]
    eos, start = 0, 42
    src = np.array([[vocab[c] for c in source] + [eos]], dtype=np.int64)
    tgt = [vocab[w] for w in target.split()] + [eos]
    mask = np.ones_like(src)
    encoder = ort.InferenceSession(str(MARIAN / "encoder_model.onnx"))
    hidden = encoder.run(None, {"input_ids": src, "attention_mask": mask})[0]
    decoder = ort.InferenceSession(str(MARIAN / "decoder_model_merged.onnx"))
    feeds = {"input_ids": np.array([[start] + tgt[:-1]], dtype=np.int64), "encoder_attention_mask": mask,
             "encoder_hidden_states": hidden, "use_cache_branch": np.array([False])}
    for i in decoder.get_inputs():
        if i.name.startswith("past_key_values"):
            feeds[i.name] = np.zeros((1, i.shape[1], 0, i.shape[3]), dtype=np.float32)
    logits = decoder.run(["logits"], feeds)[0][0].astype(np.float64)
    log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(
        -1, keepdims=True
    )
    return float(np.mean([log_probs[i, t] for i, t in enumerate(tgt)]))


def test_score_gives_the_models_log_probability(tmp_path):
    pairs = [("123", "one hundred twenty three"), ("7", "seven"), ("4051", "four thousand fifty one"),
             ("20", "nineteen")]
    (tmp_path / "src").write_text("".join(f"{s}\n" for s, _ in pairs))
    (tmp_path / "tgt").write_text("".join(f"{t}\n" for _, t in pairs))
    out = run("score", "--source", tmp_path / "src", "--target", tmp_path / "tgt")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(" ||| ")[1] for line in lines] == [t for _, t in pairs]
    scores = [float(line.split(" ||| ")[0]) for line in lines]
    np.testing.assert_allclose(scores, [_onnx_mean_log_prob(s, t) for s, t in pairs], atol=2e-5)


def test_score_refuses_files_of_different_lengths(tmp_path):
    (tmp_path / "src").write_text("".join(f"{n}\n" for n in range(50)))
    (tmp_path / "tgt").write_text("".join(f"{number_to_words(n)}\n" for n in range(4)))
    out = run("score", "--source", tmp_path / "src", "--target", tmp_path / "tgt")
    assert_clean_error(out, "--source has 50 lines and --target 4")
    assert out.stdout == ""
    # a target read from a pipe cannot be counted beforehand: it fails where it runs out
    piped = shell(f"seq 0 49 | shmengine-run score --source /dev/stdin --target {tmp_path / 'tgt'}")
    assert_clean_error(piped, "--source has more lines", "line 5")


# -- 5. README snippets --------------------------------------------------------------------------


def _readme_blocks(language: str) -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks, inside, current = [], False, []
    for line in text.splitlines():
        if line.strip() == f"```{language}" and not inside:
            inside, current = True, []
        elif line.strip() == "```" and inside:
            inside = False
            blocks.append("\n".join(current))
        elif inside:
            current.append(line)
    return blocks


def test_every_python_snippet_of_the_readme_runs_as_written():
    blocks = _readme_blocks("python")
    assert len(blocks) >= 2
    for block in blocks:
        out = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=240, cwd=ROOT)
        assert out.returncode == 0, f"{block}\n---\n{out.stderr}"
        # each snippet says what it prints in `# ->` comments: check each claim
        claims = [line.split("# ->", 1)[1].strip() for line in block.splitlines() if "# ->" in line]
        for claim in claims:
            assert claim in out.stdout, f"{block}\n--- printed:\n{out.stdout}"


def test_the_readme_translation_claims_match_the_training_rule():
    # the snippet's claim is itself checked against number_to_words, so it cannot drift
    block = next(b for b in _readme_blocks("python") if "translate_batch" in b)
    assert str(number_to_words(1984).split()) in block


def test_the_readme_shell_commands_run_as_written():
    first = _readme_blocks("bash")[0]
    assert "echo 1984 | shmengine-run translate" in first
    out = shell("echo 1984 | shmengine-run translate")
    assert out.returncode == 0 and out.stdout == number_to_words(1984) + "\n", out.stderr
    out = shell("echo '1984=' | shmengine-run generate")
    assert out.returncode == 0 and out.stdout == number_to_words(1984) + "\n", out.stderr
    # the bundled model's prompt format is said where a user looks for it
    assert "'1984='" in " ".join(run("generate", "--help").stdout.split())


# -- 7, 9, 10. bad input: a message, never a traceback -------------------------------------------


def test_text_that_is_not_utf8_is_named_by_file_and_line(tmp_path):
    assert_clean_error(run("translate", stdin=b"12\n\xff\xfe\x00binary\n"), "stdin, line 2: not valid UTF-8")
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("12\n13\ncaf\xe9\n".encode("latin-1"))
    assert_clean_error(run("generate", "--input", bad), f"{bad}, line 3: not valid UTF-8")
    assert_clean_error(run("translate", "--input", tmp_path), "is a directory")
    assert_clean_error(run("translate", "--input", tmp_path / "nope.txt"), "nope.txt does not exist")


def test_a_missing_model_directory_is_named_as_missing(tmp_path):
    for command in ("translate", "generate", "score"):
        extra = ["--source", "x", "--target", "y"] if command == "score" else []
        out = run(command, tmp_path / "no-such-model", *extra, stdin="1\n")
        assert_clean_error(out, "does not exist", "no-such-model")
        assert "tokenizer.json" not in out.stderr


def test_a_line_longer_than_the_model_is_truncated_with_a_warning_naming_it():
    long = "1" * 200  # the bundled Marian model has 64 positions
    out = run("translate", stdin=f"12\n{long}\n7\n")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 3 and lines[0] == "twelve" and lines[2] == "seven"
    assert "stdin, line 2: 201 tokens, truncated to 64" in out.stderr
    refused = run("translate", "--max-input-length", 0, stdin=f"12\n{long}\n")
    assert_clean_error(refused, "stdin, line 2: 201 tokens, more than the model's 64 positions", "--max-input-length")


# -- 8. a signal to the whole process group ------------------------------------------------------


def _group_term(proc: subprocess.Popen, made: set[str]) -> str:
    children = descendants(proc.pid)
    os.killpg(proc.pid, signal.SIGTERM)  # what timeout -s TERM, kill -TERM -- -PGID and systemd do
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        remove_segments(made)
        pytest.fail("no exit within 30 s of a process-group SIGTERM")
    assert wait_until(lambda: not any(os.path.exists(f"/proc/{p}") for p in children), timeout=5)
    assert wait_until(lambda: not (shm_segments() & made), timeout=5), f"left behind: {shm_segments() & made}"
    return err


def test_sigterm_to_the_process_group_stops_after_a_complete_line(tmp_path):
    numbers = list(range(100_000))
    source, output = tmp_path / "numbers.txt", tmp_path / "words.txt"
    source.write_text("".join(f"{n}\n" for n in numbers))
    before = shm_segments()
    proc = subprocess.Popen([*_launcher(), "translate", "--input", str(source), "--output", str(output),
                             "--max-batch-size", "16"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert wait_until(lambda: output.exists() and output.stat().st_size > 20_000, timeout=60), proc.stderr.read()
    err = _group_term(proc, shm_segments() - before)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "interrupted" in err
    text = output.read_text()
    assert text.endswith("\n")
    lines = text.splitlines()
    assert 0 < len(lines) < len(numbers) and lines == [number_to_words(n) for n in numbers[: len(lines)]]


def test_sigterm_to_the_group_of_a_plain_python_program_leaves_nothing():
    # no handler of its own: the program dies of the signal, and its engine must go with it
    script = textwrap.dedent(f"""
        import sys, time, shmengine
        t = shmengine.Translator({str(MARIAN)!r}, inter_threads=2, intra_threads=1)
        print("ready", flush=True)
        time.sleep(60)
    """)
    before = shm_segments()
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    assert proc.stdout.readline() == "ready\n", proc.stderr.read()
    _group_term(proc, shm_segments() - before)
    assert proc.returncode == -signal.SIGTERM


# -- 15. interactive use -------------------------------------------------------------------------


def test_interactive_translate_answers_each_line_as_it_is_typed():
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([*_launcher(), "translate"], cwd=ROOT, stdin=terminal, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    os.close(terminal)
    try:
        for number in (42, 1984):
            os.write(controller, f"{number}\n".encode())
            ready, _, _ = select.select([proc.stdout], [], [], 60)
            assert ready, f"nothing printed for {number} before the end of input"
            assert proc.stdout.readline().decode() == number_to_words(number) + "\n"
        os.write(controller, b"\x04")  # Ctrl-D
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
        proc.stdout.close()
        proc.stderr.close()


# -- 17. friction ----------------------------------------------------------------------------------


def test_summary_counts_read_as_english():
    out = run("translate", stdin="1\n")
    assert "translated 1 example, 1 token in" in out.stderr and "(1 worker x" in out.stderr


def test_a_slow_start_says_what_is_happening():
    # the notice comes after 2 s of start-up (200 workers took 18 s of silence); 0 s here
    out = run("translate", "--inter-threads", 2, "--intra-threads", 1, stdin="1\n",
              env={**os.environ, "SHMENGINE_RUN_NOTICE_AFTER": "0"})
    assert out.returncode == 0 and out.stdout == "one\n", out.stderr
    assert "starting 2 worker processes and loading the model" in out.stderr


def test_many_intra_threads_print_no_library_error_into_the_summary():
    out = run("translate", "--intra-threads", 80, stdin="1\n")
    assert out.returncode == 0 and out.stdout == "one\n", out.stderr
    assert "nthreads cannot be larger" not in out.stderr
    assert any(line.startswith("translated 1 example") for line in out.stderr.splitlines())


# -- 6. bench / tune on a generation model -------------------------------------------------------


def test_bench_and_tune_run_on_a_kv_cached_generation_model():
    # synthetic inputs must agree on each symbolic dim: the attention mask spans past + new tokens
    gpt2 = ROOT / "models" / "numbers-gpt2"
    bench = run("bench", gpt2, "--batches", 5, "--latency-runs", 2)
    assert bench.returncode == 0, bench.stderr
    assert "batches/s" in bench.stdout
    tune = run("tune", gpt2, "--batch-size", 2, "--batches", 5, "--latency-runs", 2, "--plot", "")
    assert tune.returncode == 0, tune.stderr
    assert "best for throughput: inter_threads=" in tune.stdout


def test_version_and_info_on_a_translator_directory():
    version = run("--version")
    assert version.returncode == 0 and version.stdout.startswith("shmengine-run ")
    info = run("info", MARIAN, "--inter-threads", 2, "--intra-threads", 1)
    assert info.returncode == 0, info.stderr
    assert "worker 0: pid" in info.stdout and "worker 1: pid" in info.stdout
    assert f"Model: {MARIAN}" in info.stdout
    # the wheel's build is not a device: "device GPU" was printed on machines without one
    assert "(device " not in info.stdout and " build)" in info.stdout


def test_every_option_has_help_and_says_its_default():
    commands = ["translate", "bench"]  # the rest in-process below: each --help is an interpreter start
    for command in commands:
        out = run(command, "--help")
        assert out.returncode == 0, out.stderr
        text = " ".join(out.stdout.split())
        for option in ("--inter-threads", "--intra-threads", "--batch-size", "--max-batch-size", "--beam-size"):
            if f"{option} " in text.split("options:")[1]:
                after = text.split("options:")[1].split(f"{option} ", 1)[1].split(" --", 1)[0]
                assert "default" in after, (command, option, after)
    import argparse

    from shmengine.cli.main import build_parser

    subcommands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    missing = [(name, a.option_strings or a.dest) for name, sub in subcommands.choices.items()
               for a in sub._actions if not a.help]
    assert not missing
