"""Batches across DataLoader workers and DDP ranks, and training batches read from disk in chunks."""

from __future__ import annotations

import json
import socket
import warnings

import anndata as ad
import lightning as L
import numpy as np
import pytest
import torch
from conftest import ArrayRows, make_adata
from torch.utils.data import DataLoader

from celldit.cells import CellDiT
from celldit.cells.dataset import PairedBatches
from celldit.cells.vocab import PAD
from celldit.data.rows import ExpressionRows

PERT_IDX = np.array([[PAD], [0], [1]])
PERT_SCALE = (PERT_IDX >= 0).astype(np.float32)


def ids_data(n_per=60):
    cond = np.repeat([0, 1, 2], n_per)
    x = np.zeros((len(cond), 3), np.float32)
    x[:, 0] = np.arange(len(cond))  # each cell's id
    return ArrayRows(x), cond, np.zeros(len(cond), np.int64)


def batches(rows, cond, group, **kw):
    args = {"batch_size": 32, "block_size": 8, "ot": False, "steps": 12, "seed": 3, **kw}
    return PairedBatches(rows, cond, group, np.arange(len(cond)), 0, PERT_IDX, PERT_SCALE, group[:, None], **args)


def ids(stream):
    return [b["x1"][:, 0].numpy().astype(int).tolist() for b in stream]


def test_workers_build_the_same_batches_and_ranks_distinct_ones():
    rows, cond, group = ids_data()
    alone = ids(batches(rows, cond, group))
    two = ids(DataLoader(batches(rows, cond, group), batch_size=None, num_workers=2))
    assert two == alone  # batch i comes from stream (seed, epoch, rank, i) whoever builds it
    other = batches(rows, cond, group)
    other.rank = 1
    assert all(a != b for a, b in zip(ids(other), alone))
    resumed = batches(rows, cond, group)
    resumed.start_step = 5
    assert ids(resumed) == alone[5:]  # resuming skips the trained batches without replaying draws


def test_the_training_loader_hands_over_each_batch_in_one_shared_block():
    """Worker batches equal in-process ones on every key (values, dtypes, shapes); each arrives
    as contiguous views of one shared block; the main process's sharing strategy is untouched."""
    import torch

    from celldit.cells.dataset import batch_loader

    rows, cond, group = ids_data()
    before = torch.multiprocessing.get_sharing_strategy()
    alone = list(batches(rows, cond, group, ot=True))
    two = list(batch_loader(batches(rows, cond, group, ot=True), num_workers=2))
    assert torch.multiprocessing.get_sharing_strategy() == before
    assert len(two) == len(alone)
    for a, b in zip(alone, two):
        assert a.keys() == b.keys()
        for k in a:
            assert a[k].dtype == b[k].dtype and b[k].is_contiguous()
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=0)
        assert len({v.untyped_storage().data_ptr() for v in b.values()}) == 1  # one block
        assert all(v.is_shared() for v in b.values())


def test_backed_training_reads_a_buffer_of_contiguous_chunks(tmp_path):
    adata = make_adata({"control": 300, "P": 300}, 8, effects={"P": {0: 1.0}}, seed=2)
    adata = adata[np.random.default_rng(0).permutation(adata.n_obs)].copy()  # labels interleaved on disk
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    rows = ExpressionRows(backed, input_space="counts")
    memory = ExpressionRows(adata, input_space="counts")
    cond = (adata.obs["perturbation"] == "P").to_numpy().astype(np.int64)
    group = np.zeros(adata.n_obs, np.int64)
    data = batches(rows, cond, group, buffer_cells=128, chunk_rows=32, steps=20, batch_size=16, block_size=8)
    assert data.buffer_steps == 32
    seen = set()
    for b in data:
        seen.add(data._buffer_id)
        buffered = set(data.expr._cache_index.tolist())
        x1 = b["x1"].numpy()
        hits = [np.flatnonzero(np.all(memory.all_rows() == row, axis=1)) for row in x1]
        assert all(len(h) and set(h.tolist()) & buffered for h in hits)  # every cell comes from the buffer
    assert seen == {0}
    chunks = np.split(data.expr._cache_index, np.flatnonzero(np.diff(data.expr._cache_index) != 1) + 1)
    assert all(len(c) % 32 == 0 or c[-1] == adata.n_obs - 1 for c in chunks)  # whole chunks of rows
    # a view of a backed file (held-out rows removed) reads the right rows
    view = backed[np.arange(0, adata.n_obs, 3)]
    np.testing.assert_allclose(ExpressionRows(view, input_space="counts").all_rows(),
                               memory.all_rows(np.arange(0, adata.n_obs, 3)), rtol=0, atol=1e-6)
    backed.file.close()


