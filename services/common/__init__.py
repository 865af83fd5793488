"""Pieces every service shell shares: access control, logging, process helpers."""
