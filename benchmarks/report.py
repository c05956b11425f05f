"""What a run writes: raw rows as CSV, a markdown summary, PNG plots."""
from __future__ import annotations

import csv
import math
import os
from collections import defaultdict

MAIN_COLUMNS = ["date", "device", "torch", "commit", "op", "variant", "family", "provider", "dtype", "shape", "rows", "n",
                "phase", "status", "median_ms", "sol_ms", "pct_sol", "gbps", "ceiling_gbps", "sol_bytes", "peak_mib",
                "out_err", "grad_err", "timer", "host_ms"]
JAC_COLUMNS = ["date", "device", "torch", "commit", "op", "batch", "n", "dtype", "method", "status", "median_ms",
               "peak_mib", "est_mib", "grad_err", "timer"]
PROVIDER_ORDER = ("torch_vjp", "eager", "compile", "liger")
METHOD_ORDER = ("vjp", "autograd", "jac_vmap", "jac_full")
EXPECTED_GROWTH = {"vjp": "n", "autograd": "n", "jac_vmap": "n² (b·n² in all)", "jac_full": "n² at fixed b (b²n² in all)"}


def write_csv(path, rows, columns):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})


def _f(value):
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _short(status: str, width=40) -> str:
    status = status.replace("|", "/")
    return status if len(status) <= width else status[: width - 1] + "…"


def _pct(row) -> str:
    """% of speed-of-light, or a flag: above 100% the ceiling was not one (benchmarks/ceiling.py)."""
    pct = float(row["pct_sol"])
    return f"{pct:.0f}%" if pct <= 100 else f"**above the ceiling ({pct:.0f}%)**"


def _cell(row) -> str:
    """'ms / %SoL / MiB', or what happened instead."""
    if row is None:
        return "-"
    if row["status"] != "ok":
        if row["status"] == "wrong":
            return f"**wrong** (out {row.get('out_err')}, grad {row.get('grad_err')})"
        return _short(row["status"])
    mib = row.get("peak_mib", "")
    mib = f"{float(mib):.0f}" if _f(mib) is not None else "n/m"
    return f"{float(row['median_ms']):.3f} / {_pct(row)} / {mib}"


def _ratio(a, b) -> str:
    if a is None or b is None or a.get("status") != "ok" or b.get("status") != "ok":
        return "-"
    return f"{float(a['median_ms']) / float(b['median_ms']):.2f}"


def _geomean(ops, mine, other) -> str:
    """Geometric mean over ops of mine's fwd+bwd time over other's (ops where both are ok)."""
    logs = []
    for by_provider in ops.values():
        a, b = by_provider.get(mine, {}).get("fwd+bwd"), by_provider.get(other, {}).get("fwd+bwd")
        if a and b and a["status"] == b["status"] == "ok":
            logs.append(math.log(float(a["median_ms"]) / float(b["median_ms"])))
    return f"{math.exp(sum(logs) / len(logs)):.2f}" if logs else "-"


def _groups(rows):
    """(dtype, shape) groups in the order they were run, each {op: {provider: {phase: row}}}."""
    groups = {}
    for row in rows:
        key = (row["dtype"], row["shape"])
        op = row["op"] + (f" ({row['variant']})" if row.get("variant") else "")
        groups.setdefault(key, defaultdict(lambda: defaultdict(dict)))[op][row["provider"]][row["phase"]] = row
    return groups


def providers_in(rows):
    present = {row["provider"] for row in rows}
    return [p for p in PROVIDER_ORDER if p in present] + sorted(present - set(PROVIDER_ORDER))


