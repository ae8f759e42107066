"""Figures for figures/ (seaborn, PNG and PDF)."""
