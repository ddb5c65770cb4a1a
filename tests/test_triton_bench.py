"""bench/attention.py runs anywhere and says why it skips what it cannot run."""

from bench.attention import Sizes, attention_flops, main, target_summary


def test_quick_bench_prints_one_table(capsys):
    assert main(["--quick", "--backends", "sdpa", "triton", "--repeats", "1"]) == 0
    out = capsys.readouterr().out.splitlines()
    rows = [line for line in out if line.startswith("| 128 |")]
    assert len(rows) == 5  # sdpa none/qkv, triton none/qkv/row
    assert all(" | - | " not in r for r in rows if "sdpa" in r)
    # each triton row is measured (CUDA) or says why not (CPU: the interpreter is for tests)
    assert all(("skipped: needs a CUDA GPU" in r) != (" | - | " not in r) for r in rows if "triton" in r)


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
