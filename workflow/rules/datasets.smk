# Real datasets (docs/method.md §6): check a VOC-layout folder once before any job reads it,
# convert COCO 2017 into such a folder, and download VOC 2012 only when asked to.
#
# The workflow's records about a dataset live under resources/data_checks/{key}/ (key =
# dataset_key(data.root), e.g. VOC2012-1a2b3c4d), never inside the dataset: a shared VOC
# copy may be read-only, and an absolute root would not fit into log paths. The dataset's
# own files are not declared as inputs on purpose: a missing split list must reach
# check_data.py, which says where to get the data, and no rule may ever be asked to
# (re)create files of a user's dataset. Jobs depend on check_record(root) (common.smk).
from ttdl.datasets.voc_check import (
    CHECKS_DIR,
    check_inputs,
    check_settings,
    key_pattern,
    lists_fingerprint,
    real_datasets,
)

# every data section a job reads: the runs' (they may override data) and the shared one
DATASETS = real_datasets([run_settings(run)["data"] for run in config["runs"]] + [config["data"]])


rule check_data:
    input:
        script="scripts/check_data.py",
        code=package_sources("scripts/check_data.py"),
        prepared=lambda wildcards: check_inputs(DATASETS[wildcards.dataset]),
    output:
        f"{CHECKS_DIR}/{{dataset}}/check.json",
    log:
        "logs/check_data/{dataset}.log",
    benchmark:
        "benchmarks/check_data/{dataset}.tsv"
    wildcard_constraints:
        dataset=key_pattern(DATASETS, ("folder", "coco")),
    params:
        data=lambda wildcards: to_json(check_settings(DATASETS[wildcards.dataset])),
        lists=lambda wildcards: lists_fingerprint(DATASETS[wildcards.dataset]),
    shell:
        "python {input.script:q} --data-json {params.data:q} --out {output:q} > {log:q} 2>&1"


rule prepare_coco:
    input:
        script="scripts/prepare_coco.py",
        code=package_sources("scripts/prepare_coco.py"),
    output:
        f"{CHECKS_DIR}/{{coco_dataset}}/coco.json",
    log:
        "logs/prepare_coco/{coco_dataset}.log",
    benchmark:
        "benchmarks/prepare_coco/{coco_dataset}.tsv"
    wildcard_constraints:
        coco_dataset=key_pattern(DATASETS, ("coco",)),
    params:
        data=lambda wildcards: to_json({k: DATASETS[wildcards.coco_dataset].get(k) for k in ("root", "coco")}),
    shell:
        "python {input.script:q} --data-json {params.data:q} --out {output:q} > {log:q} 2>&1"


# Opt-in, for connected machines: `.venv/bin/snakemake --cores 1 download_voc`.
# Nothing consumes its output, so no other target ever starts a download.
localrules:
    download_voc,


rule download_voc:
    input:
        script="scripts/download_voc.py",
        code=package_sources("scripts/download_voc.py"),
    output:
        "resources/VOCdevkit/download_voc.json",
    log:
        "logs/download_voc.log",
    benchmark:
        "benchmarks/download_voc.tsv"
    shell:
        "python {input.script:q} --dest resources --out {output:q} > {log:q} 2>&1"
