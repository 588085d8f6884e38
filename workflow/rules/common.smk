# Helpers that turn the validated config into file paths and job parameters.
import re

from ttdl.core.config import resolve_adaptation, resolve_run, seed_runs, to_json
from ttdl.datasets.voc_check import check_record

RUNS = list(config["runs"])


def adaptation_pattern(kind):
    ids = [a for a, spec in config["adaptations"].items() if spec["kind"] == kind]
    return "|".join(re.escape(a) for a in ids) or "(?!)"


wildcard_constraints:
    run="|".join(re.escape(r) for r in sorted(RUNS, key=len, reverse=True)),
    encoder_adaptation=adaptation_pattern("encoder"),
    concat_adaptation=adaptation_pattern("concat"),


_RESOLVED = {}


def run_settings(run):
    """The run's resolved settings, resolved once per planning (shared: read them, never modify)."""
    if run not in _RESOLVED:
        _RESOLVED[run] = resolve_run(config, run)
    return _RESOLVED[run]


TEXT_SECTIONS = ("describer", "encoder", "cache")


def run_json(wildcards):
    """The run's resolved settings; a change re-runs the job (params are tracked).

    CE-only runs drop the text sections so that text settings never retrain them.
    """
    settings = run_settings(wildcards.run)
    if settings["objective"]["name"] == "none":
        settings = {k: v for k, v in settings.items() if k not in TEXT_SECTIONS}
    return to_json(settings)


def full_run_json(wildcards):
    return to_json(run_settings(wildcards.run))


def data_ready(root):
    """The file whose presence means the dataset under `root` is complete."""
    return f"{root}/ImageSets/Segmentation/val.txt"


def dataset_ready(data):
    """What a job reading the `data` section waits for: generated synthetic data, or a passed check."""
    return data_ready(data["root"]) if data["kind"] == "synthetic" else check_record(data["root"])


def data_inputs(wildcards):
    return dataset_ready(run_settings(wildcards.run)["data"])


def init_weights(wildcards):
    init = config["runs"][wildcards.run].get("init")
    return [f"results/{init}/weights.pth"] if init else []


def prefill_input(wildcards):
    """A prefilled cache of the init checkpoint, for runs that ask for one."""
    run = config["runs"][wildcards.run]
    return [f"results/{run['init']}/prefill_cache.pt"] if run.get("prefill") and run.get("init") else []


def encoder_input(wildcards):
    """The adapted encoder, for text runs whose encoder names an adaptation."""
    settings = run_settings(wildcards.run)
    adapted_by = settings["encoder"]["adapted_by"]
    return [f"results/{adapted_by}/encoder.pt"] if adapted_by and settings["objective"]["name"] != "none" else []


def concat_input(wildcards):
    """The vle/2 concat adapter, for B_PR runs."""
    settings = run_settings(wildcards.run)
    source = settings["objective"]["concat_adapter_from"]
    return [f"results/{source}/concat_adapter.pt"] if source and settings["objective"]["name"] != "none" else []


def adaptation_init(wildcards):
    adaptation = wildcards.get("encoder_adaptation") or wildcards.get("concat_adaptation")
    return f"results/{config['adaptations'][adaptation]['init']}/weights.pth"


def concat_encoder_input(wildcards):
    source = config["adaptations"][wildcards.concat_adaptation]["encoder_from"]
    return [f"results/{source}/encoder.pt"] if source else []


def optional_arg(flag, files):
    """`[flag, file]` for a rule's optional input (none: []); shell it as `{params.x:q}`."""
    return [flag, files[0]] if files else []


def summary_experiments():
    """The results table's experiments with their per-seed run folders (and baseline's), and their
    objective settings: the "Does text help?" section reads each run's role from them."""
    table = []
    for experiment in config["summary"]:
        baseline = config["runs"][experiment].get("baseline")
        table.append(
            {
                "experiment": experiment,
                "runs": [f"results/{r}" for r in seed_runs(config, experiment)],
                "baseline": baseline,
                "baseline_runs": [f"results/{r}" for r in seed_runs(config, baseline)] if baseline else [],
                "objective": run_settings(experiment)["objective"],
            }
        )
    return table


def summary_inputs(wildcards):
    folders = {d for e in summary_experiments() for d in e["runs"] + e["baseline_runs"]}
    return sorted(f"{d}/{name}" for d in folders for name in ("eval.json", "summary.json"))


def job_threads(wildcards):
    """A job's CPU threads: its run's train.threads (1 by default: jobs run side by side), one more for a
    matched-text run whose server describer works off the step (lookahead, background): its worker embeds
    the answers (the controls replace the answers, so nothing is embedded there)."""
    run = run_settings(wildcards.run)
    embeds = run["objective"]["name"] != "none" and run["objective"]["text"] == "describer"
    worker = embeds and run["describer"]["backend"] != "rules" and run["describer"]["schedule"] != "sync"
    return run["train"]["threads"] + int(worker)
