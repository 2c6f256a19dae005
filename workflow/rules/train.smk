rule train:
    input:
        split=LAYOUT.splits("{dataset}", "{seed}"),
        index=LAYOUT.processed("{dataset}") / "index.json",
    output:
        ckpt=run_dir() / FINAL,
        meta=run_dir() / RUN_JSON,
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        out=lambda wc: run_dir(wc),
        settings=recipe_hash,
    threads: 1
    # Snakemake removes a job's log before each attempt, so this holds the latest attempt only;
    # a resumed run's train_log.csv keeps the rows of its earlier attempts.
    log:
        LAYOUT.job_log("train", "{dataset}", "{method}", "{ratio}", "{seed}"),
    benchmark:
        BENCHMARKS / "train" / "{dataset}" / "{method}" / "r{ratio}" / "s{seed}.tsv"
    conda:
        ENV
    shell:
        "{params.agcl} train {wildcards.dataset} --config {params.config:q}"
        " --method {wildcards.method} --labels {wildcards.ratio} --seed {wildcards.seed}"
        " --out {params.out} --threads {threads} --no-progress >> {log} 2>&1"
