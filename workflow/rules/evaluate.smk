rule evaluate:
    input:
        ckpt=run_dir() / FINAL,
        meta=run_dir() / RUN_JSON,
        split=LAYOUT.splits("{dataset}", "{seed}"),
    output:
        run_dir() / METRICS_JSON,
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        run=lambda wc: run_dir(wc),
        settings=eval_settings,
    threads: 1
    log:
        LAYOUT.job_log("evaluate", "{dataset}", "{method}", "{ratio}", "{seed}"),
    conda:
        ENV
    shell:
        "{params.agcl} evaluate {wildcards.dataset} --config {params.config:q}"
        " --run {params.run} --threads {threads} --save-predictions > {log} 2>&1"
