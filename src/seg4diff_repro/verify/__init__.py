"""Reviewer verification: a results bundle of a run (`bundle.py`), its checks on a CPU (`verify.py`), a GPU
spot check of the attention caches (`spot_check.py`) and the report (`report.py`)."""
