# Generation analyses (issue 6): per-layer perturbation runs, fidelity scores, perturbation and guidance grids.


def generation_targets():
    """Every generation-side appendix figure and table (Figs. 5, 7, 10, 18, 19)."""
    return []
