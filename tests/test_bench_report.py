"""tools/bench.py's corpus and start-up sections (issue 20): the page's rows, targets and text, from
synthetic results (no process is run, nothing is timed)."""

from __future__ import annotations

import sys

import pytest

from checks import ROOT


@pytest.fixture(scope="module")
def tools():
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench_corpus
        import bench_corpus_report
        import bench_report

        yield bench_corpus, bench_corpus_report, bench_report
    finally:
        sys.path.remove(str(ROOT / "tools"))


def variant(wall, rcs=(0, 0, 0), phases=None, ok=None, error=None):
    v = {"runs": len(rcs), "wall_median_s": wall, "wall_min_s": wall, "wall_max_s": wall, "rss_median_mib": 50.0,
         "rcs": list(rcs), "ok": all(c == 0 for c in rcs) if ok is None else ok}
    if phases:
        v["phases"] = phases
    if error:
        v["error"] = error
    return v


def phases(startup, verify=0.0, check=0.0, fold=0.01, total=None):
    p = {"startup_s": startup, "load_s": 0.01, "fold_s": fold, "write_s": 0.01, "verify_s": verify,
         "check_s": check, "commit_s": 0.001, "verify_child_s": verify * 0.9}
    p["total_s"] = total if total is not None else 0.031 + verify + check + fold
    return p


def synthetic() -> dict:
    models = {
        # met both: 0.5 / 0.3 = 1.67x, 0.29 / 0.3 = 0.97x; the checked floor 0.27 / 0.3 = 0.9x, the load
        # floor 0.24 / 0.3 = 0.8x
        "timm/a_legacy": {"ort": variant(0.30), "fold": variant(0.50, phases=phases(0.2, verify=0.25)),
                          "nv": variant(0.29, phases=phases(0.2, check=0.05)), "floor": variant(0.27),
                          "load": variant(0.24)},
        # missed both: 0.9 / 0.2 = 4.5x, 0.5 / 0.2 = 2.5x; verification failed (exit 1) once; the floors
        # 0.4 / 0.2 = 2x and 0.3 / 0.2 = 1.5x
        "hf/detr_dynamo": {"ort": variant(0.20),
                           "fold": variant(0.90, rcs=(0, 1, 0), phases=phases(0.25, verify=0.55),
                                           error="verification failed: output y"),
                           "nv": variant(0.50, phases=phases(0.25, fold=0.2)), "floor": variant(0.40),
                           "load": variant(0.30)},
        # onnxruntime failed: not compared; the checked floor failed too
        "wheels/x/bad": {"ort": variant(0.10, rcs=(1,), error="InvalidGraph: bad node"),
                         "fold": variant(0.40, phases=phases(0.2)), "nv": variant(0.35, phases=phases(0.2)),
                         "floor": variant(0.2, rcs=(1,), error="ValidationError: bad"), "load": variant(0.2)},
    }
    corpus = {"dir": "/c", "rounds": 3, "warmup": 1, "loadavg_1m": [0.5, 1.5], "seconds": 12.0, "models": {
        name: {"bytes": 4_000_000, "bn_nodes": 7, "kind": "timm", "external_data": False,
               "variants": {"onnxruntime": m["ort"], "onnxfold": m["fold"], "onnxfold-nv": m["nv"],
                            "floor-checked": m["floor"], "floor-load": m["load"]}}
        for name, m in models.items()}}
    startup = {"repeat": 3, "walls": {"python -c pass": 0.04, "python -c \"import onnxruntime\"": 0.13,
                                      "python -c \"import onnx\"": 0.15, "python -m onnxfold --version": 0.26},
               "importtime": {"runs": 3, "total_s": 0.23, "top": [
                   {"module": "onnxfold", "depth": 0, "cumulative_s": 0.198},
                   {"module": "onnx", "depth": 2, "cumulative_s": 0.097}]}}
    return {"results": {}, "models": {}, "tools": {}, "quick": False, "runs": [],
            "settings": {"warmup": 1, "repeat": 5, "big_mb": 1000, "big_repeat": 3,
                         "big_full": ["floor", "onnxfold", "onnxruntime"]},
            "machine": {"cpu": "cpu", "cores": 2, "ram_gib": 8.0, "os": "linux", "versions": {"onnx": "1"},
                        "git_rev": "abc"},
            "corpus": corpus, "startup": startup}


