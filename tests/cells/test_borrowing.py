"""The leave-one-out borrowing kernel of unseen perturbations (celldit.cells.borrowing)."""

import numpy as np

from celldit.cells.borrowing import PriorBorrowing


def _clusters(seed: int, informative: bool):
    """Three clusters of 5 perturbations in feature space; with ``informative`` each cluster
    has its own effect (plus small noise), else effects are drawn independently of features."""
    rng = np.random.default_rng(seed)
    centres = np.array([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0]])
    feats = np.repeat(centres, 5, axis=0) + 0.1 * rng.standard_normal((15, 2))
    effects = 2.0 * rng.standard_normal((3, 20))
    anchors = np.repeat(effects, 5, axis=0) + 0.1 * rng.standard_normal((15, 20)) if informative \
        else 2.0 * rng.standard_normal((15, 20))
    return feats, anchors


def test_informative_features_keep_a_narrow_kernel_and_full_scale():
    feats, anchors = _clusters(0, informative=True)
    borrow = PriorBorrowing(feats, np.ones(15, bool), anchors, np.ones(15))
    assert borrow.scale > 0.95
    w = borrow.weights(np.array([5.05, 0.0]))  # next to the second cluster
    assert w[5:10].sum() > 0.99 * borrow.scale
    np.testing.assert_allclose(w @ anchors, anchors[5:10].mean(0), atol=0.1)


def test_uninformative_features_shrink_the_borrowed_anchor_toward_no_change():
    feats, anchors = _clusters(1, informative=False)
    borrow = PriorBorrowing(feats, np.ones(15, bool), anchors, np.ones(15))
    assert borrow.scale < 0.3  # zero-mean effects unrelated to features: borrow little
    median = PriorBorrowing(feats[:2], np.ones(2, bool), anchors[:2], np.ones(2))  # with two the kernel is not checked
    assert median.scale == 1.0


def test_a_shared_effect_is_borrowed_uniformly_like_the_train_mean():
    rng = np.random.default_rng(2)
    feats = rng.standard_normal((12, 4))
    common = np.linspace(-1, 1, 30)
    anchors = common + 0.05 * rng.standard_normal((12, 30))
    borrow = PriorBorrowing(feats, np.ones(12, bool), anchors, np.full(12, 0.5))
    w = borrow.weights(rng.standard_normal(4))
    assert np.isinf(borrow.bandwidth) and borrow.scale > 0.95
    np.testing.assert_allclose(w, borrow.scale / 12)
    np.testing.assert_allclose(w @ anchors, common, atol=0.05)
    np.testing.assert_allclose(borrow.gate(feats[0]), 0.5 * borrow.scale)  # the neighbours' gates, weighted alike


def test_uninformative_features_fall_back_to_the_mean_of_all_trained_perturbations():
    """Six of 20 trained perturbations have prior features (the strong ones), which tell them
    apart no better than chance: the unseen one gets the mean of all 20 (unscaled: the
    anchors are shrunk already), not the mean of the six strong ones."""
    rng = np.random.default_rng(3)
    common = np.linspace(-1, 1, 30)
    strong = 3 * common + 0.3 * rng.standard_normal((6, 30))
    weak = common + 0.3 * rng.standard_normal((14, 30))
    anchors = np.vstack([strong, weak])
    has = np.arange(20) < 6
    feats = np.where(has[:, None], rng.standard_normal((20, 3)), 0.0)
    gates = np.r_[np.ones(6), np.full(14, 0.2)]
    borrow = PriorBorrowing(feats, has, anchors, gates)
    assert borrow.use_all and borrow.scale == 1.0
    w = borrow.weights(rng.standard_normal(3))
    np.testing.assert_allclose(w, 1 / 20)
    borrowed = w @ anchors
    np.testing.assert_allclose(borrowed, anchors.mean(0))
    assert np.linalg.norm(borrowed) < 0.6 * np.linalg.norm(strong.mean(0))  # not the strong ones' size
    np.testing.assert_allclose(borrow.gate(feats[0]), gates.mean())
