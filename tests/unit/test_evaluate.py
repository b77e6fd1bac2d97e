"""The evaluator's pieces against hand-computed values (tests/system/test_evaluation.py: whole evaluations)."""

from __future__ import annotations

import torch

from training.evaluate import active_units, iwae_bound, knn_accuracy


def test_iwae_bound_is_log_mean_of_weights() -> None:
    log_weights = torch.log(torch.tensor([[1.0, 3.0], [2.0, 2.0]]))
    torch.testing.assert_close(iwae_bound(log_weights), torch.log(torch.tensor([2.0, 2.0])))


def test_active_units_counts_dimensions_whose_mean_varies() -> None:
    generator = torch.Generator().manual_seed(0)
    mu = torch.randn(2000, 3, generator=generator) * torch.tensor([1.0, 0.2, 0.05])  # variances 1, 0.04, 0.0025
    assert active_units(mu) == 2


def test_knn_accuracy_on_separated_clusters_is_perfect_and_on_swapped_labels_zero() -> None:
    centres = torch.tensor([[0.0, 0.0], [10.0, 10.0]])
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(40) % 2
    train = centres[labels] + torch.randn(40, 2, generator=generator)
    test = centres[labels] + torch.randn(40, 2, generator=generator)
    assert knn_accuracy(train, labels, test, labels, k=5) == 1.0
    assert knn_accuracy(train, labels, test, 1 - labels, k=5) == 0.0
