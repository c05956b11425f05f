"""The benchmark suite's own tests: small and fast, no timing asserted (only that numbers are written)."""
from __future__ import annotations

import csv
import dataclasses

import pytest
import torch

from benchmarks import jacobian, sol
from benchmarks.bench import run_benchmark
from benchmarks.config import PRESETS
from benchmarks.harness import Case, run_case
from benchmarks.timing import TimingConfig, peak_memory_bytes
from torch_vjp.testing import OPS, OPS_BY_NAME

# A preset small enough for a unit test: the harness end to end in a few seconds.
TINY = dataclasses.replace(
    PRESETS["cpu-quick"], name="tiny", shapes=((8, 64),), copy_bytes=1 << 20, timing=TimingConfig(min_run_time=0.005),
    jac_batch=2, jac_ns=(8, 16), jac_timing=TimingConfig(min_run_time=0.005), fused_shapes=((16, 8, 64),),
)
BASE = {"date": "d", "device": "cpu", "torch": torch.__version__, "commit": "c", "timer": "t"}


def test_bytes_table_covers_every_op():
    from benchmarks.harness import OWN_SECTION

    for info in OPS:
        if info.name in OWN_SECTION:  # timed against its matrix products (benchmarks/fused_loss.py)
            continue
        fwd, bwd = sol.passes(info.name, info.family)
        assert fwd >= 1 and bwd >= 1, info.name
    assert sol.sol_bytes("exp", "elementwise", 10, 4, "fwd+bwd") == 5 * 10 * 4
    assert sol.sol_bytes("softmax", "softmax", 10, 2, "fwd+bwd") == 5 * 10 * 2
    assert sol.sol_bytes("logsumexp", "softmax", 10, 4, "fwd+bwd") == 3 * 10 * 4
    assert sol.sol_bytes("layer_norm", "norm", 10, 2, "fwd+bwd") == 5 * 10 * 2
    assert sol.sol_bytes("swiglu", "gated", 10, 2, "fwd") == 3 * 10 * 2 and sol.passes("geglu", "gated") == (3, 5)
    assert sol.sol_bytes("cross_entropy", "loss", 10, 4, "fwd+bwd") == 3 * 10 * 4


def test_tiny_run_writes_csv_markdown_and_plots(tmp_path):
    run_benchmark("cpu", TINY, str(tmp_path), ops=["exp", "softmax", "logsumexp"],
                  provider_names=["torch_vjp", "eager", "liger"], sections=("main", "jacobian"), progress=False,
                  command="test")
    for name in ("results.csv", "jacobian.csv", "summary.md", "sol.png", "jacobian.png", "command.txt"):
        assert (tmp_path / name).stat().st_size > 0, name
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    # liger is never importable on CPU: dropped without a row. 3 ops × 2 providers × 3 phases.
    assert {r["provider"] for r in rows} == {"torch_vjp", "eager"}
    assert len(rows) == 18
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 and float(r["pct_sol"]) >= 0 for r in rows)
    assert all(r["device"] and r["torch"] and r["dtype"] == "float32" and r["shape"] == "8x64" and r["date"] for r in rows)
    assert all(r["peak_mib"] for r in rows if r["phase"] == "fwd+bwd")
    summary = (tmp_path / "summary.md").read_text()
    assert "torch_vjp ÷ eager" in summary and "| softmax |" in summary and "dx = dyᵀJ" in summary


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_tiny_run_on_cuda(tmp_path):
    """The CUDA path end to end (events timer, L2 flush, max_memory_allocated, Jacobian OOM handling)."""
    preset = dataclasses.replace(TINY, timing=TimingConfig(warmup_ms=1, rep_ms=5), jac_budget_bytes=None,
                                 jac_timing=TimingConfig(warmup_ms=1, rep_ms=5))
    result = run_benchmark("cuda", preset, str(tmp_path), ops=["exp", "softmax"], dtypes=["bfloat16"], progress=False)
    assert (tmp_path / "summary.md").exists() and (tmp_path / "sol.png").exists()
    for row in result["main"]:
        if row["provider"] in ("eager", "compile", "liger"):
            assert row["status"] == "ok", row
        if row["status"] == "ok" and row["phase"] == "fwd+bwd":
            assert float(row["peak_mib"]) > 0
    assert all(r["status"] in ("ok", "no cuda kernel") for r in result["jacobian"]), result["jacobian"]


