"""Fold many models on a Dask cluster: each model is one task, its result a JSON-ready dict.

    pip install "dask[distributed]"
    python examples/fold_on_dask.py IN_DIR OUT_DIR                       # a local cluster
    python examples/fold_on_dask.py IN_DIR OUT_DIR --scheduler tcp://host:8786   # an existing one
    python examples/fold_on_dask.py IN_DIR OUT_DIR --report results.json

Each model folds independently (``onnxfold.fold_file``: load, fold, verify, write atomically), so the
engine only has to map one function over a list: no scheduler of our own. That function is
``onnxfold.api.fold_task``: importable by name on every worker, it never raises; a model that cannot
be folded (a broken file, a failed verification, a bug) is reported in its own result, and the others
go on. Results are ``FoldResult.to_dict()`` (the ``--report`` JSON), gathered on the client;
``FoldResult`` itself pickles too, for engines that return objects.

Output paths must be visible to the workers under the same names (a shared filesystem), as for any
cluster job that writes files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onnxfold.api import fold_task


def fold_many(client, pairs: list[tuple[str, str]], **options) -> list[dict]:
    """Fold each (input, output) pair on ``client`` (a ``dask.distributed.Client``); the results in the
    order given. ``options``: :func:`onnxfold.fold_file`'s keywords, the same for every model."""
    futures = [client.submit(fold_task, src, dst, pure=False, **options)  # pure=False: a fold writes a file,
               for src, dst in pairs]                                   # never skipped as a cached result
    return client.gather(futures)


def pairs_below(in_dir: Path, out_dir: Path) -> list[tuple[str, str]]:
    """Every *.onnx below ``in_dir`` with its output at the same relative path below ``out_dir``."""
    pairs = []
    for src in sorted(in_dir.rglob("*.onnx")):
        dst = out_dir / src.relative_to(in_dir)
        dst.parent.mkdir(parents=True, exist_ok=True)
        pairs.append((str(src), str(dst)))
    return pairs


def main(argv: list[str] | None = None) -> int:
    from dask.distributed import Client, LocalCluster

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input", type=Path)
    ap.add_argument("output", type=Path)
    ap.add_argument("--scheduler", help="address of an existing Dask scheduler (default: a local cluster)")
    ap.add_argument("--workers", type=int, default=2, help="local cluster: worker processes (default 2)")
    ap.add_argument("--report", type=Path, help="write every model's result as one JSON file")
    args = ap.parse_args(argv)
    pairs = pairs_below(args.input, args.output)
    if args.scheduler:
        with Client(args.scheduler) as client:
            results = fold_many(client, pairs)
    else:
        with LocalCluster(n_workers=args.workers, threads_per_worker=1, processes=True) as cluster, \
                Client(cluster) as client:
            results = fold_many(client, pairs)
    failed = [r for r in results if r["status"] != "written"]
    for r in failed:
        print(f"{r['input']}: {r['status']}", file=sys.stderr)
    print(f"{len(results)} models: {len(results) - len(failed)} written, {len(failed)} failed", file=sys.stderr)
    if args.report:
        args.report.write_text(json.dumps(results, indent=2, default=str))
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
