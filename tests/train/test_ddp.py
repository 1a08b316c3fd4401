"""Lightning DDP on CPU (gloo): 2 processes x batch 4 == 1 process x batch 8, step for step."""

from __future__ import annotations

import json
import socket

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from celldit import ImageDiT
from celldit.flow import RectifiedFlow
from celldit.train import FlowTrainingPlan, LossHistory
from celldit.train.callbacks import CloseProcessGroup

N, STEPS, GLOBAL_BATCH = 32, 4, 8


class FixedSourceLatents(Dataset):
    """Sample i always has the same data, source noise, time and label, so a step's loss and
    gradient depend only on which indices are in the batch, not on the process that draws them."""

    def __init__(self, n: int = N):
        g = torch.Generator().manual_seed(123)
        self.x1 = torch.randn(n, 2, 4, 4, generator=g)
        self.x0 = torch.randn(n, 2, 4, 4, generator=g)
        self.t = torch.rand(n, generator=g)
        self.y = torch.arange(n) % 3

    def __len__(self) -> int:
        return len(self.x1)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x1": self.x1[i], "x0": self.x0[i], "t": self.t[i], "y": self.y[i]}


class InOrder(L.LightningDataModule):
    """Sample order fixed: rank r of w takes indices r, r + w, ... (no shuffling), so each
    step's union over ranks is the single-process batch. (Lightning's automatic
    DistributedSampler always shuffles training data, hence use_distributed_sampler=False.)"""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        ds, world = FixedSourceLatents(), self.trainer.world_size
        sampler = DistributedSampler(ds, world, self.trainer.global_rank, shuffle=False) if world > 1 else None
        return DataLoader(ds, batch_size=self.batch_size, sampler=sampler, shuffle=False)


def make_plan() -> FlowTrainingPlan:
    torch.manual_seed(0)
    net = ImageDiT(
        input_size=4, patch_size=2, in_channels=2, hidden_size=32, depth=2, num_heads=2,
        class_dropout_prob=0.0, num_classes=3, learn_sigma=False,  # no label dropout: deterministic
    )  # fmt: skip
    # adaLN-Zero starts at exactly zero output; wake it so every step moves every weight
    for p in net.final_layer.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return FlowTrainingPlan(net, RectifiedFlow(), lr=1e-3, warmup_steps=2, ema_decay=0.5)


def train(devices: int, strategy: str, tmp_path, name: str) -> tuple[FlowTrainingPlan, list[float]]:
    plan = make_plan()
    history = LossHistory(tmp_path / f"{name}.json")
    trainer = L.Trainer(
        accelerator="cpu", devices=devices, strategy=strategy, max_steps=STEPS, precision="32-true",
        gradient_clip_val=1.0, callbacks=[history, CloseProcessGroup()], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, use_distributed_sampler=False,
    )  # fmt: skip
    trainer.fit(plan, datamodule=InOrder(GLOBAL_BATCH // devices))
    return plan, json.loads((tmp_path / f"{name}.json").read_text())["losses"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(tmp_path, monkeypatch):
    single, single_losses = train(1, "auto", tmp_path, "single")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", str(free_port()))
    ddp, ddp_losses = train(2, "ddp_spawn", tmp_path, "ddp")

    assert len(single_losses) == len(ddp_losses) == STEPS
    # the mean of the two ranks' losses on their halves is the loss on the global batch
    torch.testing.assert_close(torch.tensor(ddp_losses), torch.tensor(single_losses), rtol=1e-5, atol=1e-6)
    # averaged gradients -> the same AdamW updates -> the same weights and EMA
    # (ddp_spawn hands rank 0's trained weights back to this process)
    ref = make_plan().state_dict()
    moved = 0
    for key, value in single.state_dict().items():
        torch.testing.assert_close(ddp.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)
        moved += not torch.equal(value, ref[key])
    assert moved > len(ref) // 2  # the comparison is not between two untouched models
