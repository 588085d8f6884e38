# The embedded default dataset, generated deterministically from the config.


if config["data"]["kind"] == "synthetic":

    rule make_data:
        input:
            script="scripts/make_data.py",
            code=package_sources("scripts/make_data.py"),
        output:
            train=f"{config['data']['root']}/ImageSets/Segmentation/train.txt",
            val=data_ready(config["data"]["root"]),
            classes=f"{config['data']['root']}/classes.txt",
        log:
            "logs/make_data.log",
        benchmark:
            "benchmarks/make_data.tsv"
        params:
            run=lambda wildcards: to_json({"data": config["data"]}),
        shell:
            "python {input.script:q} --run-json {params.run:q} > {log:q} 2>&1"
