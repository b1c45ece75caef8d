"""The corpus and start-up sections of docs/benchmarks.md (tools/bench_corpus.py's results).

Pure functions of the results dict: ``corpus_rows`` (one row per corpus model), ``evaluate_targets``
(issue 20: with verification at most 2x onnxruntime's offline optimizer, without at most 1x),
``floor_lines`` (what the checked floor says of the second), ``gap_explanation`` and the markdown of both
sections.
"""
from __future__ import annotations

import statistics

TARGETS = (("onnxfold", 2.0, "with verification"), ("onnxfold-nv", 1.0, "`--no-verify`"))
PHASE_NAMES = {"startup_s": "start-up", "lock_s": "lock", "load_s": "load", "plan_s": "plan", "stage_s": "stage",
               "fold_s": "fold", "write_s": "write", "verify_s": "verify", "check_s": "check",
               "commit_s": "commit", "rest": "rest"}
PHASES = tuple(k for k in PHASE_NAMES if k != "rest")


def _size(b: int) -> str:
    return f"{b / 1e6:,.1f} MB" if b >= 1e5 else f"{b / 1e3:,.0f} kB"


def phase_split(v: dict) -> dict[str, float]:
    """A run's time by top-level phase (medians); "rest" is the wall time outside start-up and total_s:
    arguments, the renames after the sync, the interpreter's exit."""
    ph = v.get("phases") or {}
    split = {k: ph[k] for k in PHASES if k in ph}
    if "total_s" in ph and "wall_median_s" in v:
        split["rest"] = max(0.0, v["wall_median_s"] - ph.get("startup_s", 0.0) - ph["total_s"])
    return split


def top_phases(v: dict, n: int = 2) -> list[tuple[str, float]]:
    """The `n` biggest phases, biggest first, as (name on the page, seconds)."""
    split = phase_split(v)
    return [(PHASE_NAMES[k], split[k]) for k in sorted(split, key=lambda k: -split[k])[:n]]


def dominant(v: dict) -> tuple[str, float] | None:
    top = top_phases(v, 1)
    return top[0] if top else None


def corpus_rows(results: dict) -> list[dict]:
    """One row per corpus model: sizes, medians, the ratios to onnxruntime, exit codes, dominant phase."""
    rows = []
    for name, m in (results.get("corpus") or {}).get("models", {}).items():
        vs = m["variants"]
        ort = vs.get("onnxruntime", {})
        ort_s = ort.get("wall_median_s") if ort.get("ok") else None
        row = {"name": name, "bytes": m.get("bytes", 0), "bn": m.get("bn_nodes"), "ort_s": ort_s,
               "ort_error": None if ort.get("ok") else ort.get("error", "not run")}
        for v, key in (("onnxfold", "fold"), ("onnxfold-nv", "nv")):
            r = vs.get(v, {})
            s = r.get("wall_median_s")
            row[f"{key}_s"] = s
            row[f"{key}_ratio"] = s / ort_s if (s is not None and ort_s) else None
            row[f"{key}_rcs"] = sorted(set(r.get("rcs", [])))
            row[f"{key}_error"] = r.get("error")
            row[f"{key}_dominant"] = dominant(r)
            row[f"{key}_top"] = top_phases(r)
        for v, key in (("floor-checked", "floor"), ("floor-load", "load")):
            floor = vs.get(v, {})
            row[f"{key}_s"] = floor.get("wall_median_s") if floor.get("ok") else None
            row[f"{key}_error"] = None if floor.get("ok") or not floor else floor.get("error", "failed")
            row[f"{key}_ratio"] = row[f"{key}_s"] / ort_s if (row[f"{key}_s"] and ort_s) else None
        row["nv_floor"] = row["nv_s"] / row["floor_s"] if (row["nv_s"] and row["floor_s"]) else None
        rows.append(row)
    return rows


def evaluate_targets(rows: list[dict]) -> list[dict]:
    """Per target: the models compared (onnxruntime ran), how many met the limit, the worst ones first."""
    out = []
    for variant, limit, label in TARGETS:
        key = "fold" if variant == "onnxfold" else "nv"
        compared = [r for r in rows if r[f"{key}_ratio"] is not None]
        worst = sorted(compared, key=lambda r: r[f"{key}_ratio"], reverse=True)
        met = [r for r in compared if r[f"{key}_ratio"] <= limit]
        out.append({"variant": variant, "label": label, "limit": limit, "compared": len(compared),
                    "met": len(met), "not_compared": [r["name"] for r in rows if r[f"{key}_ratio"] is None],
                    "missed": [(r["name"], r[f"{key}_ratio"]) for r in worst if r[f"{key}_ratio"] > limit],
                    "worst": [(r["name"], r[f"{key}_ratio"]) for r in worst[:5]]})
    return out


