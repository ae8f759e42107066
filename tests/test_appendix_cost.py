"""The bill of the paper run (benchmarks/appendix_cost.py) prices the jobs of Snakemake's own DAG: every job of
the paper config, rules with a `message:` included (their dry-run text shows the message, not the rule)."""

from __future__ import annotations

import importlib.util
import re
from collections import Counter

from test_workflow import REPO, snakemake


def load_appendix_cost():
    spec = importlib.util.spec_from_file_location("appendix_cost", REPO / "benchmarks" / "appendix_cost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bill_job_list_is_the_paper_config_dry_runs_job_list():
    configs = ["config.yaml", "configs/paper.yaml"]
    jobs = load_appendix_cost().dry_run_jobs(configs)
    dry_run = snakemake(REPO, "-n", "--forceall", "--configfile", *configs, cores="1")
    table = dry_run.stdout.split("Job stats:")[1].split("total")[0]
    expected = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)\s*$", table, flags=re.MULTILINE)}
    assert Counter(job["rule"] for job in jobs) == Counter(expected)
    runs = [job["wildcards"] for job in jobs if job["rule"] == "generate_run"]
    assert runs and all({"model", "prompt_set", "run"} <= set(wildcards) for wildcards in runs)
