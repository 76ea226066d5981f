"""Reward modelling: pairwise (Bradley–Terry) loss, last-token scoring, and the scoring API."""
