rule evaluate:
    input:
        ckpt=run_dir() / "ckpt_final.pt",
        meta=run_dir() / "run.json",
        split=LAYOUT.splits("{dataset}", "{seed}"),
    output:
        run_dir() / "metrics.json",
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        run=lambda wc: run_dir(wc),
    threads: 1
    log:
        LOGS / "evaluate" / "{dataset}" / "{method}" / "r{ratio}" / "s{seed}.log",
    conda:
        ENV
    shell:
        "{params.agcl} evaluate --config {params.config:q} --dataset {wildcards.dataset}"
        " --run {params.run} --threads {threads} --save-predictions > {log} 2>&1"
