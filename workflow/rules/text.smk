# The text branch: encoder adaptation (vle/*) and cache prefills per starting checkpoint.


rule adapt_encoder:
    input:
        script="scripts/adapt_encoder.py",
        code=package_sources("scripts/adapt_encoder.py"),
        weights=adaptation_init,
        data=lambda wildcards: dataset_ready(config["data"]),
    output:
        encoder="results/{encoder_adaptation}/encoder.pt",
        metrics="results/{encoder_adaptation}/metrics.json",
    log:
        "logs/adapt_encoder/{encoder_adaptation}.log",
    benchmark:
        "benchmarks/adapt_encoder/{encoder_adaptation}.tsv"
    threads: config["train"]["threads"]
    resources:
        gpu=1,
    params:
        run=lambda wildcards: to_json(resolve_adaptation(config, wildcards.encoder_adaptation)),
    shell:
        gpu_job(
            "python {input.script:q} --run-json {params.run:q} --weights {input.weights:q} "
            "--out results/{wildcards.encoder_adaptation:q} > {log:q} 2>&1"
        )


rule adapt_concat:
    input:
        script="scripts/adapt_encoder.py",
        code=package_sources("scripts/adapt_encoder.py"),
        weights=adaptation_init,
        data=lambda wildcards: dataset_ready(config["data"]),
        encoder=concat_encoder_input,
    output:
        adapter="results/{concat_adaptation}/concat_adapter.pt",
        metrics="results/{concat_adaptation}/metrics.json",
    log:
        "logs/adapt_concat/{concat_adaptation}.log",
    benchmark:
        "benchmarks/adapt_concat/{concat_adaptation}.tsv"
    threads: config["train"]["threads"]
    resources:
        gpu=1,
    params:
        run=lambda wildcards: to_json(resolve_adaptation(config, wildcards.concat_adaptation)),
        encoder=lambda wildcards, input: optional_arg("--encoder", input.encoder),
    shell:
        gpu_job(
            "python {input.script:q} --run-json {params.run:q} --weights {input.weights:q} {params.encoder:q} "
            "--out results/{wildcards.concat_adaptation:q} > {log:q} 2>&1"
        )


rule prefill_cache:
    input:
        script="scripts/prefill_cache.py",
        code=package_sources("scripts/prefill_cache.py"),
        weights="results/{run}/weights.pth",
        data=data_inputs,
    output:
        "results/{run}/prefill_cache.pt",
    log:
        "logs/prefill_cache/{run}.log",
    benchmark:
        "benchmarks/prefill_cache/{run}.tsv"
    threads: job_threads
    resources:
        gpu=1,
    params:
        run=full_run_json,
    shell:
        gpu_job(
            "python {input.script:q} --run-json {params.run:q} --weights {input.weights:q} "
            "--out {output:q} > {log:q} 2>&1"
        )
