"""docs/payoff.md and docs/payoff.png from tools/payoff.py's numbers (its JSON)."""

from __future__ import annotations

from pathlib import Path

from payoff import CONTROL, FLAG_RATIO, VARIANTS, WARMUP, beyond_noise, flagged, geomean

PEERS = [v for v in VARIANTS if v != "original"]
XMAX = 1.6  # the chart's ratio axis; a bar beyond it is cut there and its value written
KINDS = [("dynamo", "dynamo exports"), ("legacy", "legacy (TorchScript) exports"), ("other", "other models")]


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "failed" not in r]


def _gm(rows: list[dict], t: str, v: str) -> float | None:
    return geomean([r["ratio"][t][v] for r in rows if t in r["ratio"] and v in r["ratio"][t]])


def _f(x, fmt="{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def headline(data: dict) -> list[str]:
    """The summary sentences (printed by tools/payoff.py, to paste into README.md)."""
    rows = _ok(data["rows"])
    ts = [str(t) for t in data["threads"]]
    out = []
    for kind, label in KINDS:
        sub = [r for r in rows if r["export"] == kind]
        if not sub:
            continue
        parts = [f"{_f(_gm(sub, t, 'onnxfold'))}x with {t} thread{'s' if t != '1' else ''}" for t in ts]
        peers = [f"{name} {_f(_gm(sub, ts[0], v))}x" for v, name in
                 (("onnxruntime", "onnxruntime's offline output"), ("onnxslim", "onnxslim's output"))
                 if _gm(sub, ts[0], v) is not None]
        out.append(f"- {label} ({len(sub)} models): onnxfold's output runs at {' and '.join(parts)} the "
                   f"original's latency (geometric mean" + (f"; {', '.join(peers)} with {ts[0]} thread"
                                                            if peers else "") + ").")
    best = sorted((r["ratio"][ts[0]]["onnxfold"], r["model"]) for r in rows if "onnxfold" in r["ratio"][ts[0]])
    if best:
        out.append("- best cases (1 thread): " + ", ".join(f"`{m}` {x:.2f}x" for x, m in best[:4]) + ".")
    noise = []
    for t in ts:
        aa = [r["ratio"][t][CONTROL] for r in rows if CONTROL in r["ratio"].get(t, {})]
        if aa:
            noise.append(f"{t} thread{'s' if t != '1' else ''} {min(aa):.2f}-{max(aa):.2f}x "
                         f"(geometric mean {geomean(aa):.3f})")
    if noise:
        out.append("- noise (A/A: a second session of the original, timed like the others): "
                   + ", ".join(noise) + ".")
    slow = [r for r in rows if flagged(r, data["flag_ratio"])]
    out.append(f"- slower than the original by more than {data['flag_ratio']}x after reruns: "
               + (", ".join(f"`{r['model']}` ({_slow_cells(r)})" for r in slow) if slow else "none")
               + "; of these, also slower than its A/A control by more than that: "
               + (", ".join(f"`{r['model']}`" for r in slow if beyond_noise(r, data["flag_ratio"])) or "none") + ".")
    q = [r for r in rows if "quant" in r and "rel_l2" in r["quant"].get("with", {})
         and "rel_l2" in r["quant"].get("without", {})]
    if q:
        better = sum(r["quant"]["with"]["sqnr_db"] > r["quant"]["without"]["sqnr_db"] for r in q)
        d = [r["quant"]["with"]["sqnr_db"] - r["quant"]["without"]["sqnr_db"] for r in q]
        out.append(f"- int8 (quantize_static, QDQ per-channel): SQNR with folding higher on {better} of {len(q)} "
                   f"models, by {min(d):+.1f} to {max(d):+.1f} dB.")
    return out


def _bytes(n) -> str:
    return "–" if n is None else f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.0f} kB"


