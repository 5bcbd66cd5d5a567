"""Prove that tests catch what they claim: break the code on purpose, in a scratch copy, and run
the tests that should notice.

Each entry of ``BREAKS`` names one deliberate break (an exact, unique text replacement in one
file) and the tests that must fail because of it. For each selected break this script copies the
working tree to a temporary directory, runs the tests there unbroken (they must pass: a test that
fails anyway proves nothing), applies the break, runs them again (each must fail), and prints one
line per break: CAUGHT, MISSED (a test passed with the code broken), BASELINE FAILS, or STALE (the
text to replace is no longer in the file). The shared checkout is never modified.

    python tools/catches.py                 # every break
    python tools/catches.py --list          # names only
    python tools/catches.py score-pairs retry-once   # some of them

Parity tests need ``SHMENGINE_REFERENCE_CACHE`` set to a built reference cache (else each run
builds the reference models again, about a minute). Tests run with ``python -m pytest`` from the copy's root, so the copy's ``shmengine`` is the one
imported (the editable install's path comes after the current directory).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Break:
    name: str
    item: str  # where the break comes from (issue 10's numbering)
    path: str
    old: str
    new: str
    tests: list[str]


BREAKS = [
    Break(
        "score-pairs-cli", "1", "shmengine/cli/main.py",
        "            sources, targets = zip(*chunk)\n",
        "            sources, targets = zip(*chunk)\n            sources = sources[1:] + sources[:1]  # BREAK: each target against the next source\n",
        ["tests/test_faults.py::test_signal_during_a_long_score_file"],
    ),
    Break(
        "retry-once-off", "3", "shmengine/runtime/pool.py",
        "            if batch.attempts < 2:\n",
        "            if batch.attempts < 1:  # BREAK: no retry\n",
        ["tests/test_faults.py::test_1000_requests_while_a_chaos_thread_kills_20_workers",
         "tests/test_pool.py::test_sigkill_under_concurrent_load_loses_nothing"],
    ),
    Break(
        "constant-seed", "4", "shmengine/api/options.py",
        "        return int(source.integers(0, 2**63 - 1))\n",
        "        return 42  # BREAK: every batch the same seed\n",
        ["tests/test_generation.py::test_sampling_is_reproducible_with_set_random_seed"],
    ),
    Break(
        "seed-ignored", "4", "shmengine/api/options.py",
        "        _seed_source = np.random.default_rng(seed)\n",
        "        _seed_source = np.random.default_rng(0)  # BREAK: the seed is not used\n",
        ["tests/test_generation.py::test_sampling_is_reproducible_with_set_random_seed"],
    ),
    Break(
        "one-seed-per-call", "4", "shmengine/api/generator.py",
        "    return select_examples(options, indices, seed=next_seed() if options.seed is not None else None)\n",
        "    return select_examples(options, indices)  # BREAK: every sub-batch of a call samples with the call's seed\n",
        ["tests/test_generation.py::test_sampling_is_reproducible_with_set_random_seed"],
    ),
    Break(
        "finished-stay-in-batch", "6", "shmengine/decode/decoding.py",
        "            if done:\n                continue\n            keep_examples.append(i)\n",
        "            keep_examples.append(i)  # BREAK: a finished example keeps its rows\n",
        ["tests/test_decoding.py::test_beam_returns_sorted_hypotheses_and_finished_examples_leave_the_batch"],
    ),
    Break(
        "topk-plus-one", "weaker list", "shmengine/decode/decoding.py",
        "else min(options.sampling_topk, vocab)",
        "else min(options.sampling_topk + 1, vocab)  # BREAK",
        ["tests/test_decoding.py::test_sampling_is_reproducible_and_topk_restricts"],
    ),
    Break(
        "prefix-ignored", "weaker list", "shmengine/api/translator.py",
        "            forced=forced if any(forced) else None,\n",
        "            forced=None,  # BREAK: target_prefix not forced\n",
        ["tests/test_generation.py::test_target_prefix_is_kept_and_continued"],
    ),
    Break(
        "score-without-end", "weaker list", "shmengine/api/translator.py",
        "            targets.append(ids + [eos])\n",
        "            targets.append(ids)  # BREAK: the end token is not scored\n",
        ["tests/test_generation.py::test_scores_prefer_the_right_words"],
    ),
    Break(
        "unknown-tokens-dropped", "weaker list", "shmengine/model/vocab.py",
        "                index = self.unk_id\n",
        "                continue  # BREAK: unknown tokens are dropped\n",
        ["tests/test_generation.py::test_bad_inputs_get_clear_errors_and_the_engine_stays_usable"],
    ),
    Break(
        "cancelled-batch-runs", "weaker list", "shmengine/runtime/pool.py",
        "            if batch.future.set_running_or_notify_cancel():\n                return batch\n",
        "            batch.future.set_running_or_notify_cancel()\n            return batch  # BREAK: runs even when cancelled\n",
        ["tests/test_pool.py::test_cancelled_queued_batch_never_runs"],
    ),
    Break(
        "queue-never-full", "9", "shmengine/runtime/pool.py",
        "                if self._queue_size is None or len(self._pending) < self._queue_size:\n",
        "                if True:  # BREAK: submit never blocks\n",
        ["tests/test_pool.py::test_full_queue_blocks_the_submitter",
         "tests/test_faults.py::test_flood_of_100k_requests_blocks_the_submitter_and_close_is_prompt"],
    ),
    Break(
        "close-forgets-queued", "9", "shmengine/runtime/pool.py",
        "            _fail(batch.future, EngineClosedError(\"the engine was closed before this batch ran\"))\n",
        "            pass  # BREAK: queued batches are left waiting for ever\n",
        ["tests/test_faults.py::test_flood_of_100k_requests_blocks_the_submitter_and_close_is_prompt"],
    ),
    Break(
        "small-outputs-wrong", "9", "shmengine/api/engine.py",
        "        return dict(zip(names, self.session.run(names, feeds)))\n",
        "        return dict(zip(names, [o + (o.size <= 32) for o in self.session.run(names, feeds)]))  # BREAK\n",
        ["tests/test_faults.py::test_flood_of_100k_requests_blocks_the_submitter_and_close_is_prompt"],
    ),
    Break(
        "tune-one-core-too-many", "8", "shmengine/cli/tuning.py",
        "    cores = cores or usable_cores()\n",
        "    cores = cores or usable_cores() + 1  # BREAK\n",
        ["tests/test_cli.py::test_tune_sweeps_splits_writes_a_plot_and_names_the_best"],
    ),
    Break(
        "static-prompt-ignored", "11", "shmengine/api/generator.py",
        "            ids = static + self.vocabulary.to_ids(tokens, where=f\"start_tokens[{i}]\")\n",
        "            ids = self.vocabulary.to_ids(tokens, where=f\"start_tokens[{i}]\")  # BREAK\n",
        ["tests/parity/test_decoding_options.py::test_generator_option_equals_ctranslate2[static_prompt]"],
    ),
    Break(
        "suppress-ignored", "11", "shmengine/api/options.py",
        "        suppress.extend(ids)\n",
        "        pass  # BREAK: suppress_sequences ignored\n",
        ["tests/parity/test_decoding_options.py::test_generator_option_equals_ctranslate2[suppress_sequences]",
         "tests/parity/test_decoding_options.py::test_translator_option_equals_ctranslate2[suppress_sequences]"],
    ),
    Break(
        "disable-unk-ignored", "11", "shmengine/api/options.py",
        "        suppress.append(vocab.unk_id)\n",
        "        pass  # BREAK: disable_unk ignored\n",
        ["tests/parity/test_decoding_options.py::test_generator_option_equals_ctranslate2[disable_unk]",
         "tests/parity/test_decoding_options.py::test_translator_option_equals_ctranslate2[disable_unk]"],
    ),
    Break(
        "score-offset-ignored", "11", "shmengine/api/generator.py",
        "            ids = sequences[example][1 + offset :]\n            return ScoringResult(tokens=self.vocabulary.to_tokens(ids), log_probs=list(log_probs[offset:]))\n",
        "            ids = sequences[example][1:]\n            return ScoringResult(tokens=self.vocabulary.to_tokens(ids), log_probs=list(log_probs))  # BREAK\n",
        ["tests/parity/test_decoding_options.py::test_generator_score_batch_offset_max_input_length_and_asynchronous"],
    ),
    Break(
        "score-target-not-truncated", "11", "shmengine/api/translator.py",
        "                ids = ids[: max(0, max_input_length - 1)]\n",
        "                pass  # BREAK: the target is not truncated\n",
        ["tests/parity/test_decoding_options.py::test_translator_score_batch_max_input_length_and_asynchronous"],
    ),
    Break(
        "top-p-ignored", "11", "shmengine/decode/decoding.py",
        "    if options.sampling_topp < 1:\n",
        "    if False:  # BREAK: top-p ignored\n",
        ["tests/parity/test_decoding_options.py::test_top_p_samples_only_from_transformers_nucleus"],
    ),
    Break(
        "score-pairs-api", "11", "shmengine/api/translator.py",
        "            src, tgt = zip(*chunk)\n",
        "            src, tgt = zip(*chunk)\n            src = src[1:] + src[:1]  # BREAK: each target against the next source\n",
        ["tests/test_api_surface.py::test_score_file_with_tokens_score_and_score_iterable_pair_lines"],
    ),
    Break(
        "translate-file-prefixes-ignored", "11", "shmengine/api/translator.py",
        "        if target_path is not None:\n            prefixes =",
        "        if False:  # BREAK\n            prefixes =",
        ["tests/test_api_surface.py::test_translate_file_with_target_prefixes_and_scores"],
    ),
    Break(
        "cli-seed-ignored", "11", "shmengine/cli/main.py",
        "        set_random_seed(args.seed)\n",
        "        pass  # BREAK: --seed ignored\n",
        ["tests/test_cli.py::test_tokenize_space_and_sampling_flags_reach_the_api"],
    ),
    Break(
        "second-signal-waits", "11", "shmengine/cli/main.py",
        "    def _handle(self, signum, frame) -> None:\n        if self.requested:\n            raise KeyboardInterrupt\n",
        "    def _handle(self, signum, frame) -> None:\n        if self.requested:\n            return  # BREAK\n",
        ["tests/test_faults.py::test_a_second_ctrl_c_stops_at_once"],
    ),
    Break(
        "broken-pipe-traceback", "11", "shmengine/cli/main.py",
        "    except BrokenPipeError:  # the reader went away (| head)\n",
        "    except ZeroDivisionError:  # BREAK: BrokenPipeError not handled\n",
        ["tests/test_cli.py::test_a_reader_that_goes_away_ends_the_run_quietly"],
    ),
    Break(
        "info-no-engine-starts-one", "11", "shmengine/cli/main.py",
        "    if args.no_engine:\n        print(parallel_info())\n        return 0\n",
        "    if False:  # BREAK\n        print(parallel_info())\n        return 0\n",
        ["tests/test_cli.py::test_info_without_an_engine_starts_no_worker"],
    ),
    Break(
        "encoder-ignores-graph-pooler", "11", "shmengine/decode/programs.py",
        "        pooled = outputs.get(\"pooler_output\")\n",
        "        pooled = None  # BREAK: always the mean\n",
        ["tests/parity/test_encoder.py::test_a_graphs_own_pooler_is_returned_not_the_mean"],
    ),
    Break(
        "end-token-ignored", "11", "shmengine/api/generator.py",
        "            end_ids=end_ids_for(end_token, self.vocabulary, self.model.eos_ids),\n",
        "            end_ids=end_ids_for(None, self.vocabulary, self.model.eos_ids),  # BREAK\n",
        ["tests/parity/test_decoding_options.py::test_generator_option_equals_ctranslate2[end_token]"],
    ),
    Break(
        "results-alias-arena", "5", "shmengine/runtime/pool.py",
        "recv_message(worker.conn, worker.arena_out, copy=True)",
        "recv_message(worker.conn, worker.arena_out, copy=False)",
        ["tests/test_pool.py::test_large_tensors_cross_through_the_arena"],
    ),
    Break(
        # a leak the soak must see: every worker keeps 16 KiB per batch it ran (a per-batch
        # record appended to a module-level list that is never cleared)
        "soak-worker-leak", "soak", "shmengine/runtime/worker.py",
        "        del reply, result\n",
        "        del reply, result\n        globals().setdefault(\"_LEAKED\", []).append(bytearray(16384))  # BREAK: 16 KiB kept per batch\n",
        ["tests/test_soak.py"],
    ),
]



def _copy_tree(dest: Path) -> None:
    """The working tree as it is now (tracked and untracked, not ignored) into ``dest``."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT, capture_output=True, check=True
    ).stdout.decode().split("\0")
    for rel in filter(None, listed):
        source = ROOT / rel
        if source.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / rel)


