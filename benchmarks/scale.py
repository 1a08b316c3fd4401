"""How celldit scales with cells and genes: wall time and peak memory of each stage, as JSON.

    python benchmarks/scale.py --work /tmp/scale --cells 10000 100000 1000000 --out out/scale.json
    python benchmarks/scale.py --work /tmp/scale --cells 10000 --quick          # a minute, small sizes

Every stage runs in its own Python process, so its peak resident memory (``ru_maxrss`` of
the process and of its DataLoader workers) is its own; the page cache is not counted.

Stages, per size (``celldit simulate`` output: G genes, P perturbations, ~15% nonzero,
2 batches, read backed from disk):

* ``simulate``: writing the file (chunked);
* ``construct``: ``CellDiT(backed file, pair_keys=["batch"])``: registration (one chunked
  pass for the expression space and library sizes, one for the condition means);
* ``data``: the training data path alone, ``--workers`` DataLoader workers: cells/s delivered;
* ``train``: construction + ``--steps`` training steps with those workers: cells/s and the
  share of step time spent waiting for data;
* ``counterfactual``: ``--cf-cells`` counterfactual cells (controls x perturbations) written to
  disk chunk by chunk;
* ``evaluate``: ``evaluate --baselines all`` on a Norman-sized case (110k cells x 5,000 genes,
  ~250 conditions; ``--norman``), the model's counterfactuals beside the baselines.

And the gene axis (``--genes-axis 300 2000 8000``): setup time and the cost of a training step
of the default model (module tokens) at each gene count, on ``--axis-cells`` cells.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    """Peak resident set size of this process and of its waited-for children (MB)."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, kids) / 1024, 1)


# ---------------------------------------------------------------------------- stages (in a subprocess)
def stage_simulate(a) -> dict:
    from celldit.data.synthetic import simulate_h5ad

    t0 = time.perf_counter()
    simulate_h5ad(a.file, a.cells, a.genes, a.perturbations, n_batches=2, n_combinations=a.combinations,
                  library_size=a.library_size, chunk_size=20_000, overwrite=True, seed=0)
    import anndata as ad

    backed = ad.read_h5ad(a.file, backed="r")
    nnz = int(backed.X.group["indptr"][-1]) if hasattr(backed.X, "group") else None
    return {"wall_s": round(time.perf_counter() - t0, 2), "nonzero_fraction": None if nnz is None else
            round(nnz / (a.cells * a.genes), 4), "file_gb": round(Path(a.file).stat().st_size / 1e9, 3)}


def _model(a, tokenizer: str = "module"):
    import anndata as ad

    from celldit.cells import CellDiT

    backed = ad.read_h5ad(a.file, backed="r")
    return CellDiT(backed, perturbation_key="perturbation", control="control", pair_keys=["batch"],
                   perturbation_features=None, tokenizer=tokenizer, seed=0)


def stage_construct(a) -> dict:
    t0 = time.perf_counter()
    model = _model(a)
    return {"wall_s": round(time.perf_counter() - t0, 2), "tokens": model.network.tokenizer.num_tokens,
            "conditions": len(model.conditions.keys)}


def stage_data(a) -> dict:
    from celldit.cells import CellFitConfig
    from celldit.cells.dataset import batch_loader

    model = _model(a)
    train, _ = model._batches(CellFitConfig(max_steps=a.data_steps), 0)
    loader = batch_loader(train, a.workers)  # the training loop's loader
    t0, n, first = time.perf_counter(), 0, None
    for batch in loader:
        n += len(batch["x1"])
        first = first or time.perf_counter() - t0
    wall = time.perf_counter() - t0
    # a backed file is read into chunk-shuffled buffers renewed every 4 * buffer_cells / batch_size steps:
    # the first batch waits for a buffer; what follows is the steady rate
    return {"wall_s": round(wall, 2), "batches": a.data_steps, "cells_per_s": round(n / wall, 1),
            "first_batch_s": round(first, 2), "after_first_cells_per_s": round((n - 256) / max(wall - first, 1e-9), 1),
            "workers": a.workers}