def main_markdown(rows) -> str:
    providers = providers_in(rows)
    others = [p for p in providers if p != "torch_vjp"]
    lines = []
    for (dtype, shape), ops in _groups(rows).items():
        lines += [f"### Forward + backward, {dtype}, {shape.replace('x', ' × ')}", "",
                  "Each cell: median ms / % of speed-of-light / peak MiB beyond the inputs (n/m: not measured). "
                  "Ratios are torch_vjp's time over the other's: **below 1, torch_vjp is faster**.", ""]
        head = ["op", "SoL ms", *providers]
        if "torch_vjp" in providers:
            head += [f"torch_vjp ÷ {p}" for p in others] + ["torch_vjp ÷ best other"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for op, by_provider in ops.items():
            full = {p: by_provider.get(p, {}).get("fwd+bwd") for p in providers}
            sol_ms = next((_f(r["sol_ms"]) for r in full.values() if r and _f(r.get("sol_ms"))), None)
            cells = [op, f"{sol_ms:.3f}" if sol_ms else "-"] + [_cell(full[p]) for p in providers]
            if "torch_vjp" in providers:
                cells += [_ratio(full["torch_vjp"], full[p]) for p in others]
                ok = [full[p] for p in others if full[p] and full[p]["status"] == "ok"]
                best = min(ok, key=lambda r: float(r["median_ms"])) if ok else None
                cells.append(_ratio(full["torch_vjp"], best) + (f" ({best['provider']})" if best else ""))
            lines.append("| " + " | ".join(cells) + " |")
        if "torch_vjp" in providers and len(ops) > 1:
            lines.append("| " + " | ".join(["geometric mean", ""] + [""] * len(providers)
                                           + [_geomean(ops, "torch_vjp", p) for p in others] + [""]) + " |")
        lines += ["", f"Forward and backward alone, {dtype}, {shape.replace('x', ' × ')}: median ms (% of speed-of-light).", ""]
        lines += ["| op | " + " | ".join(f"{p} fwd | {p} bwd" for p in providers) + " |",
                  "|---|" + "---|---|" * len(providers)]
        for op, by_provider in ops.items():
            cells = [op]
            for p in providers:
                for phase in ("fwd", "bwd"):
                    r = by_provider.get(p, {}).get(phase)
                    ok = r is not None and r["status"] == "ok"
                    cells.append(f"{float(r['median_ms']):.3f} ({_pct(r)})" if ok else ("-" if r is None else _short(r["status"], 20)))
            lines.append("| " + " | ".join(cells) + " |")
        lines += _host_table(ops, providers)
        lines.append("")
    return "\n".join(lines)


def _host_table(ops, providers) -> list[str]:
    """Host time to issue one forward + backward (CUDA rows only): apart from the GPU times above, which
    graph replay keeps free of it."""
    have = [p for p in providers if any(_f(by.get(p, {}).get("fwd+bwd", {}).get("host_ms")) for by in ops.values())]
    if not have:
        return []
    lines = ["", "Host time to issue one forward + backward (Python, autograd, launches), ms, measured apart from the "
             "GPU times above:", "", "| op | " + " | ".join(have) + " |", "|---|" + "---|" * len(have)]
    for op, by_provider in ops.items():
        cells = [op]
        for p in have:
            host = _f(by_provider.get(p, {}).get("fwd+bwd", {}).get("host_ms"))
            cells.append("-" if host is None else f"{host:.3f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _slope(points):
    """Least-squares slope of log y against log x: the exponent k in y ∝ x^k."""
    pts = [(math.log(x), math.log(y)) for x, y in points if x > 0 and y and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    var = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / var if var else None


def jacobian_markdown(rows) -> str:
    if not rows:
        return ""
    batch, dtype = rows[0]["batch"], rows[0]["dtype"]
    by_op = defaultdict(lambda: defaultdict(dict))
    for row in rows:
        by_op[row["op"]][int(row["n"])][row["method"]] = row
    methods = [m for m in METHOD_ORDER if any(r["method"] == m for r in rows)]
    lines = [f"### dx = dyᵀJ four ways, {dtype}, batch {batch}", "",
             "Each cell: median ms / peak MiB beyond the inputs. `vjp` is torch_vjp's fused backward, `autograd` "
             "torch's backward of the reference, `jac_vmap` vmap(jacrev) per row + einsum, `jac_full` "
             "autograd.functional.jacobian over the whole batch + contraction.", "",
             "| op | n | " + " | ".join(methods) + " |", "|---|---|" + "---|" * len(methods)]
    for op, by_n in by_op.items():
        for n in sorted(by_n):
            cells = [op, str(n)]
            for m in methods:
                r = by_n[n].get(m)
                if r is None:
                    cells.append("-")
                elif r["status"] == "ok":
                    mib = _f(r.get("peak_mib"))
                    cells.append(f"{float(r['median_ms']):.3f} / {mib:.2f}" if mib is not None else f"{float(r['median_ms']):.3f} / n/m")
                else:
                    cells.append(_short(r["status"], 30))
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Growth with n (least-squares exponent k of a log-log fit over the measured points):", "",
              "| op | method | time ∝ n^k | memory ∝ n^k | expected memory |", "|---|---|---|---|---|"]
    for op, by_n in by_op.items():
        for m in methods:
            ok = [(n, by_n[n][m]) for n in sorted(by_n) if m in by_n[n] and by_n[n][m]["status"] == "ok"]
            kt = _slope([(n, _f(r["median_ms"])) for n, r in ok])
            km = _slope([(n, _f(r.get("peak_mib"))) for n, r in ok])
            fmt = lambda k: "-" if k is None else f"{k:.2f}"  # noqa: E731
            lines.append(f"| {op} | {m} | {fmt(kt)} | {fmt(km)} | {EXPECTED_GROWTH.get(m, '')} |")
    lines.append("")
    return "\n".join(lines)


def plot_sol(rows, path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = _groups([r for r in rows if r["phase"] == "fwd+bwd"])
    if not groups:
        return False
    providers = providers_in(rows)
    fig, axes = plt.subplots(len(groups), 1, figsize=(max(7, 0.9 * max(len(o) for o in groups.values()) + 2), 3.2 * len(groups)),
                             squeeze=False)
    width = 0.8 / len(providers)
    for ax, ((dtype, shape), ops) in zip(axes[:, 0], groups.items()):
        names = list(ops)
        for i, p in enumerate(providers):
            for j, op in enumerate(names):
                r = ops[op].get(p, {}).get("fwd+bwd")
                xpos = j - 0.4 + width * (i + 0.5)
                if r is not None and r["status"] == "ok":
                    ax.bar(xpos, float(r["pct_sol"]), width, color=f"C{i}")
                elif r is not None:
                    ax.text(xpos, 2, "wrong" if r["status"] == "wrong" else "×", ha="center", va="bottom", fontsize=7,
                            rotation=90, color=f"C{i}")
        handles = [plt.Rectangle((0, 0), 1, 1, color=f"C{i}") for i in range(len(providers))]
        ax.legend(handles, providers, fontsize=8, ncol=len(providers), loc="upper right")
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=20, fontsize=8)
        ax.set_ylabel("% of speed-of-light")
        ax.set_title(f"forward + backward, {dtype}, {shape.replace('x', ' × ')}", fontsize=10)
        ax.axhline(100, color="gray", lw=0.6, ls="--")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_jacobian(rows, path) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ops = list(dict.fromkeys(r["op"] for r in rows))
    if not ops:
        return False
    fig, axes = plt.subplots(len(ops), 2, figsize=(10, 3.4 * len(ops)), squeeze=False)
    for (ax_t, ax_m), op in zip(axes, ops):
        for i, m in enumerate(METHOD_ORDER):
            mine = sorted((r for r in rows if r["op"] == op and r["method"] == m), key=lambda r: int(r["n"]))
            ok = [r for r in mine if r["status"] == "ok"]
            if ok:
                ax_t.plot([int(r["n"]) for r in ok], [float(r["median_ms"]) for r in ok], "o-", color=f"C{i}", label=m)
                mem = [r for r in ok if _f(r.get("peak_mib"))]
                ax_m.plot([int(r["n"]) for r in mem], [float(r["peak_mib"]) for r in mem], "o-", color=f"C{i}", label=m)
            skipped = [r for r in mine if r["status"].endswith("GiB)") or r["status"] == "OOM"]
            if skipped:  # where it could not run: the memory estimate, as open markers on a dashed line
                mem_ok = [r for r in ok if _f(r.get("peak_mib"))][-1:]
                ax_m.plot([int(r["n"]) for r in mem_ok + skipped],
                          [float(r["peak_mib"]) for r in mem_ok] + [float(r["est_mib"]) for r in skipped], "o--",
                          mfc="none", color=f"C{i}", label=f"{m}: estimate where skipped/OOM")
        for ax, label in ((ax_t, "median ms"), (ax_m, "peak MiB beyond the inputs")):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("row length n")
            ax.set_ylabel(label)
            ax.grid(True, which="both", lw=0.3)
            ax.legend(fontsize=7)
        batch = rows[0]["batch"]
        ax_t.set_title(f"{op}: time of dx = dyᵀJ, batch {batch}", fontsize=10)
        ax_m.set_title(f"{op}: peak memory", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_report(out_dir, main_rows, jac_rows, header: str, fused_rows=()) -> dict:
    """Writes results.csv, jacobian.csv, fused.csv, summary.md, sol.png, jacobian.png; returns their paths."""
    from . import fused_loss

    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    if main_rows:
        paths["csv"] = os.path.join(out_dir, "results.csv")
        write_csv(paths["csv"], main_rows, MAIN_COLUMNS)
        if plot_sol(main_rows, os.path.join(out_dir, "sol.png")):
            paths["sol_png"] = os.path.join(out_dir, "sol.png")
    if jac_rows:
        paths["jacobian_csv"] = os.path.join(out_dir, "jacobian.csv")
        write_csv(paths["jacobian_csv"], jac_rows, JAC_COLUMNS)
        if plot_jacobian(jac_rows, os.path.join(out_dir, "jacobian.png")):
            paths["jacobian_png"] = os.path.join(out_dir, "jacobian.png")
    if fused_rows:
        paths["fused_csv"] = os.path.join(out_dir, "fused.csv")
        write_csv(paths["fused_csv"], fused_rows, fused_loss.COLUMNS)
    parts = [header]
    if main_rows:
        parts += ["## Ops against eager, torch.compile (and Liger-Kernel)", "", main_markdown(main_rows)]
        if "sol_png" in paths:
            parts += ["![% of speed-of-light](sol.png)", ""]
    if fused_rows:
        parts += ["## The fused linear cross-entropy against materialised logits", "", fused_loss.markdown(fused_rows)]
    if jac_rows:
        parts += ["## The VJP against full Jacobians", "", jacobian_markdown(jac_rows)]
        if "jacobian_png" in paths:
            parts += ["![time and memory against n](jacobian.png)", ""]
    paths["markdown"] = os.path.join(out_dir, "summary.md")
    with open(paths["markdown"], "w") as f:
        f.write("\n".join(parts))
    return paths