def _verdict(t: dict) -> str:
    head = f"onnxfold {t['label']} ≤ {t['limit']:g}x onnxruntime: met on {t['met']} of {t['compared']} models"
    if t["missed"]:
        shown = ", ".join(f"{n} {x:.2f}x" for n, x in t["missed"][:5])
        more = f" and {len(t['missed']) - 5} more" if len(t["missed"]) > 5 else ""
        head += f"; missed on {len(t['missed'])}: {shown}{more}"
    else:
        head += " (all)" if t["compared"] else ""
        if t["worst"]:
            head += f"; the worst {t['worst'][0][0]} {t['worst'][0][1]:.2f}x"
    if t["not_compared"]:
        head += f"; not compared (onnxruntime failed): {', '.join(t['not_compared'])}"
    return head + "."


def target_lines(results: dict) -> list[str]:
    rows = corpus_rows(results)
    return [f"- {_verdict(t)}" for t in evaluate_targets(rows)] + floor_lines(rows) if rows else []


def floor_lines(rows: list[dict]) -> list[str]:
    """The floors against the ``--no-verify`` target: on how many models a tool that folds nothing but gives
    the same guarantees (the checked floor), or does no more than import onnx beside onnxruntime's load
    (the load floor, a lower bound of any such tool), is within 1x onnxruntime at all, and where onnxfold
    stands against the checked floor."""
    lines = []
    for key, text in (("load", "The load floor (`import onnx` beside an onnxruntime session of the model in a "
                               "process that imported onnxruntime meanwhile: less than any tool that reads, "
                               "checks and has onnxruntime load what it writes can do)"),
                      ("floor", "The checked floor (onnx.load + onnx.save, the files synced, onnx.checker and an "
                                "onnxruntime session of the written model: what `--no-verify` guarantees, "
                                "with nothing folded)")):
        compared = [r for r in rows if r.get(f"{key}_ratio") is not None]
        if not compared:
            continue
        within = [r for r in compared if r[f"{key}_ratio"] <= 1.0]
        line = (f"- {text} is ≤ 1x onnxruntime on {len(within)} of {len(compared)} models (median "
                f"{statistics.median(r[f'{key}_ratio'] for r in compared):.2f}x)")
        both = [r for r in compared if key == "floor" and r["nv_floor"] is not None]
        if both:
            under = [r for r in both if r["nv_floor"] <= 1.0]
            line += (f"; onnxfold `--no-verify`, which also folds, is at a median "
                     f"{statistics.median(r['nv_floor'] for r in both):.2f}x of it and at or under it on "
                     f"{len(under)} of {len(both)}")
        failed = [r["name"] for r in rows if r.get(f"{key}_error")]
        lines.append(line + "." + (f" It failed on: {', '.join(failed)}." if failed else ""))
    return lines


def gap_explanation(results: dict) -> list[str]:
    """Where the time goes, from the medians over the corpus and the start-up measurements."""
    corpus = results.get("corpus") or {}
    rows = [r for r in corpus_rows(results) if r["ort_s"] and r["fold_s"] and r["nv_s"]]
    if not rows:
        return []
    med = {k: statistics.median(r[k] for r in rows) for k in ("ort_s", "fold_s", "nv_s")}
    splits = {v: [phase_split(m["variants"][v]) for m in corpus["models"].values()
                  if m["variants"].get(v, {}).get("phases")] for v in ("onnxfold", "onnxfold-nv")}
    L = [f"Medians over the {len(rows)} models both ran on: onnxruntime {med['ort_s']:.2f} s, onnxfold "
         f"{med['fold_s']:.2f} s ({med['fold_s'] / med['ort_s']:.2f}x), `--no-verify` {med['nv_s']:.2f} s "
         f"({med['nv_s'] / med['ort_s']:.2f}x)."]
    for v, label in (("onnxfold", "With verification"), ("onnxfold-nv", "With `--no-verify`")):
        if not splits[v]:
            continue
        phase_med = {k: statistics.median(s.get(k, 0.0) for s in splits[v]) for k in PHASE_NAMES}
        big = sorted(((k, x) for k, x in phase_med.items() if x >= 0.005), key=lambda kv: -kv[1])
        L.append(f"{label}, the median model's phases (median of each over the models): "
                 + ", ".join(f"{PHASE_NAMES[k]} {x:.2f} s" for k, x in big) + ".")
    walls = (results.get("startup") or {}).get("walls", {})
    bare, ort_imp = walls.get("python -c pass"), walls.get("python -c \"import onnxruntime\"")
    ver = walls.get("python -m onnxfold --version")
    if bare and ort_imp and ver:
        gap = med["nv_s"] - med["ort_s"]
        L.append(f"Start-up alone: a bare `python -c pass` takes {bare:.2f} s, `python -c \"import onnxruntime\"` "
                 f"{ort_imp:.2f} s (onnxruntime's tool pays this, then works in C++), `python -m onnxfold --version` "
                 f"{ver:.2f} s: onnxfold's start-up is {ver - ort_imp:+.2f} s against onnxruntime's, of a median "
                 f"`--no-verify` gap of {gap:+.2f} s. Beyond start-up (each median wall less its command's bare "
                 f"start-up): onnxruntime {med['ort_s'] - ort_imp:.2f} s, onnxfold {med['fold_s'] - ver:.2f} s, "
                 f"`--no-verify` {med['nv_s'] - ver:.2f} s.")
    return L


