# The text branch: encoder adaptation (vle/*) and cache prefills per starting checkpoint.


rule adapt_encoder:
    input:
        script="scripts/adapt_encoder.py",
        weights=lambda wildcards: f"results/{config['adaptations'][wildcards.adaptation]['init']}/weights.pth",
        data=lambda wildcards: data_ready(config["data"]["root"]),
    output:
        encoder="results/{adaptation}/encoder.pt",
        metrics="results/{adaptation}/metrics.json",
    params:
        run=lambda wildcards: to_json(resolve_adaptation(config, wildcards.adaptation)),
    log:
        "logs/adapt_encoder/{adaptation}.log",
    benchmark:
        "benchmarks/adapt_encoder/{adaptation}.tsv"
    threads: config["train"]["threads"]
    resources:
        gpu=1,
    shell:
        "python {input.script} --run-json {params.run:q} --weights {input.weights} --out results/{wildcards.adaptation} > {log} 2>&1"


rule prefill_cache:
    input:
        script="scripts/prefill_cache.py",
        weights="results/{run}/weights.pth",
        data=data_inputs,
    output:
        "results/{run}/prefill_cache.pt",
    params:
        run=full_run_json,
    log:
        "logs/prefill_cache/{run}.log",
    benchmark:
        "benchmarks/prefill_cache/{run}.tsv"
    threads: job_threads
    resources:
        gpu=1,
    shell:
        "python {input.script} --run-json {params.run:q} --weights {input.weights} --out {output} > {log} 2>&1"
