"""benchmarks/bench_model.py's measuring code, in-process on a nano model (the script runs each case in a
fresh subprocess, too slow for the test suite)."""

import pytest
import torch

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def bench(load_benchmark):
    return load_benchmark("bench_model")


@pytest.mark.slow
def test_every_case_runs_and_the_table_prints(bench):
    threads = torch.get_num_threads()
    results = {}
    for mode in bench.MODES:
        for implementation in bench.IMPLEMENTATIONS:
            result = bench.run_case(
                implementation,
                mode,
                "float32",
                preset="igpt-nano",
                resolution=4,
                clusters=16,
                batch=2,
                repeats=1,
                threads=1,  # robust on a busy machine; restored below
            )
            torch.set_num_threads(threads)
            assert result["seconds"] > 0 and result["steps"] == 1 and result["warm"]
            assert result["peak_kib"] >= result["baseline_kib"] > 0
            results[(mode, "float32", implementation)] = result
    assert (
        results[("train", "float32", "imagegpt")]["parameters"]
        == results[("train", "float32", "transformers")]["parameters"]
    )
    table = bench.table(results, tokens=2 * 16)
    assert "forward float32" in table and "train float32" in table and "x" in table


def test_a_memory_ratio_over_nothing_measured_is_a_question_mark(bench):
    """A case whose peak came before it (a long test session) measures 0 MiB: the table says '?', not a
    ZeroDivisionError."""
    assert bench._ratio(1.0, 0.0) == "?" and bench._ratio(1.0, 2.0, "<") == "<0.50x"
