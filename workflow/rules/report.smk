# Figures, qualitative panels and the results table, marked for `snakemake --report`.


# Runs with an init (a before checkpoint): the qualitative rule can draw any of them.
PANEL_RUNS = [r for r in RUNS if config["runs"][r].get("init")]

# The report shows one panel per text run of the results table that has an init.
QUALITATIVE_RUNS = [r for r in config["summary"] if r in PANEL_RUNS and run_settings(r)["objective"]["name"] != "none"]

# Every file the report shows; `make report` builds these (rule report_inputs) before `--report`.
REPORT_INPUTS = (
    expand("results/figures/{name}.png", name=["curves", "describer", "results", "text_signals"])
    + expand("results/figures/qualitative/{run}.png", run=QUALITATIVE_RUNS)
    + ["results/figures/summary_table.html"]
)


rule figures:
    input:
        script="scripts/figures.py",
        code=package_sources("scripts/figures.py"),
        metrics=expand("results/{run}/metrics.csv", run=config["summary"]),
        summary="results/summary.csv",
    output:
        curves=report("results/figures/curves.png", caption="../report/curves.rst", category="Figures"),
        describer=report("results/figures/describer.png", caption="../report/describer.rst", category="Figures"),
        results=report("results/figures/results.png", caption="../report/results.rst", category="Figures"),
        text_signals=report(
            "results/figures/text_signals.png", caption="../report/text_signals.rst", category="Figures"
        ),
    log:
        "logs/figures.log",
    benchmark:
        "benchmarks/figures.tsv"
    params:
        runs=expand("results/{run}", run=config["summary"]),
        out_dir=lambda wildcards, output: os.path.dirname(output.curves),
    shell:
        "python {input.script:q} --runs {params.runs:q} --summary {input.summary:q} "
        "--out-dir {params.out_dir:q} > {log:q} 2>&1"


rule summary_table:
    input:
        script="scripts/figures.py",
        code=package_sources("scripts/figures.py"),
        summary="results/summary.csv",
        text_help="results/text_help.csv",
    output:
        report("results/figures/summary_table.html", caption="../report/summary_table.rst", category="Results table"),
    log:
        "logs/summary_table.log",
    benchmark:
        "benchmarks/summary_table.tsv"
    shell:
        "python {input.script:q} --summary {input.summary:q} --text-help {input.text_help:q} "
        "--table-html {output:q} > {log:q} 2>&1"


rule qualitative:
    input:
        script="scripts/qualitative.py",
        code=package_sources("scripts/qualitative.py"),
        before=lambda wildcards: f"results/{config['runs'][wildcards.run]['init']}/weights.pth",
        after="results/{run}/weights.pth",
        data=data_inputs,
    output:
        report(
            "results/figures/qualitative/{run}.png",
            caption="../report/qualitative.rst",
            category="Qualitative",
            labels={"experiment": "{run}"},
        ),
    log:
        "logs/qualitative/{run}.log",
    benchmark:
        "benchmarks/qualitative/{run}.tsv"
    wildcard_constraints:
        run="|".join(re.escape(r) for r in sorted(PANEL_RUNS, key=len, reverse=True)) or "^$",
    threads: job_threads
    params:
        run=full_run_json,
    shell:
        "python {input.script:q} --run-json {params.run:q} --before {input.before:q} --after {input.after:q} "
        "--out {output:q} > {log:q} 2>&1"


rule report_inputs:
    input:
        REPORT_INPUTS,
