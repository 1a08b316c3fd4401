"""``celldit image train``: the original DiT's train.py, with rectified flow, through Lightning.

Example::

    celldit image train --latents latents.npz --preset DiT-S/2 --max-steps 400000 --out runs/dit_s2 \\
        --trainer.precision bf16-mixed --trainer.devices 8 --trainer.strategy ddp
    celldit image train --config configs/image_digits.yaml --latents digits.npz --out runs/digits
    celldit image train --latents latents.npz --print-config          # every setting, as YAML

The options follow the same schema as ``celldit fit``: the model's constructor arguments
(:class:`~celldit.models.image.ImageDiT`; null ones come from ``--preset``, then from the
latents and the constructor's defaults), the training settings of
:class:`~celldit.train.config.FitConfig`, and the nested ``flow`` and ``trainer`` sections.
Resumable ``.ckpt`` files go to ``OUT/checkpoints`` and logs to ``OUT/logs``; the EMA weights
are exported to ``OUT/model`` (``model.safetensors`` + ``config.json``), and the settings to
``OUT/train_config.yaml`` (which ``--config`` accepts back).
"""

from __future__ import annotations

import dataclasses
import inspect
import shutil
from pathlib import Path

from jsonargparse.typing import NonNegativeInt, PositiveInt

__all__ = ["MODEL_KIND", "build_parser", "run"]

MODEL_KIND = "celldit.ImageDiT"
PROG = "celldit image train"
#: ImageDiT arguments taken from the latents when not given
FROM_DATA = ("input_size", "in_channels", "num_classes")


def build_parser():
    """The ``celldit image train`` parser, generated from ImageDiT, FitConfig and RectifiedFlow."""
    from ..flow import RectifiedFlow
    from ..models import DIT_PRESETS, ImageDiT
    from ..train.config import FitConfig
    from .config_args import add_dataclass_options, add_signature_options, config_parser

    parser = config_parser(PROG, "Train a class-conditional ImageDiT with rectified flow on precomputed latents.")
    run = parser.add_argument_group("run")
    run.add_argument("--latents", type=str | None, default=None,
                     help="latents file: .npz/.safetensors (latents, labels) or .npy")
    run.add_argument("--labels", type=str | None, default=None, help="labels .npy when --latents is a .npy")
    run.add_argument("--out", type=str | None, default=None, help="output folder (must not exist unless --resume)")
    run.add_argument("--resume", type=str | None, default=None, help="a .ckpt to resume from (OUT/checkpoints/last.ckpt)")
    run.add_argument("--threads", type=PositiveInt | None, default=None, help="torch CPU threads (null: unchanged)")
    run.add_argument("--num-workers", dest="num_workers", type=NonNegativeInt, default=0, help="DataLoader workers")
    run.add_argument("--preset", type=str | None, default=None,
                     help=f"a DiT preset ({', '.join(DIT_PRESETS)}): sets depth, hidden_size, num_heads, patch_size")
    defaults = {name: None for name in inspect.signature(ImageDiT.__init__).parameters if name != "self"}
    add_signature_options(parser, ImageDiT.__init__, title="model (ImageDiT; null: preset, latents or default)",
                          defaults=defaults)
    add_dataclass_options(parser, FitConfig, title="training (FitConfig)")
    add_dataclass_options(parser, RectifiedFlow, prefix="flow.", title="flow (RectifiedFlow)")
    return parser


def model_arguments(cfg, latent_shape: tuple[int, ...], num_classes: int) -> dict:
    """ImageDiT arguments: given ones, else the preset's, else the latents', else the defaults."""
    from ..models import DIT_PRESETS, ImageDiT

    signature = inspect.signature(ImageDiT.__init__)
    preset = {}
    if cfg.preset is not None:
        if cfg.preset not in DIT_PRESETS:
            raise ValueError(f"unknown --preset {cfg.preset!r}; choose one of {list(DIT_PRESETS)}")
        preset = DIT_PRESETS[cfg.preset]
    from_data = {"input_size": latent_shape[1], "in_channels": latent_shape[0], "num_classes": num_classes,
                 "learn_sigma": False}
    out = {}
    for name, param in signature.parameters.items():
        if name == "self":
            continue
        value = getattr(cfg, name, None)
        if value is None:
            value = preset.get(name, from_data.get(name, param.default))
        out[name] = value
    return out


def run(cfg, parser) -> int:
    import torch

    from ..data.images import LatentDataModule, LatentDataset, expected_latent_shape
    from ..flow import RectifiedFlow
    from ..io import save_model_folder
    from ..models import ImageDiT
    from ..train import FitConfig, FlowTrainingPlan, fit
    from ..train.callbacks import LossHistory
    from ..train.trainer import set_threads, show_progress_bar
    from .config_args import section

    if not cfg.latents or not cfg.out:
        raise ValueError("missing --latents or --out (give them as flags or in --config)")
    out = Path(cfg.out)
    if out.exists() and not cfg.resume:
        raise FileExistsError(f"--out {out} already exists: choose a new folder, or pass --resume CKPT")
    fit_config = FitConfig(**section(cfg, [f.name for f in dataclasses.fields(FitConfig)]))
    flow = RectifiedFlow(**cfg.flow.as_dict())
    set_threads(cfg.threads)
    dataset = LatentDataset.from_file(cfg.latents, cfg.labels)
    latent_shape = tuple(dataset.latents.shape[1:])
    num_classes = int(dataset.labels.max()) + 1
    arguments = model_arguments(cfg, latent_shape, num_classes)
    if fit_config.seed is not None:
        torch.manual_seed(fit_config.seed)  # the initial weights too: same seed, same run
    network = ImageDiT(**arguments)
    expected = expected_latent_shape(network)
    if latent_shape != expected:
        raise ValueError(f"latents in {cfg.latents} have shape {latent_shape}, the model expects {expected}")
    if num_classes > network.config["num_classes"]:
        raise ValueError(f"labels reach {num_classes - 1} but the model has num_classes={network.config['num_classes']}")
    datamodule = LatentDataModule(dataset, batch_size=fit_config.batch_size, num_workers=cfg.num_workers)
    plan = FlowTrainingPlan(network, flow, lr=fit_config.lr, weight_decay=fit_config.weight_decay,
                            betas=fit_config.betas, warmup_steps=fit_config.warmup_steps,
                            lr_schedule=fit_config.lr_schedule, min_lr_ratio=fit_config.min_lr_ratio,
                            ema_decay=fit_config.ema_decay)
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        (out / "train_config.yaml").write_text(parser.dump(cfg, skip_none=False))
        history = LossHistory(print_every=None if show_progress_bar(fit_config.trainer)
                              else fit_config.trainer.log_every_n_steps)
        fit(plan, datamodule, fit_config.trainer, max_steps=fit_config.max_steps, run_dir=out, seed=fit_config.seed,
            ckpt_path=cfg.resume, callbacks=[history])
    except BaseException:
        if created:  # a failed first run leaves nothing that blocks a rerun
            shutil.rmtree(out, ignore_errors=True)
        raise
    export = {"format_version": 1, "kind": MODEL_KIND, "model": network.config, "flow": dataclasses.asdict(flow)}
    save_model_folder(out / "model", plan.sampling_network().state_dict(), export, overwrite=True)
    print(f"exported EMA weights to {out / 'model'}")
    return 0