def _table(rows: list[dict], ts: list[str]) -> list[str]:
    head = ["model", "export", "original ms " + "/".join(f"{t}t" for t in ts)]
    head += [f"{v} {t}t" for t in ts for v in PEERS + [CONTROL]]
    head += ["nodes orig/fold/ort/slim", "BN orig/fold/ort/slim", "size orig/fold/ort/slim"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        if "failed" in r:
            lines.append(f"| `{r['model']}` | {r['export']} | failed: {r['failed']} |" + " |" * (len(head) - 3))
            continue
        vs = r["variants"]
        cells = [f"`{r['model']}`" + (" (rerun)" if r.get("rerun") else ""), r["export"],
                 " / ".join(_f(r["latency"][t]["original"]["median_s"] * 1e3, "{:.2f}") if t in r["latency"]
                            else "–" for t in ts)]
        for t in ts:
            for v in PEERS + [CONTROL]:
                x = r["ratio"].get(t, {}).get(v)
                err = vs.get(v, {}).get("error")
                cell = "failed" if err and x is None else _f(x)
                if v == "onnxfold" and vs.get(v, {}).get("same_as_original"):
                    cell += " (same bytes)"
                if v == "onnxfold" and x is not None and x > FLAG_RATIO:
                    cell = f"**{cell}**"
                cells.append(cell)
        cells.append(" / ".join(str(vs.get(v, {}).get("nodes", "–")) for v in VARIANTS))
        cells.append(" / ".join(str(vs.get(v, {}).get("bn", "–")) for v in VARIANTS))
        cells.append(" / ".join(_bytes(vs.get(v, {}).get("bytes")) for v in VARIANTS))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _quant_table(rows: list[dict]) -> list[str]:
    q = [r for r in rows if "quant" in r]
    if not q:
        return []
    lines = ["| model | max abs without / with | rel L2 without / with | SQNR dB without / with | "
             "BN left in the int8 model without / with |", "|---|---|---|---|---|"]
    for r in q:
        w, o = r["quant"].get("without", {}), r["quant"].get("with", {})

        def pair(k, fmt, w=w, o=o):
            return " / ".join(x.get("error", "failed")[:60] if k not in x else fmt.format(x[k]) for x in (w, o))

        lines.append(f"| `{r['model']}` | {pair('max_abs', '{:.3g}')} | {pair('rel_l2', '{:.3g}')} | "
                     f"{pair('sqnr_db', '{:.1f}')} | {pair('bn_in_int8_model', '{}')} |")
    return lines


def chart(data: dict, png: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in _ok(data["rows"])]
    ts = [str(t) for t in data["threads"]]
    fig, axes = plt.subplots(1, len(ts), figsize=(6 * len(ts), 0.32 * len(rows) + 1.6), sharey=True,
                             squeeze=False)
    names = [r["model"].replace(".onnx", "") for r in rows]
    colors = {"onnxfold": "tab:blue", "onnxruntime": "tab:orange", "onnxslim": "tab:green"}
    peers = [v for v in PEERS if any(v in r["ratio"].get(ts[0], {}) for r in rows)]
    h = 0.8 / max(len(peers), 1)
    for ax, t in zip(axes[0], ts):
        for j, v in enumerate(peers):
            ys = [i + (j - (len(peers) - 1) / 2) * h for i in range(len(rows))]
            xs = [r["ratio"].get(t, {}).get(v, 0) for r in rows]
            ax.barh(ys, [min(x, XMAX) for x in xs], height=h, color=colors[v], label=v)
            for y, x in zip(ys, xs):
                if x > XMAX:  # off the chart: the value written at the edge
                    ax.text(XMAX, y, f" {x:.1f}", va="center", fontsize=6)
        ax.set_xlim(0, XMAX + 0.15)
        ax.axvline(1.0, color="black", lw=0.8)
        ax.axvline(FLAG_RATIO, color="red", lw=0.6, ls="--")
        ax.set_title(f"{t} thread{'s' if t != '1' else ''}: latency / original's (lower is faster)")
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(names, fontsize=7)
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].invert_yaxis()  # the axes share y: once inverts them all
    axes[0][0].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def _slow_cells(r: dict) -> str:
    cells = ", ".join(f"{t}t {r['ratio'][t]['onnxfold']:.2f}x, A/A {_f(r['ratio'][t].get(CONTROL))}x"
                      for t in flagged(r))
    d = r.get("ort_ops_diff") or {}
    if "error" not in d and d and not d.get("original_only") and not d.get("onnxfold_only"):
        cells += "; onnxruntime runs the same operators for both"
    elif d.get("original_only") or d.get("onnxfold_only"):
        cells += (f"; operators onnxruntime runs for the original only: {_ops(d.get('original_only'))}, "
                  f"for onnxfold's output only: {_ops(d.get('onnxfold_only'))}")
    return cells


def _ops(d) -> str:
    return ", ".join(f"{k} {v}" for k, v in (d or {}).items()) or "none"


