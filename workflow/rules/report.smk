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
        case_means=LAYOUT.results / "summary" / "case_means.csv",
        stats=LAYOUT.results / "summary" / "stats.csv",
        run_to_run=LAYOUT.results / "summary" / "run_to_run.csv",
        published=LAYOUT.results / "summary" / "published.csv",
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        out=LAYOUT.results / "summary",
        settings=AGGREGATE_SETTINGS,
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
        settings=REPORT_SETTINGS,
    log:
        LOGS / "report.log",
    conda:
        ENV
    shell:
        "{params.agcl} report --config {params.config:q} --out {output} > {log} 2>&1"


onerror:
    # Under --keep-going one failed run must not block every table: the summary and the report
    # are rendered from the runs that did finish (both list the missing ones). Their files are
    # older than any metrics.json a later, repaired run writes, so the next invocation redoes them.
    finished = [path for path in all_metrics() if Path(path).exists()]
    if finished:
        print(f"Some jobs failed: rendering the summary and report from the {len(finished)} of "
              f"{len(all_metrics())} runs that finished (missing ones are listed in "
              f"{rules.aggregate.output.missing})")
        shell(
            "{AGCL} aggregate --config {CONFIGFILE:q} --out {rules.aggregate.params.out}"
            " > {rules.aggregate.log} 2>&1 && {AGCL} report --config {CONFIGFILE:q}"
            " --out {REPORT_HTML} > {rules.report.log} 2>&1 || echo 'partial report failed:"
            " see {rules.aggregate.log} and {rules.report.log}'"
        )
