# Training jobs: one per run of the matrix, all through scripts/train.py.


rule train:
    input:
        script="scripts/train.py",
        code=package_sources("scripts/train.py"),
        data=data_inputs,
        init=init_weights,
        cache=prefill_input,
        encoder=encoder_input,
        concat=concat_input,
    output:
        weights="results/{run}/weights.pth",
        metrics="results/{run}/metrics.csv",
        summary="results/{run}/summary.json",
    log:
        "logs/train/{run}.log",
    benchmark:
        "benchmarks/train/{run}.tsv"
    threads: job_threads
    resources:
        gpu=1,
    params:
        run=run_json,
        extra=lambda wildcards, input: (
            optional_arg("--init", input.init)
            + optional_arg("--cache", input.cache)
            + optional_arg("--encoder", input.encoder)
            + optional_arg("--concat-adapter", input.concat)
        ),
    shell:
        gpu_job(
            "python {input.script:q} --run-json {params.run:q} --out results/{wildcards.run:q} "
            "{params.extra:q} > {log:q} 2>&1"
        )
