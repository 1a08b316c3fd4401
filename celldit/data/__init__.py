"""Data: perturbation specs, expression preprocessing, splits (and, later, datasets)."""
