"""The synthetic Perturb-seq generator: what it plants is what the data show, on disk as in memory."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from celldit.cli import main
from celldit.data.expression import log_normalize
from celldit.data.synthetic import simulate, simulate_h5ad


def test_planted_effects_penetrance_and_structure_are_in_the_data(synthetic_screen):
    adata, truth = synthetic_screen
    obs = adata.obs
    assert adata.shape == (2400, 60) and set(obs["cell_type"]) == {"type0", "type1"}
    assert sum("+" in lab for lab in obs["perturbation"].unique()) == 2
    x = adata.X.toarray()
    assert np.array_equal(x, np.round(x)) and np.allclose(obs["n_counts"], x.sum(1))
    # penetrance: the fraction of each perturbation's cells that were edited
    for p, name in enumerate(truth.perturbations):
        cells = obs["perturbation"] == name
        if cells.sum() > 100:
            assert abs(obs.loc[cells, "edited"].mean() - truth.penetrance[p]) < 0.12
    # the planted log-rate effects show in the log-normalised means of the edited cells
    norm = log_normalize(adata).X.toarray()
    ctrl = (obs["perturbation"] == "control") & (obs["cell_type"] == "type0")
    for name in truth.perturbations:
        edited = (obs["perturbation"] == name) & obs["edited"] & (obs["cell_type"] == "type0")
        if edited.sum() < 40:
            continue
        effect = truth.effect_of(name)
        strong = np.argsort(-np.abs(effect))[:5]
        delta = norm[edited.to_numpy()].mean(0) - norm[ctrl.to_numpy()].mean(0)
        assert np.corrcoef(delta[strong], effect[strong])[0, 1] > 0.7, name
    # escapers look like controls: the strongest perturbation with escapers, edited vs escaped
    order = np.argsort(-np.abs(truth.effects).max(1))
    p = next(p for p in order if ((obs["perturbation"] == truth.perturbations[p]) & ~obs["edited"]).sum() >= 15)
    name, effect = truth.perturbations[p], truth.effects[p]
    top = np.argsort(-np.abs(effect))[:3]
    cells = (obs["perturbation"] == name).to_numpy()
    shift = {k: norm[cells & m.to_numpy()].mean(0)[top] - norm[(obs["perturbation"] == "control").to_numpy()].mean(0)[top]
             for k, m in (("edited", obs["edited"]), ("escaped", ~obs["edited"]))}
    assert np.abs(shift["escaped"]).mean() < 0.5 * np.abs(shift["edited"]).mean(), shift


def test_the_chunked_file_opens_backed_and_is_reproducible(tmp_path):
    path = tmp_path / "screen.h5ad"
    truth = simulate_h5ad(path, 2500, 40, 8, chunk_size=600, n_batches=2, seed=1)
    backed = ad.read_h5ad(path, backed="r")
    assert backed.shape == (2500, 40) and list(backed.var_names) == truth.genes
    x = backed.X[:].toarray()
    np.testing.assert_allclose(backed.obs["n_counts"], x.sum(1))
    backed.file.close()
    assert not list(tmp_path.glob(".*"))  # no temporary file left
    with pytest.raises(FileExistsError):
        simulate_h5ad(path, 100, 40, 8)
    again = simulate_h5ad(tmp_path / "again.h5ad", 2500, 40, 8, chunk_size=600, n_batches=2, seed=1)
    np.testing.assert_array_equal(again.effects, truth.effects)
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "again.h5ad").X.toarray(), x)
    with pytest.raises(ValueError, match="n_genes"):
        simulate(10, 1, 2)


def test_simulate_command(tmp_path, capsys):
    out = tmp_path / "cli.h5ad"
    assert main(["simulate", "--cells", "800", "--genes", "30", "--perturbations", "5", "--combinations", "2",
                 "--cell-types", "2", "--out", str(out)]) == 0
    adata = ad.read_h5ad(out)
    assert adata.shape == (800, 30) and sum("+" in lab for lab in adata.obs["perturbation"].unique()) == 2
    truth = np.load(tmp_path / "cli.h5ad.truth.npz")
    assert truth["effects"].shape == (5, 30)
    assert main(["simulate", "--cells", "800", "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
