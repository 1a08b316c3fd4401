"""Each peer's settings: its CPU budget, the small grid ``--tune`` chooses from on the validation
split, and the rule of that choice (used by ``benchmarks/peers.py``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

RANKED = {"pearson_delta_de20": -1, "pearson_delta_all": -1, "mse_de20": 1, "edistance": 1}  # sign: lower rank wins
# Each peer's grid: the first entry is its documented starting point; the others vary what the
# peer's own documentation names as its regularisers (CellFlow: path noise, dropout) or its
# other documented configuration (CPA: the Norman tutorial's).
GRIDS = {
    "cellflow": {
        "defaults": {},
        "noise0.5_drop0.1": {"noise": 0.5, "hidden_dropout": 0.1, "decoder_dropout": 0.1},
        "noise1_drop0.1": {"noise": 1.0, "hidden_dropout": 0.1, "decoder_dropout": 0.1},
    },
    "cpa": {"kang_tutorial": {"preset": "kang_tutorial"}, "norman_tutorial": {"preset": "norman_tutorial"}},
}
# The sizes every run uses (CPU budget); grid entries and --settings JSON are laid over them.
BUDGET = {
    "cellflow": {"iterations": 12000, "batch_size": 256, "hidden_dims": [512, 512, 512],
                 "decoder_dims": [1024, 1024, 1024], "time_encoder_dims": [512, 512, 512],
                 "condition_embedding_dim": 64, "time_freqs": 128, "lr": 1e-4, "multi_steps": 1, "ode_steps": 10},
    "cpa": {"max_epochs": 200},
}


def choose(scores: dict[str, dict]) -> tuple[str, dict]:
    """The grid entry with the best mean rank over :data:`RANKED` (a missing value ranks last;
    ties: first listed)."""
    names = list(scores)
    ranks = {n: 0.0 for n in names}
    for metric, sign in RANKED.items():
        values = {n: (np.inf if scores[n].get(metric) is None else sign * scores[n][metric]) for n in names}
        order = pd.Series(values).rank(method="average")
        for n in names:
            ranks[n] += order[n] / len(RANKED)
    best = min(names, key=lambda n: ranks[n])
    return best, {n: round(float(r), 3) for n, r in ranks.items()}


def base_settings(peer: str, args: argparse.Namespace) -> tuple[dict, str]:
    """The settings before tuning: budget, then ``--settings-from``'s (else the grid's first
    entry), then ``--settings PEER=JSON``; with how they were chosen."""
    settings = dict(BUDGET[peer])
    how = f"grid entry {next(iter(GRIDS[peer]))!r} (documented defaults)"
    if args.settings_from is not None:
        earlier = json.loads(Path(args.settings_from).read_text())
        found = [v["peers"][peer]["settings"] for v in earlier.values()
                 if isinstance(v, dict) and v.get("peers", {}).get(peer, {}).get("settings")]
        if found:
            settings.update(found[0])
            how = f"settings of {args.settings_from}"
        else:
            settings.update(next(iter(GRIDS[peer].values())))
    else:
        settings.update(next(iter(GRIDS[peer].values())))
    if peer in args.settings:
        settings.update(args.settings[peer])
        how += f" + --settings {json.dumps(args.settings[peer])}"
    return settings, how