def _ratio(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}x"


def _sec(x: float | None) -> str:
    return "–" if x is None else f"{x:.2f}"


def _fold_cell(r: dict, key: str) -> str:
    cell = f"{_sec(r[f'{key}_s'])} ({_ratio(r[f'{key}_ratio'])})"
    bad = [c for c in r[f"{key}_rcs"] if c != 0]
    if bad:
        cell += f", exit {'/'.join(map(str, bad))}"
    return cell


def _dom(top: list[tuple[str, float]]) -> str:
    return ", ".join(f"{k} {x:.2f} s" for k, x in top) or "–"


def render_corpus_md(results: dict) -> list[str]:
    corpus = results.get("corpus")
    if not corpus:
        return []
    rows = corpus_rows(results)
    loads = corpus.get("loadavg_1m", [])
    L = ["## Corpus: whole process vs onnxruntime's offline optimizer", "",
         f"Every model of the real-model corpus (`python tools/corpus.py`; {len(rows)} models), each as fresh "
         "processes exactly as a user runs them: `python -m onnxfold IN OUT` (verification, the default), "
         "`python -m onnxfold IN OUT --no-verify`, and onnxruntime's offline optimizer (the *onnxruntime* tool "
         "above, told to write external data where the model has it); and the *checked floor*: the model "
         "read and written with onnx.load and onnx.save, folded not at all, with the checks `--no-verify` "
         "makes before exit 0 (the files synced, onnx.checker on the written file, an onnxruntime session of "
         "it with optimizations off), arranged as favourably as two cores allow (the session's process forked "
         "at interpreter start, so that its onnxruntime import overlaps the onnx import; the checker beside "
         "the session; tools/bench_corpus.py's FLOOR_CHECKED); and the *load floor*, a lower bound of any "
         "tool that gives those guarantees with onnx and onnxruntime: `import onnx` beside an onnxruntime "
         "session of the model (the input standing in for the written model) made in a process that "
         "imported onnxruntime meanwhile (FLOOR_LOAD). Median wall time (spawn to reap) of "
         f"{corpus['rounds']} interleaved rounds after "
         f"{corpus['warmup']} warm-up round(s): each round runs every model, each model's commands in an "
         "order rotated from round to round. Ratios are to onnxruntime; an exit code other than 0 is shown. "
         "*Biggest phases*: the two largest of onnxfold's `--report` timings (medians; *start-up* is the "
         "interpreter and the imports, *rest* the wall time outside start-up and `total_s`: arguments, renames, "
         "the interpreter's exit)."
         + (f" 1-minute load average at each round's start: {min(loads):.2f} to {max(loads):.2f}; "
            f"the section took {corpus.get('seconds', 0):.0f} s." if loads else ""), ""]
    L += [*target_lines(results), ""]
    L += gap_explanation(results) + ["", "![onnxfold over onnxruntime per corpus model](benchmarks_corpus.png)", ""]
    L += ["| model | size | BN | onnxruntime s | onnxfold s (× ort) | biggest phases | --no-verify s (× ort) "
          "| biggest phases | checked floor s (× ort) | load floor s (× ort) |",
          "|---|---:|---:|---:|---:|---|---:|---|---:|---:|"]
    for r in rows:
        ort = _sec(r["ort_s"]) if r["ort_s"] else f"✗ {str(r['ort_error'])[:60]}"
        floors = [f"{_sec(r[f'{k}_s'])} ({_ratio(r[f'{k}_ratio'])})" if r[f"{k}_s"]
                  else f"✗ {str(r[f'{k}_error'])[:60]}" if r[f"{k}_error"] else "–" for k in ("floor", "load")]
        L.append(f"| {r['name']} | {_size(r['bytes'])} | {r['bn'] if r['bn'] is not None else '–'} | {ort} | "
                 f"{_fold_cell(r, 'fold')} | {_dom(r['fold_top'])} | {_fold_cell(r, 'nv')} | "
                 f"{_dom(r['nv_top'])} | {floors[0]} | {floors[1]} |")
    errors = [(r["name"], k, r[f"{k}_error"]) for r in rows for k in ("fold", "nv") if r[f"{k}_error"]]
    if errors:
        L += ["", "onnxfold's messages where it exited non-zero:", ""]
        L += [f"- {n} ({'verified' if k == 'fold' else '--no-verify'}): {str(e)[:200]}" for n, k, e in errors]
    return L + [""] + render_folder_md(results)


