"""Typed, frozen views of a resolved run: one small dataclass per config section.

The schema (config.schema.yaml) is the only place that states a default; these
classes only name the keys and their types, and `from_dict` refuses a dict that
lacks one, so a default can never be restated in code. A test keeps the fields
equal to the schema's properties. Code reads `run.train.lr`, never
`cfg.get("lr", 0.001)`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

from ttdl.core.config import RUN_KEYS, ConfigError, fill_section_defaults

# Config keys that are Python keywords, and the field names that carry them.
_KEYWORD_FIELDS = {"lambda": "lambda_"}


class Section:
    """A config section: built from a validated dict, or from a partial one through the schema."""

    SCHEMA: ClassVar[str]  # name of the schema definition
    NESTED: ClassVar[dict[str, type]] = {}

    @classmethod
    def from_dict(cls, values: dict[str, Any]):
        names = {f.name for f in dataclasses.fields(cls)}
        keyed = {_KEYWORD_FIELDS.get(k, k): v for k, v in values.items()}
        missing, unknown = sorted(names - set(keyed)), sorted(set(keyed) - names)
        if missing or unknown:
            raise ConfigError(f"section {cls.SCHEMA!r}: missing keys {missing}, unknown keys {unknown} "
                              "(resolve the config through ttdl.core.config first)")
        for key, nested in cls.NESTED.items():
            keyed[key] = nested.from_dict(keyed[key])
        return cls(**keyed)

    @classmethod
    def from_partial(cls, values: dict[str, Any] | None = None, source: str = "settings"):
        """Validate `values` against the schema, fill its defaults, and build the section."""
        return cls.from_dict(fill_section_defaults(cls.SCHEMA, values or {}, source))

    def to_dict(self) -> dict[str, Any]:
        back = {v: k for k, v in _KEYWORD_FIELDS.items()}
        return {back.get(k, k): v for k, v in dataclasses.asdict(self).items()}

    def replace(self, **changes):
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class SyntheticData(Section):
    SCHEMA = "data.synthetic"
    num_train: int
    num_val: int
    image_size: int
    seed: int


@dataclass(frozen=True)
class CocoSource(Section):
    SCHEMA = "data.coco"
    root: str
    splits: dict
    max_images: dict


@dataclass(frozen=True)
class DegradeLabels(Section):
    SCHEMA = "data.degrade_labels"
    kind: str
    fraction: float
    seed: int

    @property
    def active(self) -> bool:
        return self.kind != "none"


@dataclass(frozen=True)
class DataSettings(Section):
    SCHEMA = "data"
    NESTED = {"synthetic": SyntheticData, "coco": CocoSource, "degrade_labels": DegradeLabels}
    kind: str
    expected_counts: Optional[dict]
    split_sha256: Optional[dict]
    coco: CocoSource
    root: str
    class_names: Optional[list]
    resize: int
    crop: int
    image_ext: str
    ignore_index: int
    synthetic: SyntheticData
    degrade_labels: DegradeLabels


@dataclass(frozen=True)
class ModelSettings(Section):
    SCHEMA = "model"
    name: str
    weights: Optional[str]
    backbone_weights: Optional[str]
    bn_momentum: Optional[float]


@dataclass(frozen=True)
class TrainSettings(Section):
    SCHEMA = "train"
    device: str
    batch_size: int
    eval_batch_size: int
    epochs: int
    lr: float
    weight_decay: float
    schedule: str
    warmup_steps: int
    grad_clip: Optional[float]
    amp: str
    target_miou: Optional[float]
    seed: int
    hflip: bool
    num_workers: int
    threads: int
    checkpoint_every_steps: int
    progress: bool


@dataclass(frozen=True)
class DescriberSettings(Section):
    SCHEMA = "describer"
    backend: str
    image_size: int
    seed: int
    negligible_fraction: float
    analysis_size: int
    max_words: int
    base_url: Optional[str]
    base_urls: Optional[list]
    server: str
    model: Optional[str]
    api_key_env: Optional[str]
    temperature: float
    max_tokens: int
    timeout_s: float
    request_deadline_s: float
    max_response_bytes: int
    max_answer_chars: int
    schedule: str
    max_staleness_steps: int
    min_usable_share: float
    min_answers_to_judge: int
    retries: int
    backoff_s: float
    max_concurrency: int
    send_images: bool
    prompt_template: str
    keep_alive: str
    num_ctx: int


@dataclass(frozen=True)
class EncoderSettings(Section):
    SCHEMA = "encoder"
    name: str
    weights: Optional[str]
    image_size: Optional[int]
    image_mean: Optional[list]
    image_std: Optional[list]
    text_adapter: bool
    freeze_text: bool
    adapted: Optional[str]
    adapted_by: Optional[str]
    seed: int
    min_retrieval_over_chance: float


@dataclass(frozen=True)
class CacheSettings(Section):
    SCHEMA = "cache"
    mode: str
    percentile: float
    skip_unchanged: Optional[bool]
    empty_vs_empty: Optional[float]
    reuse_cached_text: Optional[bool]
    policy: str
    redescribe_below_iou: float
    max_text_age_epochs: Optional[int]
    calls_per_epoch: Optional[int]
    calls_per_pair: Optional[float]
    reuse_min_iou: float


@dataclass(frozen=True)
class ObjectiveSettings(Section):
    SCHEMA = "objective"
    preset: str
    name: str
    text: str
    shuffle_texts: bool
    lambda_: float
    mix: str
    scale: float
    bias: float
    learn_scale_bias: bool
    image_side: str
    negatives_reduction: str
    grouping: str
    head_lr_scale: float
    head_warmup_steps: int
    lambda_mode: str
    target_grad_ratio: float
    max_lambda: float
    grad_log_every: int
    mask_same_group_negatives: bool
    alpha: float
    gamma: float
    normalise: str
    include_predicted_classes: bool
    negatives: int
    attn_heads: int
    adapter: str
    embedding_norm: str
    detach_bottleneck: bool
    concat_adapter_from: Optional[str]
    contrastive_validation: bool

    @property
    def uses_text(self) -> bool:
        return self.name != "none"


@dataclass(frozen=True)
class AdaptationSettings(Section):
    SCHEMA = "adaptation"
    kind: str
    init: str
    encoder_from: Optional[str]
    max_pairs: int
    epochs: int
    batch_size: int
    lr: float
    val_fraction: float
    seed: int
    train_image_tower: Optional[bool]


SECTIONS: dict[str, type[Section]] = {
    "data": DataSettings, "model": ModelSettings, "train": TrainSettings, "describer": DescriberSettings,
    "encoder": EncoderSettings, "cache": CacheSettings, "objective": ObjectiveSettings,
}


@dataclass(frozen=True)
class RunSettings:
    """One resolved run: its place in the matrix and every section, typed."""

    run_id: str
    init: Optional[str]
    prefill: bool
    description: str
    baseline: Optional[str]
    seed_of: Optional[str]
    data: DataSettings
    model: ModelSettings
    train: TrainSettings
    describer: DescriberSettings
    encoder: EncoderSettings
    cache: CacheSettings
    objective: ObjectiveSettings

    @classmethod
    def from_dict(cls, run: dict[str, Any]) -> "RunSettings":
        """From a resolved run (ttdl.core.config.resolve_run); a section it lacks gets the schema's defaults
        (the workflow drops the text sections of CE-only runs)."""
        missing = [key for key in RUN_KEYS if key not in run]
        if missing:
            raise ConfigError(f"run settings lack {missing} (resolve the run through ttdl.core.config first)")
        sections = {name: section.from_dict(run[name]) if name in run else section.from_partial({})
                    for name, section in SECTIONS.items()}
        return cls(**{key: run[key] for key in RUN_KEYS}, **sections)

    def to_dict(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return {k: v.to_dict() if isinstance(v, Section) else v for k, v in out.items()}

    def replace(self, **changes) -> "RunSettings":
        """A copy with whole sections or top-level fields replaced (sections: `train=run.train.replace(...)`)."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class AdaptationJob:
    """An adaptation job: the settings of its init run plus the adaptation block."""

    adaptation_id: str
    adaptation: AdaptationSettings
    run: RunSettings

    @classmethod
    def from_dict(cls, job: dict[str, Any]) -> "AdaptationJob":
        """From ttdl.core.config.resolve_adaptation's dict (what the workflow passes as --run-json)."""
        return cls(job["adaptation_id"], AdaptationSettings.from_dict(job["adaptation"]), RunSettings.from_dict(job))

    def replace(self, **changes) -> "AdaptationJob":
        return dataclasses.replace(self, **changes)