def test_rows_ratios_exit_codes_and_dominant_phase(tools):
    _, rep, _ = tools
    rows = {r["name"]: r for r in rep.corpus_rows(synthetic())}
    a, detr, bad = rows["timm/a_legacy"], rows["hf/detr_dynamo"], rows["wheels/x/bad"]
    assert a["fold_ratio"] == pytest.approx(0.5 / 0.3) and a["nv_ratio"] == pytest.approx(0.29 / 0.3)
    assert detr["fold_ratio"] == pytest.approx(4.5) and detr["fold_rcs"] == [0, 1]
    assert detr["fold_dominant"] == ("verify", pytest.approx(0.55))
    assert detr["nv_dominant"] == ("start-up", pytest.approx(0.25))
    assert [k for k, _ in detr["nv_top"]] == ["start-up", "fold"]
    assert bad["ort_s"] is None and bad["fold_ratio"] is None and "InvalidGraph" in bad["ort_error"]
    assert a["floor_ratio"] == pytest.approx(0.9) and a["nv_floor"] == pytest.approx(0.29 / 0.27)
    assert detr["floor_ratio"] == pytest.approx(2.0) and detr["nv_floor"] == pytest.approx(1.25)
    assert bad["floor_s"] is None and bad["floor_ratio"] is None and "ValidationError" in bad["floor_error"]
    assert a["load_ratio"] == pytest.approx(0.8) and detr["load_ratio"] == pytest.approx(1.5)
    assert bad["load_ratio"] is None and bad["load_error"] is None  # ran; onnxruntime's own run failed
    # "rest": the wall time outside start-up and total_s
    split = rep.phase_split(synthetic()["corpus"]["models"]["timm/a_legacy"]["variants"]["onnxfold"])
    assert split["rest"] == pytest.approx(0.5 - 0.2 - (0.031 + 0.25 + 0.01))


def test_targets_count_met_and_name_the_worst(tools):
    _, rep, _ = tools
    verify, nv = rep.evaluate_targets(rep.corpus_rows(synthetic()))
    assert (verify["limit"], verify["compared"], verify["met"]) == (2.0, 2, 1)
    assert [n for n, _ in verify["missed"]] == ["hf/detr_dynamo"]
    assert verify["not_compared"] == ["wheels/x/bad"]
    assert (nv["limit"], nv["compared"], nv["met"]) == (1.0, 2, 1)
    assert [n for n, _ in nv["worst"]] == ["hf/detr_dynamo", "timm/a_legacy"]
    # a model exactly at the limit meets it
    rows = [{"name": "m", "fold_ratio": 2.0, "nv_ratio": 1.0}]
    assert [t["met"] for t in rep.evaluate_targets(rows)] == [1, 1]


