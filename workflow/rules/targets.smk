# Named targets for part of the grid, e.g. `snakemake --cores 8 --use-conda dataset_la` or
# `method_bcp`: every run of that dataset (or method) trained and evaluated. One cell:
# `snakemake results/<name>/runs/<dataset>/<method>/r<ratio>/s<seed>/metrics.json`.
for _dataset in DATASETS:

    rule:
        name:
            f"dataset_{_dataset}"
        input:
            all_metrics(dataset=_dataset),
        default_target: False


for _method in METHODS:

    rule:
        name:
            f"method_{_method}"
        input:
            all_metrics(method=_method),
        default_target: False