def _pytest(copy: Path, tests: list[str], timeout: float) -> tuple[int, str]:
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1")
    try:
        out = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
            cwd=copy, capture_output=True, text=True, timeout=timeout, env=env,
        )
    except subprocess.TimeoutExpired:
        return 124, "timed out"
    return out.returncode, out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr[-300:]


def check(brk: Break, timeout: float) -> str:
    with tempfile.TemporaryDirectory(prefix="shmengine-catches-") as tmp:
        copy = Path(tmp)
        _copy_tree(copy)
        target = copy / brk.path
        text = target.read_text()
        if text.count(brk.old) != 1:
            return f"STALE ({brk.path} holds the text to replace {text.count(brk.old)} times)"
        results = []
        for test in brk.tests:
            rc, summary = _pytest(copy, [test], timeout)
            if rc != 0:
                return f"BASELINE FAILS: {test}: {summary}"
            target.write_text(text.replace(brk.old, brk.new))
            rc, summary = _pytest(copy, [test], timeout)
            target.write_text(text)
            # 1: tests failed. 2-5 (interrupted, internal or usage error, nothing collected) prove nothing.
            results.append(("caught" if rc == 1 else "MISSED" if rc == 0 else f"rc={rc}", test, summary))
        verdict = "CAUGHT" if all(r[0] == "caught" for r in results) else "MISSED"
        return verdict + "".join(f"\n    {r[0]}: {r[1]} ({r[2]})" for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("names", nargs="*", help="breaks to check (default: all)")
    parser.add_argument("--list", action="store_true", help="list the breaks and exit")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per pytest run")
    args = parser.parse_args()
    known = {b.name: b for b in BREAKS}
    if args.list:
        for b in BREAKS:
            print(f"{b.name:24} item {b.item:4} {b.path}: {', '.join(b.tests)}")
        return 0
    unknown = [n for n in args.names if n not in known]
    if unknown:
        parser.error(f"unknown break(s) {unknown}; --list shows them")
    failed = 0
    for brk in [known[n] for n in args.names] if args.names else BREAKS:
        start = time.monotonic()
        verdict = check(brk, args.timeout)
        failed += not verdict.startswith("CAUGHT")
        print(f"{brk.name} (item {brk.item}): {verdict}  [{time.monotonic() - start:.0f} s]", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