def test_page_has_the_corpus_table_targets_and_start_up(tools):
    _, _, report = tools
    md = report.render_md(synthetic())
    intro = md.split("## Machine and versions")[0]
    assert ("onnxfold with verification ≤ 2x onnxruntime: met on 1 of 2 models; missed on 1: "
            "hf/detr_dynamo 4.50x") in intro
    assert "not compared (onnxruntime failed): wheels/x/bad" in intro
    assert ("with nothing folded) is ≤ 1x onnxruntime on 1 of 2 models (median 1.45x); onnxfold `--no-verify`, "
            "which also folds, is at a median 1.16x of it and at or under it on 0 of 2. "
            "It failed on: wheels/x/bad.") in intro
    assert "can do) is ≤ 1x onnxruntime on 1 of 2 models (median 1.15x)." in intro
    assert ("| hf/detr_dynamo | 4.0 MB | 7 | 0.20 | 0.90 (4.50x), exit 1 | verify 0.55 s, start-up 0.25 s "
            "| 0.50 (2.50x) | start-up 0.25 s, fold 0.20 s | 0.40 (2.00x) | 0.30 (1.50x) |") in md
    assert "| wheels/x/bad | 4.0 MB | 7 | ✗ InvalidGraph: bad node |" in md
    assert md.split("| wheels/x/bad |")[1].split("\n")[0].endswith("| ✗ ValidationError: bad | 0.20 (–) |")
    assert "- hf/detr_dynamo (verified): verification failed: output y" in md
    assert "| `python -c \"import onnxruntime\"` | 0.130 |" in md
    assert "the outermost imports total 0.230 s" in md and "| &nbsp;&nbsp;&nbsp;&nbsp;onnx | 0.097 |" in md
    assert "onnxfold's start-up is +0.13 s against onnxruntime's" in md
    # medians over the two compared models: ort 0.25, verified 0.70, --no-verify 0.395
    assert "onnxruntime 0.12 s, onnxfold 0.44 s, `--no-verify` 0.14 s." in md
    assert "get 3 timed runs and no warm-up" in md
    # a results file without the corpus sections renders as before
    plain = {k: v for k, v in synthetic().items() if k not in ("corpus", "startup")}
    assert "## Corpus" not in report.render_md(plain) and "## Start-up" not in report.render_md(plain)


def test_results_without_the_checked_floor_render_as_before(tools):
    """A results file from before the floor was measured: no floor line, a dash in its column."""
    _, rep, report = tools
    old = synthetic()
    for m in old["corpus"]["models"].values():
        del m["variants"]["floor-checked"], m["variants"]["floor-load"]
    assert rep.floor_lines(rep.corpus_rows(old)) == []
    md = report.render_md(old)
    assert "checked floor (onnx.load" not in md and "| 0.50 (2.50x) | start-up 0.25 s, fold 0.20 s | – | – |" in md


