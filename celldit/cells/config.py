"""Every setting of a CellDiT, in one place.

:class:`CellDiTConfig` is what defines a model (registration of the AnnData, gene set,
tokenizer, coupling, network size, flow and sampler settings); it is saved as
``config.json`` in the model folder. :class:`CellFitConfig` is how it is trained (the
arguments of :meth:`CellDiT.fit <celldit.cells.model.CellDiT.fit>`, with a nested
``trainer`` section). Both are the one source of their defaults: the Python API
(``CellDiT(adata, hidden_size=128)``), ``celldit fit --help``, ``--print-config`` and
``config.json`` are generated from these classes, so a new setting is one field here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..flow import RectifiedFlow
from ..flow.sampling import SOLVERS
from ..options import check_options, from_mapping, option
from ..train.config import FitConfig, TrainerConfig

__all__ = ["CellDiTConfig", "CellFitConfig", "SamplerConfig", "TOKENIZER_NAMES", "SOURCES"]

TOKENIZER_NAMES = ("gene", "module", "latent")
SOURCES = ("control", "noise")
#: solver used when none is asked, by coupling: a control source moves cells a short way
#: (Euler 10 scores as Euler 20 on papalexi_rep3 in half the time), and a noise source's
#: Heun 20 scores as Heun 50 in a third of the time (benchmarks/solver_steps.py)
DEFAULT_SOLVER = {"control": ("euler", 10), "noise": ("heun", 20)}


def _as_list(value: Any) -> list[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else [str(v) for v in value]


@dataclass
class SamplerConfig:
    """How cells are sampled unless a call asks otherwise (the ``sampler`` section).

    Attributes
    ----------
    method
        ODE solver: euler, midpoint, heun, rk4, or adaptive (dopri5 ...); null: euler for a
        control source, heun for a noise source.
    steps
        Solver steps; null: 10 for a control source, 20 for a noise source.
    cfg_scale
        Classifier-free guidance scale (1: none).
    batch_size
        Cells integrated at once.
    """

    method: str | None = option(None, choices=SOLVERS)
    steps: int | None = option(None, ge=1)
    cfg_scale: float = 1.0
    batch_size: int = option(2048, ge=1)

    def __post_init__(self) -> None:
        check_options(self)

    def solver(self, source: str) -> tuple[str, int]:
        """The (method, steps) to use for a model with this ``source``."""
        method, steps = DEFAULT_SOLVER[source]
        return self.method or method, self.steps or steps


@dataclass
class CellDiTConfig:
    """The settings that define a CellDiT.

    Attributes
    ----------
    perturbation_key
        obs column holding each cell's perturbation label.
    control
        Control label(s) in that column (one or a list).
    covariate_keys
        obs columns given to the model as context (cell type, donor ...); pairs share them.
    delimiter
        Separator of combined perturbations in a label (GEARS: A+B, A+ctrl).
    dose_key
        Optional obs column with each cell's dose.
    pair_keys
        obs columns that control/target pairs must share (a replicate, a batch); not model
        inputs. With center, cells are modelled relative to their batch's control mean.
    genes
        Gene set: "all", "hvg" (n_top_genes highly variable genes), "var:COLUMN" (genes whose
        boolean var column is true), or a list of gene names.
    n_top_genes
        Number of highly variable genes with genes="hvg".
    layer
        Where the expression values are read: a layer name, "X", "raw" (adata.raw.X), or
        null: layers['counts'] when present, else X.
    input_space
        What those values are: "counts", "log1p" (log1p(normalize_total(counts, 1e4))), or
        "auto": counts when every value is a whole number, else log1p (checked over the whole
        matrix; values impossible in either space are refused).
    size_factor_key
        obs column of each cell's library size (e.g. n_counts), used to normalise counts
        instead of the total over the training genes; inputs restricted to the model's genes
        then normalise exactly as in training.
    tokenizer
        "gene" (a token per gene), "module" (a token per gene module) or "latent" (a PCA
        codec's latent split into tokens).
    source
        "control": the flow transports control cells (pairs within covariates and pair_keys);
        "noise": the flow generates from Gaussian noise and a counterfactual inverts the
        control cell to noise first.
    anchor
        Control source: start each flow at control cell + the condition's mean shift, so that
        the untrained network predicts the mean shift and training learns the rest.
    anchor_shrinkage
        Shrink each anchor toward no change by its standard error (see
        :mod:`celldit.cells.shrinkage`): "hybrid" (default; a per-condition gate on the
        evidence of an effect, with per-gene empirical Bayes where the gate is closed),
        "gate", "eb", or null (the plain mean shift). Perturbations whose measured shift is
        indistinguishable from noise then start near their controls instead of at their noise.
    gate_velocity
        Control source, with a gated ``anchor_shrinkage``: at sampling, the network's velocity
        for a condition is scaled by its gate (1 for clear conditions, ``shrinkage_floor`` for
        noise-level ones), so that the flow reshapes only conditions with evidence of an
        effect instead of adding its fit of their training noise.
    batch_anchors
        Control source, with ``pair_keys`` and no covariates: each batch (e.g. a replicate) keeps its own shift
        of each condition. A training block starts from its batch's shift, and new cells from
        the batches' shifts weighted by how alike each batch's mean control cell is to theirs
        (the kernel of :class:`~celldit.cells.anchors.ConditionTable`). Replicates of a screen
        differ in state, and so do their perturbations' effects; a new replicate borrows most
        from the replicates it resembles. False: one anchor per condition for every batch.
    escapers
        With ``anchor``: model the cells a knockout missed. Where a condition's training cells
        are spread along its shift more than the controls, genes together (not each gene's
        count noise), beyond chance (and, with gated
        shrinkage, its effect is clear), a share ``p`` of source cells keeps the control state
        (anchor 0) and the rest get the anchor over ``1 - p``: a split population with the same
        mean (see :mod:`celldit.cells.escapers`; ``CellDiT.effects()`` lists each ``p``).
    shrinkage_gate, shrinkage_floor
        The chi-square per gene (``mean d^2 / se^2``) at which the gate opens fully, and the
        least factor a closed gate keeps.
    ot
        Re-pair sources and targets within a block by exact minibatch optimal transport.
    ot_dims
        Leading principal components in which the OT cost is measured (null: all genes).
    center
        Model each cell relative to the control mean of its batch (its pair_keys values; without
        pair_keys and covariates, the whole data set) and centre new control cells on their own
        mean at prediction time.
    on_target
        The on-target prior, for perturbations named after a measured gene (a knockout,
        CRISPRi or CRISPRa): the target is known to move, so a trained one keeps its target's
        measured shift when ``anchor_shrinkage`` shrinks the rest, and one never trained gets
        its target's change as its level in the cells being carried times the median
        relative change of the trained ones' own targets (see :mod:`celldit.cells.on_target`;
        needs three of them). Labels that are not gene names (drugs) are left as they are.
    perturbation_features
        Prior features of perturbations, which let the model embed unseen ones: "expression"
        (a measured target gene's profile across control cells, by PCA), a table
        (.csv/.tsv/.parquet, first column the name; or a DataFrame in Python), or null.
    modules
        Module tokenizer's gene modules: "var:COLUMN" (a var column of labels), a .gmt file
        of gene sets (MSigDB), a mapping of set name to genes (Python), or null to cluster
        genes by co-expression.
    n_modules
        Number of clustered modules (null: ceil(G / 16), at most 64, so that the token count
        and the backbone's cost stay bounded as genes grow).
    gene_latent_tokens
        Gene tokenizer: genes are read into this many latent tokens by cross-attention
        (Perceiver IO), which the backbone works on; "auto": max(32, sqrt(G)); null: one
        backbone token per gene (O(G^2) attention).
    latent_dim
        Latent tokenizer: width of the PCA codec.
    token_dim
        Latent tokenizer: latent values per token.
    hidden_size
        Transformer width.
    depth
        Transformer blocks.
    num_heads
        Attention heads.
    mlp_ratio
        MLP width as a multiple of hidden_size.
    cfg_dropout
        Probability of replacing a training cell's perturbation tokens by the null token (the
        unconditional branch of classifier-free guidance; also a regulariser).
    covariate_dropout
        Probability of hiding a training block's covariates behind an "unknown" token; a
        perturbation asked in a covariate group never trained with it is predicted that way.
    group_bandwidth
        Kernel bandwidth of the group-weighted anchor of a covariate group never trained with a
        condition: "median" (the median squared distance between the training groups' mean
        control cells) or "leave_one_group_out" (that times the factor, 1/8 to 4 or infinite,
        that best predicts each training group's shifts from the other groups'; needs a
        condition trained in three groups or more, else the median).
    flow
        Rectified-flow settings (see celldit.flow.RectifiedFlow).
    sampler
        Default sampler settings (see SamplerConfig).
    seed
        Seed of module clustering, codec fitting and weight initialisation.
    """

    # registration of the AnnData
    perturbation_key: str = "perturbation"
    control: str | list[str] = "control"
    covariate_keys: str | list[str] = option(default_factory=list)
    delimiter: str = "+"
    dose_key: str | None = None
    pair_keys: str | list[str] = option(default_factory=list)
    # genes
    genes: str | list[str] = "all"
    n_top_genes: int = option(2000, ge=1)
    layer: str | None = None
    input_space: str = option("auto", choices=("auto", "counts", "log1p"))
    size_factor_key: str | None = None
    # model
    tokenizer: str = option("module", choices=TOKENIZER_NAMES)
    source: str = option("control", choices=SOURCES)
    anchor: bool = True
    anchor_shrinkage: str | None = option("hybrid", choices=(None, "hybrid", "gate", "eb"))
    shrinkage_gate: float = option(2.0, gt=1)
    shrinkage_floor: float = option(0.1, ge=0, le=1)
    gate_velocity: bool = True
    batch_anchors: bool = True
    escapers: bool = True
    ot: bool = True
    ot_dims: int | None = option(32, ge=1)
    center: bool = True
    on_target: bool = True
    perturbation_features: Any = "expression"
    modules: str | dict[str, list[str]] | None = None
    n_modules: int | None = option(None, ge=1)
    gene_latent_tokens: int | str | None = "auto"
    latent_dim: int = option(32, ge=1)
    token_dim: int = option(4, ge=1)
    hidden_size: int = option(64, ge=1, le=65536)
    depth: int = option(2, ge=1, le=1024)
    num_heads: int = option(4, ge=1)
    mlp_ratio: float = option(4.0, gt=0, le=64)
    cfg_dropout: float = option(0.2, ge=0, lt=1)
    covariate_dropout: float = option(0.2, ge=0, lt=1)
    group_bandwidth: str = option("median", choices=("median", "leave_one_group_out"))
    flow: RectifiedFlow = option(default_factory=RectifiedFlow)
    sampler: SamplerConfig = option(default_factory=SamplerConfig)
    seed: int = option(0, ge=0, le=2**32 - 1)

    def __post_init__(self) -> None:
        self.control = _as_list(self.control)
        self.covariate_keys = _as_list(self.covariate_keys)
        self.pair_keys = _as_list(self.pair_keys)
        if not isinstance(self.genes, str):
            self.genes = [str(g) for g in self.genes]
        self.flow = from_mapping(RectifiedFlow, self.flow, "flow")
        self.sampler = from_mapping(SamplerConfig, self.sampler, "sampler")
        check_options(self)
        if not self.control:
            raise ValueError("CellDiTConfig: control needs at least one control label")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"CellDiTConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_heads={self.num_heads}")
        if isinstance(self.gene_latent_tokens, str) and self.gene_latent_tokens != "auto":
            raise ValueError(f"CellDiTConfig: gene_latent_tokens={self.gene_latent_tokens!r}: use 'auto', a number or None")
        if isinstance(self.gene_latent_tokens, int) and self.gene_latent_tokens < 1:
            raise ValueError(f"CellDiTConfig: gene_latent_tokens={self.gene_latent_tokens}: must be >= 1")
        if isinstance(self.genes, str) and self.genes not in ("all", "hvg") and not self.genes.startswith("var:"):
            raise ValueError(f"CellDiTConfig: genes={self.genes!r}: use 'all', 'hvg', 'var:COLUMN' or a list of genes")

    @property
    def centred(self) -> bool:
        """Whether cells are modelled relative to their batch's control mean: with
        ``pair_keys`` (batches = their values), or, without covariates, the whole data as one
        batch (new cells are then centred on their own controls, a new batch's offset removed)."""
        return self.center and (bool(self.pair_keys) or not self.covariate_keys)

    @property
    def batch_anchored(self) -> bool:
        """Whether anchors are per batch of ``pair_keys`` (see ``batch_anchors``; control source)."""
        return (self.anchor and self.batch_anchors and bool(self.pair_keys) and not self.covariate_keys
                and self.source == "control")

    def replace(self, **changes: Any) -> CellDiTConfig:
        """A copy with some fields changed (checked like a new one)."""
        return dataclasses.replace(self, **changes)


@dataclass
class CellFitConfig(FitConfig):
    """How a CellDiT is trained (the arguments of ``CellDiT.fit``); the fields it shares with
    :class:`~celldit.train.config.FitConfig` are documented there.

    Attributes
    ----------
    batch_size
        Cells per step (per process).
    block_size
        Cells per single-condition block of a batch (the unit of OT pairing).
    seed
        Seed of the batch draws and the training noise (null: the model's seed).
    validation_fraction
        Fraction of the perturbed cells of each condition (and of the controls) kept out of
        training to score the model as it trains (0: no validation).
    validation_every_n_steps
        Period, in steps, of the validation score.
    early_stopping_patience
        Stop when the validation score has not improved for this many validations (null: never).
    num_workers
        DataLoader worker processes building batches (each draws distinct batches; the same
        batches as with none).
    buffer_cells
        Data read from disk (backed): batches are drawn from a buffer of this many cells, read
        as contiguous chunks and renewed every 4 * buffer_cells / batch_size steps (null: read
        the drawn rows directly). In-memory data ignore it.
    """

    max_steps: int = option(1500, ge=1)
    batch_size: int = option(256, ge=1)
    block_size: int = option(64, ge=1)
    lr: float = option(3e-4, gt=0, le=10.0)
    warmup_steps: int = option(100, ge=0)
    lr_schedule: str = option("cosine", choices=("constant", "cosine"))
    ema_decay: float | None = option(0.999, ge=0, lt=1)
    seed: int | None = option(None, ge=0, le=2**32 - 1)
    validation_fraction: float = option(0.0, ge=0, lt=1)
    validation_every_n_steps: int = option(100, ge=1)
    early_stopping_patience: int | None = option(None, ge=1)
    num_workers: int = option(0, ge=0)
    buffer_cells: int | None = option(65_536, ge=1)
    trainer: TrainerConfig = option(default_factory=TrainerConfig)
