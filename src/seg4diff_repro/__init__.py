"""seg4diff-repro: reproduce the Seg4Diff appendix analyses of attention in MM-DiT transformers."""

__version__ = "0.1.0"
