"""benchmarks/bench_device.py runs every case on any device (here the CPU, at the smallest size)."""


def test_every_case_runs_and_prints_a_ratio(load_benchmark, capsys):
    bench = load_benchmark("bench_device")
    rows = bench.main(["--device", "cpu", "--quick", "--no-compile"])
    cases = [row[0] for row in rows]
    assert cases == ["forward float32", "forward bfloat16", "train float32", "train bfloat16", "sample"]
    assert all(ours > 0 and theirs > 0 for _, ours, theirs, _ in rows)
    out = capsys.readouterr().out
    assert "CPU: " in out and "native bfloat16" in out
    assert out.count("x  ") >= len(rows)
