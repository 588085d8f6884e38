# Evaluation of each run's best checkpoint and the results table.


rule evaluate:
    input:
        script="scripts/evaluate.py",
        weights="results/{run}/weights.pth",
        data=data_inputs,
    output:
        "results/{run}/eval.json",
    params:
        run=run_json,
    log:
        "logs/evaluate/{run}.log",
    benchmark:
        "benchmarks/evaluate/{run}.tsv"
    threads: 2
    shell:
        "python {input.script} --run-json {params.run:q} --weights {input.weights} --out {output} > {log} 2>&1"


rule summarize:
    input:
        script="scripts/summarize.py",
        results=expand("results/{run}/{name}", run=config["summary"], name=["eval.json", "summary.json"]),
    output:
        csv="results/summary.csv",
        md="results/summary.md",
    params:
        runs=expand("results/{run}", run=config["summary"]),
    log:
        "logs/summarize.log",
    benchmark:
        "benchmarks/summarize.tsv"
    shell:
        "python {input.script} --runs {params.runs} --csv {output.csv} --md {output.md} > {log} 2>&1"