def render_folder_md(results: dict) -> list[str]:
    """The corpus as one folder: start-up and imports paid once, as for a user with many models."""
    f = results.get("folder")
    if not f:
        return []
    v = f["variants"]
    n = f["models"]
    L = ["### The corpus as one folder", "",
         f"The same {n} models linked into one folder and folded by one command, `python -m onnxfold IN_DIR "
         "OUT_DIR` (start-up paid once; `-j 2` folds two models at once), against onnxruntime's offline "
         "optimizer over the same models in one process (`python -c` looping over them, the same session "
         f"options). Median wall time of {f['rounds']} interleaved rounds:", "",
         "| command | whole folder s (min–max) | per model s | × onnxruntime | exit codes |",
         "|---|---:|---:|---:|---|"]
    ort = v.get("onnxruntime", {}).get("wall_median_s")
    labels = {"onnxfold": "`python -m onnxfold IN_DIR OUT_DIR`", "onnxfold-nv": "… `--no-verify`",
              "onnxfold -j 2": "… `-j 2`", "onnxruntime": "onnxruntime, one process"}
    for name, x in v.items():
        ratio = f"{x['wall_median_s'] / ort:.2f}x" if ort else "–"
        L.append(f"| {labels.get(name, name)} | {x['wall_median_s']:.1f} ({x['wall_min_s']:.1f}–{x['wall_max_s']:.1f}) "
                 f"| {x['wall_median_s'] / n:.3f} | {ratio} | {'/'.join(sorted({str(c) for c in x['rcs']}))} |")
    return L + [""]


def render_startup_md(results: dict) -> list[str]:
    st = results.get("startup")
    if not st:
        return []
    L = ["## Start-up", "", f"Fresh processes, median wall time of {st['repeat']} interleaved runs:", "",
         "| command | s |", "|---|---:|"]
    L += [f"| `{cmd}` | {s:.3f} |" for cmd, s in st.get("walls", {}).items()]
    imp = st.get("importtime") or {}
    if imp.get("top"):
        L += ["", f"`python -X importtime -m onnxfold --version`: the outermost imports total "
              f"{imp['total_s']:.3f} s (median of {imp['runs']} runs); the {len(imp['top'])} biggest entries by "
              "cumulative time (a module's time includes what it imports; indentation is the nesting):", "",
              "| module | cumulative s |", "|---|---:|"]
        L += [f"| {'&nbsp;' * 2 * e['depth']}{e['module']} | {e['cumulative_s']:.3f} |" for e in imp["top"]]
    return L + [""]


def render_corpus_png(results: dict, path) -> bool:
    """Per corpus model, onnxfold's time over onnxruntime's with and without verification, the targets as
    lines; False when there is no corpus section."""
    rows = [r for r in corpus_rows(results) if r["fold_ratio"] is not None and r["nv_ratio"] is not None]
    if not rows:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    rows.sort(key=lambda r: r["fold_ratio"])
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.2 * len(rows)))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["fold_ratio"] for r in rows], 0.4, label="onnxfold (verified)")
    ax.barh([y - 0.2 for y in ys], [r["nv_ratio"] for r in rows], 0.4, label="onnxfold --no-verify")
    floored = []
    for key, marker, label in (("floor_ratio", "|", "checked floor (folds nothing)"),
                               ("load_ratio", "x", "load floor (import onnx beside the load)")):
        marks = [(y, r[key]) for y, r in zip(ys, rows) if r.get(key)]
        if marks:  # on the --no-verify bar: its guarantees with nothing folded; less than they need
            ax.scatter([x for _, x in marks], [y - 0.2 for y, _ in marks], marker=marker, s=30, color="black",
                       linewidths=1, zorder=3, label=label)
            floored += marks
    for limit, style in ((1.0, "--"), (2.0, ":")):
        ax.axvline(limit, color="black", linewidth=0.8, linestyle=style)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([r["name"] for r in rows], fontsize=7)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xscale("log")
    ratios = [r[k] for r in rows for k in ("fold_ratio", "nv_ratio")] + [x for _, x in floored] + [1.0, 2.0]
    lo, hi = min(ratios) / 1.3, max(ratios) * 1.3
    ax.set_xlim(lo, hi)
    ax.set_xticks([v for v in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1, 1.5, 2, 3, 5, 7, 10, 20) if lo <= v <= hi])
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}×"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_title("onnxfold's wall time × onnxruntime's offline optimizer (fresh processes, median)\n"
                 "targets: ≤ 2× verified (dotted), ≤ 1× --no-verify (dashed)", fontsize=9)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="x", which="major", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
