"""Verifiable tasks: the synthetic arithmetic family and the paper's math data."""
