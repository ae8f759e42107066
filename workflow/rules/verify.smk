# Reviewer verification (issue 14), not part of `all`: `snakemake bundle` packs what the run produced and what
# is needed to check it; `snakemake verify` checks the bundle on a CPU (checksums, cache files, every table
# and every figure's numbers re-derived with the current code) and writes the report, part of `--report`.

import shlex

VERIFICATION = config["verification"]


rule bundle:
    input:
        # The tables and figures (by default what `rule all` builds); through Snakemake's records the bundle
        # also holds every job they depend on.
        VERIFICATION["targets"] or rules.all.input,
    output:
        directory(VERIFICATION["bundle"]),
    params:
        config=json.dumps(config, sort_keys=True),
        leave_out_caches=VERIFICATION["leave_out_caches"],
        dataset_limit_mb=VERIFICATION["dataset_limit_mb"],
    message:
        "Bundling the run for verification (tables, figures, caches, job records, checksums); writes {output}; progress in {log}"
    log:
        "logs/bundle.log",
    resources:
        mem_mb=2000,
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro bundle --targets {input:q} --out {output:q} --config {params.config:q}"
        " --leave-out-caches {params.leave_out_caches} --dataset-limit-mb {params.dataset_limit_mb} 2> {log:q}"


rule verify:
    input:
        # A received bundle is read as it is, without rebuilding the run it came from.
        [] if VERIFICATION["received_bundle"] else [VERIFICATION["bundle"]],
    output:
        markdown=f"{VERIFICATION['report']}/verification.md",
        html=report(
            f"{VERIFICATION['report']}/verification.html",
            caption="../report/verification.rst",
            category="Verification",
        ),
        json=f"{VERIFICATION['report']}/verification.json",
    params:
        bundle=lambda wildcards, input: input[0] if input else VERIFICATION["received_bundle"],
        spot_check=VERIFICATION["spot_check"],
        spot_seed=VERIFICATION["spot_seed"],
        device=VERIFICATION["device"],
        data_root=f"--data-root {shlex.quote(VERIFICATION['data_root'])}" if VERIFICATION["data_root"] else "",
    message:
        "Verifying the bundle {params.bundle}: checksums, cache files, every table and figure re-derived, a spot check of {params.spot_check} images per cache on {params.device}; writes {output}; progress in {log}"
    log:
        "logs/verify.log",
    resources:
        mem_mb=4000,
        gpu=int(VERIFICATION["spot_check"] > 0 and VERIFICATION["device"].startswith("cuda")),
    conda:
        "../../envs/torch.yaml"
    shell:
        "seg4diff-repro verify {params.bundle:q} --markdown {output.markdown:q} --html {output.html:q}"
        " --json {output.json:q} --spot-check {params.spot_check} --spot-seed {params.spot_seed}"
        " --device {params.device:q} {params.data_root} 2> {log:q}"
