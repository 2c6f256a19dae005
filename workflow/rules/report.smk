rule aggregate:
    input:
        all_metrics(),
    output:
        per_case=LAYOUT.results / "summary" / "per_case.csv",
        runs=LAYOUT.results / "summary" / "runs.csv",
        summary=report(
            LAYOUT.results / "summary" / "summary.csv",
            caption="../report/summary.rst",
            category="Tables",
        ),
        missing=LAYOUT.results / "summary" / "missing.csv",
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        out=LAYOUT.results / "summary",
    log:
        LOGS / "aggregate.log",
    conda:
        ENV
    shell:
        "{params.agcl} aggregate --config {params.config:q} --out {params.out} > {log} 2>&1"


rule report:
    input:
        rules.aggregate.output,
    output:
        report(REPORT_HTML, caption="../report/index.rst", category="Report"),
    params:
        agcl=AGCL,
        config=CONFIGFILE,
    log:
        LOGS / "report.log",
    conda:
        ENV
    shell:
        "{params.agcl} report --config {params.config:q} --out {output} > {log} 2>&1"
