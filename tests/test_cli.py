"""shmengine-run as a user runs it: a real subprocess on the bundled default model."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT

from models.builders import mlp_model, mlp_reference
from models.train_numbers import number_to_words
from shmengine.cli.tuning import candidate_splits
from shmengine.runtime.threads import usable_cores


def shmengine_run(*args, timeout=240, cpus=None):
    """Run the launcher; ``cpus`` (a set of CPU numbers) is the affinity it runs with."""
    return subprocess.run(
        [sys.executable, "-m", "shmengine.cli", *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
        preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None,
    )


def test_run_on_the_default_model_matches_numpy(tmp_path):
    _, params = mlp_model([256, 512, 512, 256], seed=1984)  # how models/default was built
    x = np.random.default_rng(5).standard_normal((300, 256)).astype(np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    out = shmengine_run("run", "--inter-threads", "2", "--batch-size", "64",
                        "--input", str(tmp_path / "in.npz"), "--output", str(tmp_path / "out.npz"))
    assert out.returncode == 0, out.stderr
    assert "300 examples in 5 batches" in out.stderr and "examples/s" in out.stderr
    with np.load(tmp_path / "out.npz") as result:
        np.testing.assert_allclose(result["y"], mlp_reference(x.astype(np.float64), params), rtol=1e-4, atol=1e-4)


def test_info_reports_each_worker():
    out = shmengine_run("info", "--inter-threads", "2", "--intra-threads", "1")
    assert out.returncode == 0, out.stderr
    assert "ONNX Runtime" in out.stdout and "usable cores" in out.stdout
    assert out.stdout.count("intra_op_num_threads=1") == 2
    assert "worker 0: pid" in out.stdout and "worker 1: pid" in out.stdout


def test_tune_sweeps_splits_writes_a_plot_and_names_the_best(tmp_path):
    """The sweep covers every split that fits the cores the launcher may use. It runs on two CPUs
    of this machine (three splits), so that it takes the same time on 2 cores as on 128 (645)."""
    plot = tmp_path / "tune.png"
    cpus = set(sorted(os.sched_getaffinity(0))[:2])
    # what usable_cores() reports in the child: its affinity, capped by this cgroup's CPU quota
    cores = min(len(cpus), usable_cores())
    out = shmengine_run("tune", "--batch-size", "4", "--batches", "20", "--latency-runs", "5", "--plot", str(plot), cpus=cpus)
    assert out.returncode == 0, out.stderr
    assert "best for throughput: inter_threads=" in out.stdout
    assert "best for latency:    inter_threads=" in out.stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    rows = [line for line in out.stdout.splitlines() if line.split()[:1] and line.split()[0].isdigit()]
    assert sorted((int(r.split()[0]), int(r.split()[1])) for r in rows) == sorted(candidate_splits(cores))


def test_bad_model_path_is_a_clear_error_with_exit_code_2(tmp_path):
    out = shmengine_run("run", str(tmp_path / "nope"))
    assert out.returncode == 2
    assert "does not exist" in out.stderr and "Traceback" not in out.stderr


def test_candidate_splits_are_every_split_that_fits():
    assert candidate_splits(2) == [(1, 1), (1, 2), (2, 1)]
    assert all(i * j <= 8 for i, j in candidate_splits(8)) and (8, 1) in candidate_splits(8) and (1, 8) in candidate_splits(8)


# -- options with no other test ---------------------------------------------------------------------

NUMBERS = [1984, 42, 7, 300, 86021, 15, 99, 1000]


def test_info_without_an_engine_starts_no_worker():
    out = shmengine_run("info", "--no-engine")
    assert out.returncode == 0, out.stderr
    assert "ONNX Runtime" in out.stdout and "usable cores" in out.stdout
    assert "worker 0" not in out.stdout and "intra_op_num_threads" not in out.stdout


def test_run_without_input_runs_synthetic_examples(tmp_path):
    """Without --input: --examples rows of the inputs synthetic_feeds makes for the model, run in
    --batch-size batches; the outputs are numpy's for those rows."""
    from onnx import TensorProto

    from shmengine.cli.tuning import synthetic_feeds
    from shmengine.model.weights import TensorSpec

    out = shmengine_run("run", "--examples", "100", "--batch-size", "32", "--seed", "3", "--output", str(tmp_path / "out.npz"))
    assert out.returncode == 0, out.stderr
    assert "100 examples in 4 batches" in out.stderr
    assert "y: shape (100, 256), dtype float32" in out.stdout
    _, params = mlp_model([256, 512, 512, 256], seed=1984)  # how models/default was built
    # the default model's one input, as models/builders.mlp_model declares it
    x = synthetic_feeds([TensorSpec("x", TensorProto.FLOAT, ("batch", 256))], 100, seed=3)["x"]
    with np.load(tmp_path / "out.npz") as result:
        np.testing.assert_allclose(result["y"], mlp_reference(x.astype(np.float64), params), rtol=1e-4, atol=1e-4)


