"""Real data shipped inside the package (``celldit/data/bundled/``), checked by sha256.

:func:`bundled_papalexi` loads the Papalexi 2021 THP-1 CRISPR knockout screen used by
``celldit demo``; its provenance (study, accession, extraction source, licence note) is in
``celldit/data/bundled/PROVENANCE.md`` and in :data:`PAPALEXI_PROVENANCE`.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from anndata import AnnData

__all__ = ["BUNDLED_DIR", "PAPALEXI_FILE", "PAPALEXI_PROVENANCE", "bundled_papalexi", "bundled_path", "sha256_of"]

#: folder of the bundled data files (package data ``data/bundled/*``)
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
PAPALEXI_FILE = "papalexi2021_thp1_crispr_ko.h5ad"

#: what :func:`bundled_papalexi` returns beside the data (mirrors PROVENANCE.md)
PAPALEXI_PROVENANCE: dict[str, Any] = {
    "file": PAPALEXI_FILE,
    "study": "Papalexi et al. 2021, Characterizing the molecular regulation of inhibitory immune "
             "checkpoints with multimodal single-cell screens, Nature Genetics 53:322-331",
    "assay": "ECCITE-seq, THP-1 cells stimulated with IFN-gamma, pooled CRISPR knockout",
    "accession": "GEO GSE153056",
    "source": "sceptre R package data (Katsevich-Lab/sceptre data/lowmoi_example_data.rda "
              "@823bcdae9df321db501a59aa6b7acc1975052b9f), gene-downsampled subset",
    "licence": "public study data (GEO); extract taken from the sceptre package (GPL-3); see PROVENANCE.md",
    "sha256": "59484b062f01821dfb39361a03dd307894033b1465454e7a241662ebc15384be",
    "n_obs": 20729,
    "n_vars": 299,
    "X": "raw integer UMI counts (float32 CSR)",
    "obs": ["bio_rep", "top_grna", "top_grna_umi", "total_grna_umi", "perturbation"],
    "perturbation_key": "perturbation",
    "control": "control",
}


def sha256_of(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def bundled_path(name: str = PAPALEXI_FILE) -> Path:
    """Path of a bundled data file; ``FileNotFoundError`` when the install lacks it."""
    path = BUNDLED_DIR / name
    if not path.is_file():
        raise FileNotFoundError(f"bundled data file {str(path)!r} is missing: reinstall celldit "
                                "(the package data 'data/bundled/*' was not installed)")
    return path


def bundled_papalexi(verify: bool = True) -> tuple[AnnData, dict[str, Any]]:
    """The bundled Papalexi 2021 THP-1 CRISPR knockout screen and its provenance.

    Parameters
    ----------
    verify
        Check the file's sha256 against :data:`PAPALEXI_PROVENANCE` before reading it.

    Returns
    -------
    adata
        20,729 cells x 299 genes, raw counts in ``X``; ``obs['perturbation']`` (25 targets
        and ``control``) and ``obs['bio_rep']`` (``rep_1``, ``rep_2``, ``rep_3``).
    provenance
        A copy of :data:`PAPALEXI_PROVENANCE` with the file's ``path``.

    Raises
    ------
    FileNotFoundError
        If the file is not installed.
    ValueError
        If ``verify`` and the sha256 differs (a corrupted or replaced file).
    """
    import anndata as ad

    path = bundled_path(PAPALEXI_FILE)
    expected = PAPALEXI_PROVENANCE["sha256"]
    if verify:
        found = sha256_of(path)
        if found != expected:
            raise ValueError(f"bundled data {str(path)!r} has sha256 {found}, expected {expected}: "
                             "the file is corrupted or was replaced; reinstall celldit")
    return ad.read_h5ad(path), {**PAPALEXI_PROVENANCE, "path": str(path)}