def test_workers_read_distinct_disk_buffers_and_build_the_same_batches(tmp_path, monkeypatch):
    """From a disk buffer each worker takes whole runs of one buffer's batches (buffers
    b = w mod W): no two workers read the same buffer, and the batches are those built alone."""
    from types import SimpleNamespace

    import celldit.cells.dataset as dataset

    adata = make_adata({"control": 300, "P": 300}, 8, effects={"P": {0: 1.0}}, seed=2)
    adata.write_h5ad(tmp_path / "cells.h5ad")
    backed = ad.read_h5ad(tmp_path / "cells.h5ad", backed="r")
    cond = (adata.obs["perturbation"] == "P").to_numpy().astype(np.int64)
    group = np.zeros(adata.n_obs, np.int64)

    def make():
        data = batches(ExpressionRows(backed, input_space="counts"), cond, group, buffer_cells=128, chunk_rows=32,
                       steps=20, batch_size=64, block_size=8)
        assert data.buffer_steps == 8  # buffers 0, 1, 2 hold batches 0-7, 8-15, 16-19
        return data

    alone = [b["x1"].numpy() for b in make()]
    per_worker = {}
    for w in (0, 1):
        monkeypatch.setattr(dataset, "get_worker_info", lambda w=w: SimpleNamespace(id=w, num_workers=2))
        data, loads = make(), []

        def use(i, worker, data=data, loads=loads, load=data._use_buffer):
            load(i, worker)
            loads.append(data._buffer_id)

        monkeypatch.setattr(data, "_use_buffer", use)
        per_worker[w] = ([b["x1"].numpy() for b in data], sorted(set(loads)))
    assert per_worker[0][1] == [0, 2] and per_worker[1][1] == [1]
    for got, want in ((per_worker[0][0], alone[:8] + alone[16:]), (per_worker[1][0], alone[8:16])):
        assert len(got) == len(want) and all(np.array_equal(a, b) for a, b in zip(got, want))
    backed.file.close()


class RecordCells(L.Callback):
    def __init__(self, folder):
        self.folder = folder

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        path = self.folder / f"rank{trainer.global_rank}.jsonl"
        with path.open("a") as f:
            f.write(json.dumps(batch["x1"][:, -1].tolist()) + "\n")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_ddp_ranks_see_different_cells_and_learn_the_planted_shift(tmp_path, monkeypatch):
    """Two gloo processes (ddp_spawn on CPU): each rank draws its own batches, and the
    averaged gradients still learn the planted shift of the untrained-from-zero flow."""
    adata = make_adata({"control": 200, "P": 200}, 6, space="log", level=2.0, spread=0.2, sparse=False,
                       effects={"P": {0: 1.5, 1: -1.0}}, seed=4)
    adata.X[:, -1] = np.arange(adata.n_obs) / 100  # each cell's id, in a gene left alone
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    from celldit.train import trainer as trainer_module

    build = trainer_module.build_trainer
    monkeypatch.setattr(trainer_module, "build_trainer",
                        lambda *a, callbacks=(), **k: build(*a, callbacks=[*callbacks, RecordCells(tmp_path)], **k))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = CellDiT(adata, anchor=False, hidden_size=32, depth=1, num_heads=2, perturbation_features=None)
        model.fit(max_steps=150, batch_size=64, lr=3e-3, warmup_steps=10, ema_decay=None,
                  trainer={"accelerator": "cpu", "devices": 2, "strategy": "ddp_spawn", "progress_bar": False,
                           "logger": None})
    seen = [[c for line in (tmp_path / f"rank{r}.jsonl").read_text().splitlines() for c in json.loads(line)]
            for r in (0, 1)]
    first = [set(np.round(np.array(s[:64]) * 100).astype(int)) for s in seen]
    assert len(seen[0]) == len(seen[1]) == 150 * 64
    assert len(first[0] & first[1]) < 32  # the ranks' first batches are different cells
    ctrl = adata[adata.obs["perturbation"] == "control"]
    shift = model.counterfactual(ctrl, "P").X.mean(0) - ctrl.X.mean(0)
    assert abs(shift[0] - 1.5) < 0.3 and abs(shift[1] + 1.0) < 0.3, shift
    assert model.history["steps"] == 150 and np.isfinite(model.history["final_loss"])  # rank 0's curve
    torch.set_num_threads(1)
