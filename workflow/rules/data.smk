rule download:
    output:
        directory(LAYOUT.raw("{dataset}")),
    wildcard_constraints:
        dataset=alternatives([d for d, s in SOURCES.items() if s == "download"]),
    params:
        agcl=AGCL,
        base_url=lambda wc: config["datasets"][wc.dataset]["base_url"],
        cases=lambda wc: (
            "--cases " + ",".join(config["datasets"][wc.dataset]["cases"])
            if config["datasets"][wc.dataset]["cases"]
            else ""
        ),
    log:
        LOGS / "download" / "{dataset}.log",
    conda:
        ENV
    shell:
        "{params.agcl} download {wildcards.dataset} --dest {output} --base-url {params.base_url:q}"
        " {params.cases} --no-progress > {log} 2>&1"


rule synth:
    output:
        directory(LAYOUT.raw("{dataset}")),
    wildcard_constraints:
        dataset=alternatives(
            # a dataset whose synthetic copy is a zip (CRAG) goes through its ingest rule instead
            [d for d, s in SOURCES.items() if s == "synthetic" and not get_spec(d).synth_zip]
        ),
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        settings=dataset_settings("synth"),
    log:
        LOGS / "synth" / "{dataset}.log",
    conda:
        ENV
    shell:
        "{params.agcl} synth {wildcards.dataset} --out {output} --config {params.config:q} > {log} 2>&1"


rule synth_crag_zip:
    output:
        LAYOUT.data / "synthetic" / "CRAG.zip",
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        out=lambda wc, output: Path(output[0]).parent,
        settings=dataset_settings("synth", dataset="crag"),
    log:
        LOGS / "synth" / "crag.log",
    conda:
        ENV
    shell:
        "{params.agcl} synth crag --out {params.out} --config {params.config:q} --zip > {log} 2>&1"


rule ingest_crag:
    input:
        crag_source,
    output:
        directory(LAYOUT.raw("crag")),
    params:
        agcl=AGCL,
        expect=",".join(map(str, config["datasets"].get("crag", {}).get("expected_counts", []))),
    log:
        LOGS / "ingest_crag.log",
    conda:
        ENV
    shell:
        "{params.agcl} ingest-crag {input:q} --dest {output} --expect {params.expect} > {log} 2>&1"


rule preprocess:
    input:
        LAYOUT.raw("{dataset}"),
    output:
        LAYOUT.processed("{dataset}") / "index.json",
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        out=lambda wc, output: Path(output[0]).parent,
        settings=dataset_settings("scale"),
    log:
        LOGS / "preprocess" / "{dataset}.log",
    conda:
        ENV
    shell:
        "{params.agcl} preprocess {wildcards.dataset} --src {input} --out {params.out}"
        " --config {params.config:q} > {log} 2>&1"


rule splits:
    input:
        LAYOUT.processed("{dataset}") / "index.json",
    output:
        LAYOUT.splits("{dataset}", "{seed}"),
    params:
        agcl=AGCL,
        config=CONFIGFILE,
        settings=split_settings,
    log:
        LOGS / "splits" / "{dataset}_seed{seed}.log",
    conda:
        ENV
    shell:
        "{params.agcl} splits {wildcards.dataset} --config {params.config:q}"
        " --seed {wildcards.seed} --out {output} > {log} 2>&1"