def stage_train(a) -> dict:
    import lightning as L

    class Waits(L.Callback):
        def __init__(self):
            self.last, self.wait, self.total, self.t0 = None, 0.0, 0.0, None

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            now = time.perf_counter()
            if self.last is not None:
                self.wait += now - self.last
            self.t0 = now

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            self.last = time.perf_counter()
            self.total += self.last - self.t0

    from celldit.train import trainer as trainer_module

    waits = Waits()
    build = trainer_module.build_trainer
    trainer_module.build_trainer = lambda *x, callbacks=(), **k: build(*x, callbacks=[*callbacks, waits], **k)
    t0 = time.perf_counter()
    model = _model(a)
    t1 = time.perf_counter()
    model.fit(max_steps=a.steps, num_workers=a.workers, trainer={"progress_bar": False, "logger": None,
                                                                   "accelerator": "cpu"})
    t2 = time.perf_counter()
    return {"construct_s": round(t1 - t0, 2), "train_s": round(t2 - t1, 2), "steps": a.steps,
            "cells_per_s": round(a.steps * 256 / (t2 - t1), 1),
            "data_wait_share": round(waits.wait / max(waits.wait + waits.total, 1e-9), 3)}


def stage_counterfactual(a) -> dict:
    import anndata as ad
    import numpy as np

    from celldit.cli.counterfactual import trained_labels

    model = _model(a, a.cf_tokenizer)  # the output path's memory does not depend on the network
    backed = ad.read_h5ad(a.file, backed="r")
    labels = trained_labels(model)
    n_controls = max(1, a.cf_cells // len(labels))
    ctrl = np.flatnonzero((backed.obs["perturbation"] == "control").to_numpy())[:n_controls]
    controls = backed[ctrl].to_memory()
    out = Path(a.work) / f"cf_{a.cells}.h5ad"
    t0 = time.perf_counter()
    pred = model.counterfactual(controls, labels, out=out, overwrite=True, batch_size=4096)
    wall = time.perf_counter() - t0
    n = pred.n_obs
    pred.file.close()
    return {"wall_s": round(wall, 2), "cells": n, "cells_per_s": round(n / wall, 1), "tokenizer": a.cf_tokenizer,
            "file_gb": round(out.stat().st_size / 1e9, 3), "controls": len(ctrl), "perturbations": len(labels)}


def stage_evaluate(a) -> dict:
    import anndata as ad

    from celldit.data.spec import PerturbationSpec
    from celldit.eval.report import evaluate

    backed = ad.read_h5ad(a.file, backed="r")
    spec = PerturbationSpec("perturbation", "control")
    batch = backed.obs["batch"].astype(str).to_numpy()
    train, test = backed[batch == "batch0"], backed[batch == "batch1"]
    t0 = time.perf_counter()
    result = evaluate(test, None, spec, train=train, baselines=["all"], min_cells=40, figures=False,
                      cell_eval=False)
    return {"wall_s": round(time.perf_counter() - t0, 2), "conditions": result.summary["n_conditions"],
            "train_cells": int((batch == "batch0").sum()), "test_cells": int((batch == "batch1").sum()),
            "mean_shift_edistance": round(float(result.summary["mean_shift"]["edistance"]), 4),
            "no_change_edistance": round(float(result.summary["no_change"]["edistance"]), 4)}


def stage_genes(a) -> dict:
    import anndata as ad

    from celldit.cells import CellDiT
    backed = ad.read_h5ad(a.file, backed="r")
    t0 = time.perf_counter()
    model = CellDiT(backed, perturbation_key="perturbation", control="control", perturbation_features=None)
    setup = time.perf_counter() - t0
    t1 = time.perf_counter()
    model.fit(max_steps=a.steps, trainer={"progress_bar": False, "logger": None, "accelerator": "cpu"})
    train = time.perf_counter() - t1
    return {"genes": a.genes, "setup_s": round(setup, 2), "step_s": round(train / a.steps, 4),
            "tokens": model.network.tokenizer.num_tokens, "default_budget_s": round(setup + 1500 * train / a.steps, 1)}


STAGES = {"simulate": stage_simulate, "construct": stage_construct, "data": stage_data, "train": stage_train,
          "counterfactual": stage_counterfactual, "evaluate": stage_evaluate, "genes": stage_genes}


def run_stage(name: str, **kw) -> dict:
    """Run one stage in a fresh Python process; its JSON result plus peak RSS."""
    argv = [sys.executable, __file__, "--stage", name]
    for k, v in kw.items():
        argv += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "OMP_NUM_THREADS": str(kw.get("threads", 2)), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {name} failed:\n{proc.stderr[-4000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"[scale] {name} {kw.get('cells', '')} x {kw.get('genes', '')}: {result}", file=sys.stderr, flush=True)
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    p.add_argument("--file", help=argparse.SUPPRESS)
    p.add_argument("--work", type=Path, default=Path("/tmp/celldit_scale"), help="folder for the generated files")
    p.add_argument("--cells", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    p.add_argument("--genes", type=int, default=2000)
    p.add_argument("--perturbations", type=int, default=2000)
    p.add_argument("--combinations", type=int, default=0)
    p.add_argument("--library-size", type=float, default=3000.0, help="median counts per cell (~15%% nonzero at 2,000 genes)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--data-steps", type=int, default=2048, help="batches of the data stage (two buffer renewals)")
    p.add_argument("--cf-cells", type=int, default=1_000_000, help="counterfactual cells written to disk")
    p.add_argument("--cf-at", type=int, default=None,
                   help="the size (cells) whose model writes the --cf-cells counterfactual (default: the smallest; "
                        "the output path's memory does not depend on the training size); run last")
    p.add_argument("--cf-tokenizer", default="latent",
                   help="tokenizer of the counterfactual stage's model (latent: 8 tokens, the fastest on a CPU)")
    p.add_argument("--norman", action="store_true", help="also the Norman-sized evaluate case (110k x 5,000)")
    p.add_argument("--genes-axis", type=int, nargs="*", default=[300, 2000, 8000])
    p.add_argument("--axis-cells", type=int, default=20_000)
    p.add_argument("--axis-steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="small sizes: a check that every stage runs")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.stage:
        import torch

        a.cells = a.cells[0]
        torch.set_num_threads(a.threads)
        result = STAGES[a.stage](a)
        result["peak_rss_mb"] = peak_rss_mb()
        print(json.dumps(result))
        return 0
    if a.quick:
        a.cells, a.perturbations, a.cf_cells, a.steps, a.genes_axis, a.axis_cells = [10_000], 200, 20_000, 30, [300, 2000], 5000
    a.work.mkdir(parents=True, exist_ok=True)
    import torch

    report = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()
                         if k not in ("stage", "file", "out")},
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "python": platform.python_version()},
              "sizes": {}, "genes_axis": []}
    common = {"genes": a.genes, "perturbations": a.perturbations, "steps": a.steps, "workers": a.workers,
              "threads": a.threads, "work": a.work, "library_size": a.library_size}
    def save() -> str:  # after every stage, so that a long run's figures so far are kept
        sizes = sorted(report["sizes"], key=int)
        if len(sizes) > 1:
            first, last = report["sizes"][sizes[0]]["construct"], report["sizes"][sizes[-1]]["construct"]
            report["construct_time_ratio_vs_cells_ratio"] = round(
                (last["wall_s"] / first["wall_s"]) / (int(sizes[-1]) / int(sizes[0])), 3)
        from celldit.bench import emit_report

        return emit_report(report, a.out, echo=False)

    cf_at = a.cf_at if a.cf_at is not None else min(a.cells)
    for n in a.cells:
        f = a.work / f"screen_{n}x{a.genes}.h5ad"
        kw = {**common, "cells": n, "file": f}
        entry = report["sizes"][str(n)] = {"simulate": run_stage("simulate", **kw)}
        for name in ("construct", "data", "train"):
            entry[name] = run_stage(name, **kw)
            save()
        if n != cf_at:
            f.unlink(missing_ok=True)
    if a.norman:
        f = a.work / "norman_110000x5000.h5ad"
        kw = {**common, "cells": 110_000, "genes": 5000, "perturbations": 220, "combinations": 30, "file": f}
        report["norman_evaluate"] = {"simulate": run_stage("simulate", **kw), "evaluate": run_stage("evaluate", **kw)}
        save()
        f.unlink(missing_ok=True)
    for g in a.genes_axis:
        f = a.work / f"axis_{g}.h5ad"
        kw = {**common, "cells": a.axis_cells, "genes": g, "perturbations": 50, "steps": a.axis_steps, "file": f,
              "library_size": a.library_size * g / 2000}
        run_stage("simulate", **kw)
        report["genes_axis"].append(run_stage("genes", **kw))
        save()
        f.unlink(missing_ok=True)
    if cf_at in a.cells and a.cf_cells:
        f = a.work / f"screen_{cf_at}x{a.genes}.h5ad"
        kw = {**common, "cells": cf_at, "file": f, "cf_cells": a.cf_cells, "cf_tokenizer": a.cf_tokenizer}
        report["counterfactual"] = {"model_cells": cf_at, **run_stage("counterfactual", **kw)}
        f.unlink(missing_ok=True)
        (a.work / f"cf_{cf_at}.h5ad").unlink(missing_ok=True)
    print(save())
    return 0


if __name__ == "__main__":
    sys.exit(main())