@pytest.mark.parametrize("model, ext", [("mlp_bn1d.onnx", False), ("resnet_block_extdata.onnx", True)])
def test_the_checked_floor_writes_a_model_that_loads(tools, tmp_path, model, ext):
    """FLOOR_CHECKED, run as the corpus section runs it: exit 0, a model that onnx and onnxruntime load,
    with its external data where asked; and an input it cannot read is a non-zero exit, its session child
    not left waiting."""
    import subprocess

    import onnx

    corpus, _, _ = tools
    dst = tmp_path / "out.onnx"
    argv = corpus.variant_argv("floor-checked", str(ROOT / "models" / model), str(dst), "", ext, None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "out.onnx.data").exists() == ext
    onnx.checker.check_model(str(dst))
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    done = subprocess.run(corpus.variant_argv("floor-checked", str(bad), str(tmp_path / "o2.onnx"), "", False, None),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and not (tmp_path / "o2.onnx").exists()


def test_the_load_floor_loads_the_model_and_fails_where_onnxruntime_cannot(tools, tmp_path):
    import subprocess

    corpus, _, _ = tools
    argv = corpus.variant_argv("floor-load", str(ROOT / "models" / "resnet_block.onnx"), str(tmp_path / "o.onnx"),
                               "", False, None)
    done = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "o.onnx").exists()  # it writes nothing
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    done = subprocess.run(corpus.variant_argv("floor-load", str(bad), "", "", False, None), capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 1


def test_importtime_parsing_and_summary(tools):
    corpus, _, _ = tools
    err = ("import time: self [us] | cumulative | imported package\n"
           "import time:       100 |        100 | site\n"
           "import time:      5000 |       5000 |     numpy\n"
           "import time:      1000 |      90000 |   onnx\n"
           "import time:      2000 |     150000 | onnxfold\n"
           "import time:        10 |         10 |   numpy\n")
    rows = corpus.parse_importtime(err)
    assert rows[1] == ("numpy", 2, 0.005, 0.005) and rows[3] == ("onnxfold", 0, 0.002, 0.15)
    s = corpus.importtime_summary([rows, rows], top=3)
    assert s["total_s"] == pytest.approx(0.1501)
    assert [(e["module"], e["depth"]) for e in s["top"]] == [("onnxfold", 0), ("onnx", 1), ("numpy", 2)]
    assert corpus.rotated(("a", "b", "c"), 4) == ["b", "c", "a"]


def test_corpus_chart(tools, tmp_path):
    _, rep, _ = tools
    assert rep.render_corpus_png({"results": {}}, tmp_path / "none.png") is False  # no corpus, no chart
    pytest.importorskip("matplotlib")  # the "bench" extra
    assert rep.render_corpus_png(synthetic(), tmp_path / "c.png") and (tmp_path / "c.png").stat().st_size > 0


def test_folder_section(tools):
    _, report, _ = tools
    assert report.render_folder_md({}) == []
    wall = {"onnxfold": 20.0, "onnxfold-nv": 16.0, "onnxfold -j 2": 12.0, "onnxruntime": 8.0}
    results = {"folder": {"models": 40, "rounds": 3, "variants": {
        k: {"wall_median_s": w, "wall_min_s": w - 1, "wall_max_s": w + 1, "rcs": [0, 0, 1 if k == "onnxfold" else 0]}
        for k, w in wall.items()}}}
    text = "\n".join(report.render_folder_md(results))
    assert "The same 40 models" in text and "3 interleaved rounds" in text
    assert "| `python -m onnxfold IN_DIR OUT_DIR` | 20.0 (19.0–21.0) | 0.500 | 2.50x | 0/1 |" in text
    assert "| … `-j 2` | 12.0 (11.0–13.0) | 0.300 | 1.50x | 0 |" in text
    assert "| onnxruntime, one process | 8.0 (7.0–9.0) | 0.200 | 1.00x | 0 |" in text


def test_folder_of_links_mirrors_the_corpus_layout(tools, tmp_path):
    corpus, _, _ = tools
    src = tmp_path / "c"
    (src / "hf").mkdir(parents=True)
    (src / "hf" / "a.onnx").write_bytes(b"model")
    (src / "hf" / "a.onnx.data").write_bytes(b"data")
    (src / "b.onnx").write_bytes(b"b")
    into = tmp_path / "links"
    into.mkdir()
    corpus.folder_of_links(src, [{"file": "hf/a.onnx", "data_file": "hf/a.onnx.data"}, {"file": "b.onnx"}], into)
    assert sorted(str(p.relative_to(into)) for p in into.rglob("*") if p.is_file() and not p.is_symlink()) == [
        "b.onnx", "hf/a.onnx", "hf/a.onnx.data"]
    assert (into / "hf" / "a.onnx.data").read_bytes() == b"data"


def test_the_readme_headline_follows_only_the_repositorys_own_page(tools, tmp_path, monkeypatch):
    """A run of a few models into another folder (--docs-dir) once emptied the README's committed headline:
    render() rewrites a README only when given one, and tools/bench.py gives it only for the repository's
    own docs/ page."""
    _, _, report = tools
    monkeypatch.setattr(report, "render_png", lambda *args: None)  # the page's text is what is checked
    readme = tmp_path / "README.md"
    before = f"intro\n{report.README_START}\nold headline\n{report.README_END}\nrest\n"
    readme.write_text(before)
    report.render(synthetic(), tmp_path / "elsewhere")
    assert readme.read_text() == before and (tmp_path / "elsewhere" / "benchmarks.md").exists()
    report.render(synthetic(), tmp_path / "docs", readme)
    after = readme.read_text()
    assert "old headline" not in after and after.startswith("intro\n") and after.endswith("rest\n")
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import bench

        plan = bench._plan(bench._parser().parse_args(["--docs-dir", str(tmp_path / "elsewhere")]))
        assert bench._readme(plan) is None
        assert bench._readme(bench._plan(bench._parser().parse_args([]))) == ROOT / "README.md"
    finally:
        sys.path.remove(str(ROOT / "tools"))
