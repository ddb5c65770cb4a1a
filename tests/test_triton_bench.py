"""bench/attention.py runs anywhere and says why it skips what it cannot run."""

from bench.attention import CASES, Sizes, attention_flops, main, run_order, target_summary


def test_quick_bench_prints_one_table(capsys):
    assert main(["--quick", "--backends", "sdpa", "triton", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| 128 |")]
    assert len(rows) == 5  # sdpa none/qkv, triton none/qkv/row
    assert all(" | - | " not in r for r in rows if "sdpa" in r)
    # each triton row is measured (CUDA) or says why not (CPU: the interpreter is for tests)
    assert all(("skipped: needs a CUDA GPU" in r) != (" | - | " not in r) for r in rows if "triton" in r)


def test_the_target_cells_run_first():
    sizes = [Sizes(16384 // T, 16, T, D, None) for T in (1024, 4096, 8192) for D in (64, 128)]
    order = [(s.T, s.D, b, p) for s, b, p in run_order(sizes, CASES)]
    targets = [("sdpa", "none"), ("triton", "qkv"), ("sdpa", "qkv")]
    assert order[:6] == [(T, 128, b, p) for T in (4096, 8192) for b, p in targets]
    assert order[6] == (1024, 64, "eager", "none") and sorted(order) == sorted(set(order))
    assert len(order) == len(sizes) * len(CASES)


def test_flops_and_targets():
    s = Sizes(batch=2, heads=3, T=8, D=4, dtype=None)
    assert attention_flops(s, backward=False) == 2 * 2 * 3 * 8 * 8 * 4  # two matmuls, half masked
    assert attention_flops(s, backward=True) == 3.5 * attention_flops(s, backward=False)
    rows = [
        {"T": 8, "D": 4, "backend": b, "precondition": p, "fwdbwd_ms": ms}
        for b, p, ms in (("triton", "qkv", 1.0), ("sdpa", "none", 1.0), ("sdpa", "qkv", 2.0))
    ]
    assert target_summary(rows) == [
        "T=8 D=4 fwd+bwd: triton qkv / sdpa none = 1.00 (target <= 1.10); "
        "triton qkv / (normalise + sdpa) = 0.50 (target < 1)"
    ]


def test_a_failing_row_is_reported_and_the_table_and_files_still_come_out(monkeypatch, tmp_path, capsys):
    """One row's compile/launch error (here a stand-in for Triton's OutOfResources) is that row's
    note; the other rows, the target summary and OUT/attention.{md,json} still come out."""
    import json

    import bench.attention as bench

    class OutOfResources(RuntimeError):
        pass

    real = bench.measure

    def measure(backend, precondition, s, repeats, device):
        if precondition == "qkv":
            raise OutOfResources("out of resource: shared memory, Required: 262144, Hardware limit: 232448\nmore")
        return real(backend, precondition, s, repeats, device)

    monkeypatch.setattr(bench, "measure", measure)
    assert main(["--quick", "--backends", "sdpa", "--repeats", "1", "--out", str(tmp_path)]) == 1
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 128 |")]
    assert len(rows) == 2 and "error: OutOfResources: out of resource: shared memory" in rows[1]
    assert " | - | " not in rows[0]
    table = (tmp_path / "attention.md").read_text()
    assert table.startswith("device: ") and rows[0] in table and rows[1] in table
    data = json.loads((tmp_path / "attention.json").read_text())
    assert [r["precondition"] for r in data["rows"]] == ["none", "qkv"] and "fwd_ms" in data["rows"][0]


def test_rows_past_the_budget_are_skipped(capsys):
    assert main(["--quick", "--backends", "sdpa", "--repeats", "1", "--budget", "0"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 128 |")]
    assert len(rows) == 2 and all("skipped: past the time budget of 0 s" in r for r in rows)