def test_new_families_and_the_fused_section_run(tmp_path):
    """A norm with its parameters, a gated op and cross_entropy through the main harness (every gradient
    checked, then timed), and the fused loss's section: every provider, the matrix products, a CSV and a table."""
    result = run_benchmark("cpu", TINY, str(tmp_path), ops=["layer_norm", "swiglu", "cross_entropy",
                                                             "fused_linear_cross_entropy"],
                           provider_names=["torch_vjp", "eager"], sections=("main", "fused"), progress=False)
    assert {r["op"] for r in result["main"]} == {"layer_norm", "swiglu", "cross_entropy"}
    assert all(r["status"] == "ok" for r in result["main"]), [r for r in result["main"] if r["status"] != "ok"]
    assert {r["provider"] for r in result["fused"]} == {"torch_vjp", "eager", "matmuls"}
    assert all(r["status"] == "ok" and float(r["median_ms"]) > 0 for r in result["fused"]), result["fused"]
    assert (tmp_path / "fused.csv").stat().st_size > 0
    assert "| 16 × 8 × 64 | float32 |" in (tmp_path / "summary.md").read_text()


@pytest.mark.skipif(not hasattr(torch.nn.functional, "linear_cross_entropy"), reason="torch < 2.13: no F.linear_cross_entropy")
def test_fused_section_compares_with_torchs_own_linear_cross_entropy(tmp_path):
    """torch's F.linear_cross_entropy, chunked (options=LinearCrossEntropyOptions()) and reference (options=None),
    run in the fused section by default, checked against the float64 reference like every provider, timed, their
    memory measured, and in the table with torch_vjp's time over the chunked one's and an error table; named in
    --providers they run in the fused section alone."""
    from benchmarks import fused_loss

    result = run_benchmark("cpu", TINY, str(tmp_path), ops=["fused_linear_cross_entropy"], sections=("fused",),
                           progress=False)
    rows = {r["provider"]: r for r in result["fused"]}
    assert {"torch_vjp", "eager", "compile", "torch_lce", "torch_lce_ref", "matmuls"} <= set(rows)
    for name in ("torch_lce", "torch_lce_ref"):
        r = rows[name]
        assert r["status"] == "ok" and float(r["median_ms"]) > 0 and r["peak_mib"] != "not measured", r
        assert float(r["loss_err"]) <= 1e-4 and float(r["grad_err"]) <= 1e-4
    summary = (tmp_path / "summary.md").read_text()
    assert "torch_vjp ÷ torch_lce |" in summary and "Relative error against the reference" in summary
    assert "| 16 × 8 × 64 | float32 |" in summary

    # Named alone: the fused section runs it, the main section has no provider of that name.
    result = run_benchmark("cpu", TINY, str(tmp_path / "named"), ops=["exp", "fused_linear_cross_entropy"],
                           provider_names=["torch_vjp", "torch_lce"], sections=("main", "fused"), progress=False)
    assert {r["provider"] for r in result["fused"]} == {"torch_vjp", "torch_lce", "matmuls"}
    assert {r["provider"] for r in result["main"]} == {"torch_vjp"}

    # The provider's function is the loss itself (the same value as linear, then cross_entropy).
    x, w, t = fused_loss.inputs(16, 8, 64, torch.float32, "cpu")
    fn = fused_loss.make("torch_lce", "cpu")
    torch.testing.assert_close(fn(x, w, t), torch.nn.functional.cross_entropy(x @ w.t(), t), rtol=1e-5, atol=1e-6)