def render(data: dict, png: Path) -> tuple[str, list[str]]:
    m = data["machine"]
    rows = data["rows"]
    ts = [str(t) for t in data["threads"]]
    s = data["sched"]
    hl = headline(data)
    drew = chart(data, png)
    v = m["versions"]
    lines = [
        "# What folding buys",
        "",
        f"Generated by `{data['command']}` (tools/payoff.py, tools/payoff_report.py) in {data['seconds']:.0f} s; "
        "do not edit by hand. Raw numbers: the JSON it writes (`--json`).",
        "",
        f"Machine: {m['cpu']}, {m['cores']} CPUs (os.cpu_count()), {_f(m.get('ram_gib'), '{:.0f}')} GiB, "
        f"{m['os']}. onnxfold {m.get('git_rev') or '?'}{' (modified)' if m.get('onnxfold_dirty') else ''}; "
        + ", ".join(f"{k} {v[k]}" for k in ("onnxruntime", "onnx", "onnxslim", "torch", "numpy", "python")
                    if v.get(k)) + ".",
        "",
        "## Summary",
        "",
        *hl,
        "",
        "## Method",
        "",
        "- Models: the real-model corpus (`python tools/corpus.py`, docs/corpus.md): random weights and random "
        "non-trivial BatchNormalization statistics, BatchNormalization kept by the exporter.",
        "- Variants: the original; onnxfold's output (`python -m onnxfold IN OUT`, default verification); "
        "onnxruntime's offline output (`ORT_ENABLE_BASIC` + `optimized_model_filepath`: BASIC because the "
        "EXTENDED and ALL levels write contrib ops and a CPU-specific layout into the file, which is then no "
        "longer a portable ONNX model; at load time every variant gets ALL anyway); onnxslim's output "
        "(`onnxslim.slim(IN, OUT)`, defaults).",
        f"- Latency: onnxruntime CPUExecutionProvider, `ORT_ENABLE_ALL`, sequential, inter-op 1 thread, intra-op "
        f"{' and '.join(ts)} thread(s) ({m['cores']} = os.cpu_count()); batch 1; inputs seeded random in [-1, 1] "
        "of the model's input shapes and dtypes (a dynamic dimension: 1 on axis 0, 32 elsewhere, unless the "
        "corpus manifest gives the shape its project feeds). All four sessions of a model stay alive; each is "
        f"warmed up {WARMUP} times; then rounds run every variant once in a seeded shuffled order, at least "
        f"{s['min_rounds']} rounds and until {s['budget_s']:g} s have passed (at most {s['max_rounds']}). "
        "Latency is the median over the rounds; ratios are medians over the original's median.",
        f"- Never slower: a model whose onnxfold output is slower than the original by more than {FLAG_RATIO}x "
        f"(median, either thread count) and whose file differs from the original is measured again with "
        f"{data['rerun_factor']}x the rounds and budget; "
        "the table shows the rerun (marked), and what stays above is bold and listed below.",
        "- For a flagged model the page says which operators onnxruntime runs (its ORT_ENABLE_ALL graph, "
        "op types counted) for the original and not for onnxfold's output and the other way round; the same "
        "operators for both points at noise, a difference at the cause.",
        "- Each model is measured in its own process (tools/bench.py run_measured: time and memory limits); a "
        "failure is a row marked failed.",
        "- int8: `onnxruntime.quantization.quantize_static` (QDQ, per-channel, MinMax calibration, activations "
        "uint8, weights int8) of the original (\"without\") and of onnxfold's output (\"with\"), the same 16 "
        "seeded calibration inputs; error = the int8 model's outputs (onnxruntime, ALL) vs the float original's "
        "(onnxruntime, DISABLE_ALL) on 8 other seeded inputs, every float output concatenated: max abs, "
        "relative L2 (‖q − f‖ / ‖f‖) and SQNR (20 log10 ‖f‖ / ‖q − f‖). quantize_static itself does not "
        "fold BatchNormalization in this onnxruntime (it runs shape inference only; the graph optimization "
        "that would fold it is `quant_pre_process`, which is not called): the last column counts the "
        "BatchNormalization left in each int8 model to show it.",
        "",
        "## Per model",
        "",
        f"Ratio = median latency / the original's (below 1: faster); `{CONTROL}` (A/A) is a second session of "
        "the original file timed like the others: how far from 1.00 a ratio strays by noise alone on this machine. "
        "\"same bytes\": onnxfold found nothing to fold and wrote the original again. nodes, BatchNormalization "
        "and size "
        "(with external data) of each variant: original / onnxfold / onnxruntime / onnxslim.",
        "",
        *_table(rows, ts),
        "",
    ]
    slow = [r for r in _ok(rows) if flagged(r, data["flag_ratio"])]
    lines += [f"Slower than the original by more than {FLAG_RATIO}x after reruns: "
              + (", ".join(f"`{r['model']}` ({_slow_cells(r)})" for r in slow) if slow else "none") + ". "
              f"Of these, slower than their own A/A control by more than {FLAG_RATIO}x too (more than this "
              "machine's noise explains): "
              + (", ".join(f"`{r['model']}`" for r in slow if beyond_noise(r, data["flag_ratio"])) or "none") + ".",
              ""]
    errs = [f"- `{r['model']}` {v}: {e['error']}" for r in _ok(rows) for v, e in r["variants"].items()
            if e.get("error")]
    if errs:
        lines += ["Variants that failed (no latency for them):", "", *errs, ""]
    q = _quant_table(rows)
    if q:
        lines += ["## int8 quantization error, without and with folding", "", *q, ""]
    if drew:
        lines += ["## Chart", "", f"![latency ratios]({png.name})", ""]
    return "\n".join(lines), hl