def test_tokenize_space_and_sampling_flags_reach_the_api():
    """--tokenize space takes each line's tokens as they are; the decoding flags and --seed give
    what the Python API gives with the same options and seed (sampling makes every flag count)."""
    import shmengine

    lines = [" ".join([*str(n), "</s>"]) for n in NUMBERS]
    flags = {"beam_size": 1, "sampling_topk": 4, "sampling_topp": 0.9, "sampling_temperature": 50.0,
             "repetition_penalty": 1.3, "no_repeat_ngram_size": 2, "length_penalty": 0.5, "max_decoding_length": 7}
    args = [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    out = subprocess.run([sys.executable, "-m", "shmengine.cli", "translate", "--tokenize", "space", "--seed", "5", *args],
                         input="".join(line + "\n" for line in lines), capture_output=True, text=True, timeout=240, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    with shmengine.Translator(ROOT / "models" / "numbers-marian", inter_threads=1, intra_threads=1) as translator:
        shmengine.set_random_seed(5)
        expected = translator.translate_batch([line.split() for line in lines], max_batch_size=32, **flags)
        greedy = translator.translate_batch([line.split() for line in lines], beam_size=1)
    assert out.stdout.splitlines() == [" ".join(r.hypotheses[0]) for r in expected]
    assert out.stdout.splitlines() != [" ".join(r.hypotheses[0]) for r in greedy]  # the flags did something
    assert all(len(line.split()) <= 7 for line in out.stdout.splitlines())


def test_prepack_weights_several_workers_and_a_small_queue_translate_right():
    out = subprocess.run(
        [sys.executable, "-m", "shmengine.cli", "translate", "--prepack-weights", "--inter-threads", "2",
         "--intra-threads", "1", "--max-queued-batches", "1", "--max-batch-size", "2", "--device", "auto"],
        input="".join(f"{n}\n" for n in NUMBERS), capture_output=True, text=True, timeout=240, cwd=ROOT,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [number_to_words(n) for n in NUMBERS]
    assert "2 workers" in out.stderr


@pytest.mark.parametrize("args, message", [
    (["--device", "tpu"], "device must be one of 'cpu', 'cuda', 'auto', got 'tpu'"),
    (["--max-queued-batches", "-2"], "max_queued_batches must be -1 (unlimited), 0 (automatic) or > 0, got -2"),
])
def test_bad_engine_options_are_one_line_errors(args, message):
    out = subprocess.run([sys.executable, "-m", "shmengine.cli", "translate", *args], input="1\n",
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2 and out.stdout == ""
    assert f"shmengine-run: error: {message}" in out.stderr and "Traceback" not in out.stderr


def test_verbose_logs_where_each_setting_comes_from():
    run = [sys.executable, "-m", "shmengine.cli"]
    quiet = subprocess.run([*run, "translate"], input="1984\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    loud = subprocess.run([*run, "-v", "translate"], input="1984\n", capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert quiet.returncode == loud.returncode == 0, loud.stderr
    assert quiet.stdout == loud.stdout == "one thousand nine hundred eighty four\n"
    assert "shmengine.cli.main: beam_size = 1 (generation_config.json)" in loud.stderr
    assert "shmengine" not in quiet.stderr.replace("shmengine-run", "")


def test_a_reader_that_goes_away_ends_the_run_quietly(tmp_path):
    """``shmengine-run translate ... | head -1``: exit 0, no traceback, nothing left behind."""
    source = tmp_path / "numbers.txt"
    source.write_text("".join(f"{n}\n" for n in range(20_000)))
    proc = subprocess.Popen([sys.executable, "-m", "shmengine.cli", "translate", "--input", str(source)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    assert proc.stdout.readline() == b"zero\n"
    proc.stdout.close()  # what head does after its line
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err.decode()
    assert b"Traceback" not in err and b"BrokenPipe" not in err


@pytest.mark.parametrize("command", ["translate", "generate", "score-source", "score-target"])
def test_output_onto_an_input_file_is_refused_and_the_input_kept(tmp_path, command):
    """--output naming the file being read (itself or through a link) would empty it before a
    line is read: refused with a one-line error, exit 2, the input unchanged."""
    source, target = tmp_path / "in.txt", tmp_path / "words.txt"
    source.write_text("1984\n7\n")
    target.write_text("one thousand nine hundred eighty four\nseven\n")
    link = tmp_path / "link.txt"
    link.symlink_to(target if command == "score-target" else source)
    if command.startswith("score"):
        args = ["score", "--source", str(source), "--target", str(target)]
    else:
        args = [command, "--input", str(source)]
    out = shmengine_run(*args, "--output", str(link))
    assert out.returncode == 2, out.stderr
    assert "is the input file" in out.stderr and "Traceback" not in out.stderr
    assert source.read_text() == "1984\n7\n"
    assert target.read_text() == "one thousand nine hundred eighty four\nseven\n"