def test_compile_provider_runs(tmp_path):
    result = run_benchmark("cpu", TINY, str(tmp_path), ops=["exp"], provider_names=["compile"], sections=("main",),
                           progress=False)
    assert {r["status"] for r in result["main"]} == {"ok"}, result["main"]


def test_wrong_provider_is_reported_wrong_not_timed():
    def off_by_one_percent(call, device):
        return lambda *primals: call.ref(*primals) * 1.01

    case = Case(OPS_BY_NAME["softmax"], {}, 4, 32, torch.float32)
    rows = run_case(case, {"bad": off_by_one_percent}, ["bad"], "cpu", TINY.timing, 1e10, BASE, seed=0)
    assert [r["status"] for r in rows] == ["wrong"] * 3
    assert not any(r.get("median_ms") for r in rows)
    assert float(rows[0]["out_err"]) > 1e-3


def test_failing_provider_is_recorded_and_the_run_goes_on():
    def broken(call, device):
        def fn(*primals):
            raise RuntimeError("kernel exploded")
        return fn

    case = Case(OPS_BY_NAME["exp"], {}, 4, 32, torch.float32)
    rows = run_case(case, {"broken": broken, "eager": lambda c, d: c.ref}, ["broken", "eager"],
                    "cpu", TINY.timing, 1e10, BASE, seed=0)
    assert {r["status"] for r in rows if r["provider"] == "broken"} == {"error: RuntimeError: kernel exploded"}
    assert {r["status"] for r in rows if r["provider"] == "eager"} == {"ok"}


def test_jacobian_sweep_skips_oversized_and_records_oom(monkeypatch):
    info = OPS_BY_NAME["softmax"]
    # A budget the Jacobian methods exceed: recorded as skipped with the estimate, the VJPs still run.
    budget = jacobian.estimate_bytes("vjp", 2, 16, 16, 4)
    rows = jacobian.run_point(info, 16, 2, "cpu", budget, TINY.jac_timing, BASE, seed=0)
    status = {r["method"]: r["status"] for r in rows}
    assert status["vjp"] == status["autograd"] == "ok"
    assert status["jac_vmap"].startswith("skipped (est.") and status["jac_full"].startswith("skipped (est.")

    real = jacobian.method_fn

    def oom_for_full(method, *args):
        if method == "jac_full":
            def fn():
                raise RuntimeError("CUDA out of memory. Tried to allocate 64.00 GiB")
            return fn
        return real(method, *args)

    monkeypatch.setattr(jacobian, "method_fn", oom_for_full)
    rows = jacobian.run_sweep(info, (8, 16), 2, "cpu", 1 << 30, TINY.jac_timing, BASE, seed=0)
    assert [r["status"] for r in rows if r["method"] == "jac_full"] == ["OOM", "OOM"]
    assert all(r["status"] == "ok" for r in rows if r["method"] != "jac_full")


def test_predicted_slow_points_are_skipped():
    info = OPS_BY_NAME["exp"]
    rows = jacobian.run_sweep(info, (8, 16), 2, "cpu", 1 << 30, TINY.jac_timing, BASE, seed=0, max_call_s=0.0)
    # Calls under PREDICT_FROM_MS predict nothing, so a tiny sweep is never skipped for time.
    assert all(r["status"] == "ok" for r in rows)


