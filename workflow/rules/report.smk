# Figures, qualitative panels and the results table, marked for `snakemake --report`.


def qualitative_runs():
    """Text runs of the results table that start from another run (they have a before and an after)."""
    return [r for r in config["summary"]
            if config["runs"][r].get("init") and run_settings(r)["objective"]["name"] != "none"]


def report_inputs(wildcards=None):
    """Every file the report shows; `make report` builds these first."""
    figures = expand("results/figures/{name}.png", name=["curves", "describer", "results"])
    panels = expand("results/figures/qualitative/{run}.png", run=qualitative_runs())
    return figures + panels + ["results/figures/summary_table.html"]


def init_checkpoint(wildcards):
    init = config["runs"][wildcards.run].get("init")
    if not init:
        raise ValueError(f"run {wildcards.run!r} has no init: a qualitative panel needs a before checkpoint")
    return f"results/{init}/weights.pth"


rule figures:
    input:
        script="scripts/figures.py",
        metrics=expand("results/{run}/metrics.csv", run=config["summary"]),
        summary="results/summary.csv",
    output:
        curves=report("results/figures/curves.png", caption="../report/curves.rst", category="Figures"),
        describer=report("results/figures/describer.png", caption="../report/describer.rst", category="Figures"),
        results=report("results/figures/results.png", caption="../report/results.rst", category="Figures"),
    params:
        runs=expand("results/{run}", run=config["summary"]),
        out_dir=lambda wildcards, output: os.path.dirname(output.curves),
    log:
        "logs/figures.log",
    benchmark:
        "benchmarks/figures.tsv"
    shell:
        "python {input.script} --runs {params.runs} --summary {input.summary} --out-dir {params.out_dir} > {log} 2>&1"


rule summary_table:
    input:
        script="scripts/figures.py",
        summary="results/summary.csv",
    output:
        report("results/figures/summary_table.html", caption="../report/summary_table.rst", category="Results table"),
    log:
        "logs/summary_table.log",
    benchmark:
        "benchmarks/summary_table.tsv"
    shell:
        "python {input.script} --summary {input.summary} --table-html {output} > {log} 2>&1"


rule qualitative:
    input:
        script="scripts/qualitative.py",
        before=init_checkpoint,
        after="results/{run}/weights.pth",
        data=data_inputs,
    output:
        report("results/figures/qualitative/{run}.png", caption="../report/qualitative.rst",
               category="Qualitative", labels={"experiment": "{run}"}),
    params:
        run=full_run_json,
    log:
        "logs/qualitative/{run}.log",
    benchmark:
        "benchmarks/qualitative/{run}.tsv"
    threads: 2
    shell:
        "python {input.script} --run-json {params.run:q} --before {input.before} --after {input.after} "
        "--out {output} > {log} 2>&1"


rule report_inputs:
    input:
        report_inputs(),
