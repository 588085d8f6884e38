# Evaluation of each run's best checkpoint and the results table.


rule evaluate:
    input:
        script="scripts/evaluate.py",
        code=package_sources("scripts/evaluate.py"),
        weights="results/{run}/weights.pth",
        data=data_inputs,
    output:
        "results/{run}/eval.json",
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "benchmarks/evaluate/{run}.tsv"
    threads: job_threads
    resources:
        gpu=1,
    params:
        run=run_json,
    shell:
        gpu_job(
            "python {input.script:q} --run-json {params.run:q} --weights {input.weights:q} "
            "--out {output:q} > {log:q} 2>&1"
        )


rule summarize:
    input:
        script="scripts/summarize.py",
        code=package_sources("scripts/summarize.py"),
        results=summary_inputs,
    output:
        csv="results/summary.csv",
        md="results/summary.md",
        text_help="results/text_help.csv",
    log:
        "logs/summarize.log",
    benchmark:
        "benchmarks/summarize.tsv"
    params:
        experiments=lambda wildcards: to_json(summary_experiments()),
    shell:
        "python {input.script:q} --experiments-json {params.experiments:q} "
        "--csv {output.csv:q} --md {output.md:q} --text-help-csv {output.text_help:q} > {log:q} 2>&1"