@pytest.mark.parametrize("name", ["softmax", "exp", "logsumexp", "layer_norm"])
def test_every_method_computes_dy_times_jacobian(name):
    info = OPS_BY_NAME[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    call = info.call(x.detach())
    dy = torch.randn(call.ref(x).shape, generator=gen, dtype=torch.float64)
    row_call = info.call(x[0].detach())  # a row's own call (a norm over its 5 elements)
    # dyᵀJ from each row's explicit Jacobian.
    expected = torch.stack([
        dy[i].reshape(1, -1) @ torch.autograd.functional.jacobian(row_call.ref, x[i].detach()).reshape(-1, 5)
        for i in range(3)
    ]).reshape(3, 5)
    for method in jacobian.METHODS:
        got = jacobian.method_fn(method, call, x, dy)()
        torch.testing.assert_close(got, expected, msg=method)


def test_cpu_peak_memory_sees_an_allocation():
    def allocate():
        t = torch.empty(1 << 20)  # 4 MiB, freed on return
        t.fill_(1.0)

    peak = peak_memory_bytes(allocate, "cpu")
    # The torch this project supports exposes the profiler's memory events, so here it must measure;
    # None ("not measured") is only for a torch without them.
    assert peak is not None and peak >= 4 << 20


def test_cli_quick_shape(tmp_path, capsys):
    from benchmarks.__main__ import main

    main(["--shape", "8x64", "--ops", "sigmoid", "--providers", "torch_vjp,eager", "--only", "main", "--no-progress",
          "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert "| sigmoid |" in out and (tmp_path / "results.csv").exists()


def test_ceiling_is_the_best_probe_and_a_time_under_sol_is_flagged():
    from benchmarks import ceiling, report

    result = ceiling.memory_ceiling("cpu", 8 << 20, TINY.timing)
    measured = [v for v in result["probes"].values() if not isinstance(v, str)]
    assert {"copy", "read", "triad"} <= result["probes"].keys()
    assert round(result["bps"] / 1e9, 1) == max(measured) and result["probe"] in result["probes"]
    row = {"status": "ok", "median_ms": "1.0", "pct_sol": "130.0", "peak_mib": "1"}
    assert "above the ceiling" in report._cell(row) and "130%" not in report._cell(row).split("(")[0]
    assert report._cell(dict(row, pct_sol="95.0")) == "1.000 / 95% / 1"


def test_overhead_section_writes_its_table(tmp_path, capsys, monkeypatch):
    """python -m benchmarks --overhead: per-call µs of torch_vjp and torch in each phase, written as CSV and
    markdown and printed (no timing is asserted: a shared CPU's numbers wander)."""
    import functools

    from benchmarks import overhead
    from benchmarks.__main__ import main

    monkeypatch.setattr(overhead, "run_overhead", functools.partial(overhead.run_overhead, min_run_time=0.001, rounds=1))
    rows = main(["--overhead", "--shape", "4x8", "--ops", "exp,logsumexp", "--no-progress", "--out", str(tmp_path)])
    assert [(r["op"], r["phase"]) for r in rows] == [(op, phase) for op in ("exp", "logsumexp") for phase in overhead.PHASES]
    assert all(float(r["torch_us"]) > 0 and float(r["torch_vjp_us"]) > 0 and r["shape"] == "4x8" for r in rows)
    with open(tmp_path / "overhead.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    out = capsys.readouterr().out
    assert "| logsumexp |" in out and "## 4x8" in out and (tmp_path / "overhead.md").read_text() in out


def test_model_section_runs_stock_and_patched(tmp_path, monkeypatch):
    """python -m benchmarks --model: one small family end to end, eager only (the compiled variants take
    minutes of inductor); the table and csv are written, the patched step's loss is stock's."""
    pytest.importorskip("transformers")
    from benchmarks import models

    monkeypatch.setattr(models, "LENGTH", 16)
    rows = models.main(["llama"], vocab=512, device="cpu", rounds=2, threads=1, compile=False, out=str(tmp_path),
                       command="python -m benchmarks --model llama")
    (row,) = rows
    assert row["loss_path"] == "fused" and row["eager ratio"] > 0
    assert abs(row["patched eager loss"] - row["stock eager loss"]) < 1e-4
    assert row["stock eager peak MiB"] is not None and row["patched eager peak MiB"] is not None
    assert (tmp_path / "models.md").read_text().count("| llama |") == 1
