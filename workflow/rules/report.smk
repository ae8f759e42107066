# What `snakemake --report` shows beyond the figures: every table as a page (its Markdown with the title, the
# settings and provenance line and the notes; the CSV stays for download) and a page on the run itself (commit,
# dirty flag, config).


from seg4diff_repro.provenance import git_state


include: "report_common.smk"


rule table_page:
    input:
        f"{TABLES}/{{table}}.md",
    output:
        report(
            f"{REPORT_PAGES}/tables/{{table}}.html",
            caption="../report/table_page.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
    log:
        "logs/table_page/{table}.log",
    resources:
        mem_mb=500,
    conda:
        "../../envs/datasets.yaml"
    localrule: True
    shell:
        "seg4diff-repro table-page --markdown {input:q} --html {output:q} 2> {log:q}"


rule run_info:
    output:
        report(
            f"{REPORT_PAGES}/run_info.html",
            caption="../report/run_info.rst",
            category=report_category,
            subcategory=report_subcategory,
        ),
    params:
        config=json.dumps(config, sort_keys=True),
        # Not read by the command (it records its own provenance): here so that a new commit re-runs it.
        git=json.dumps(git_state(), sort_keys=True),
    log:
        "logs/run_info.log",
    resources:
        mem_mb=500,
    conda:
        "../../envs/datasets.yaml"
    localrule: True
    shell:
        "seg4diff-repro run-info --config {params.config:q} --html {output:q} 2> {log:q}"
