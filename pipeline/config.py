"""Training configuration: one YAML file, overridden by ``section.key=value`` on the command line.

Dataclasses rather than free dicts so that a typo in a config file or an override is an error
that names the key, not a silently ignored setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import typing
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

from pipeline.config_yaml import build_settings, config_text, parse_yaml

# Settings that name a file or folder: made absolute on the driver (workers run elsewhere).
PATH_KEYS: tuple[tuple[str, str], ...] = (
    ("run", "storage"), ("data", "shards"), ("wandb", "dir"), ("train", "init_from")
)


# The per-keystroke features a model can be fed (computed by pipeline/data/features.py). Named here,
# the lowest layer that needs them, so that a config is checked without importing the loaders.
FEATURES: tuple[str, ...] = ("keycode", "hold", "flight", "inter_release", "release_press")
DEFAULT_FEATURES: tuple[str, ...] = ("keycode", "hold", "flight")

MAX_LEN = 4096  # keys per session: far above any corpus's sessions (KVC's and Aalto's hold hundreds), and
# a bound on the loader's [B, max_len, F] arrays (100,000 took a 24 GiB machine to 96 % memory)


def _at_least(section: Any, minimum: float, *names: str) -> None:
    """Refuse the first of ``names`` below ``minimum``, naming the key."""
    prefix = getattr(section, "KEY", type(section).__name__.removesuffix("Section").lower())
    for name in names:
        if getattr(section, name) < minimum:
            raise ValueError(f"{prefix}.{name} must be ≥ {minimum}, got {getattr(section, name)}")


@dataclass
class RunSection:
    name: str = "eerpipe"  # relaunching the same name resumes from its checkpoints
    storage: str = "runs"  # local folder or s3://bucket/prefix; checkpoints go to storage/name
    seed: int = 0

    def __post_init__(self) -> None:
        from pipeline.cluster import check_run_name

        check_run_name(self.name)  # a run's files stay inside run.storage


@dataclass(frozen=True)
class HardBatchesSection:
    """Type2Branch's hard batches (docs/design.md §3, §8): seed subjects plus the subjects nearest
    to them by embedding centroid, recomputed with the current model. Off by default: a quick study
    found naive hard batches hurt both losses on real data, so this is a tool for experiments."""

    KEY: ClassVar[str] = "data.hard_batches"
    enabled: bool = False
    seeds: int = 2  # seed subjects per rank batch; each brings its neighbours, the rest of P is random
    start: int = 1  # neighbours per seed at start_step
    cap: int = 3  # neighbours per seed once the ramp is over
    start_step: int = 0  # steps trained on random batches before neighbours are used
    ramp_steps: int = 0  # steps over which the count grows linearly from start to cap
    every_epochs: int = 1  # centroids recomputed with the current model at every this many epochs' start
    sessions_per_centroid: int = 2  # sessions embedded per subject: ≈ sessions / (3 K) of an epoch's compute
    kind: Literal["nearest", "semihard"] = "nearest"  # semihard: the closest `skip` subjects are passed over
    skip: int = 1  # semihard only

    def __post_init__(self) -> None:
        _at_least(self, 1, "seeds", "cap", "every_epochs", "sessions_per_centroid", "skip")
        _at_least(self, 0, "start", "start_step", "ramp_steps")
        if self.start > self.cap:
            raise ValueError(f"{self.KEY}.start must be ≤ cap={self.cap}, got {self.start}")

    @property
    def passed_over(self) -> int:
        """How many of a subject's nearest subjects are never its neighbours."""
        return self.skip if self.kind == "semihard" else 0


@dataclass
class DataSection:
    shards: str = "shards"  # the shard set's folder or URL (its manifest.json)
    subjects_per_batch: int = 32  # P, per rank: the global batch holds P × num_workers subjects
    train_subjects: int = 0  # 0: the whole training split; N: its first shards holding ≥ N subjects (nested)
    sessions_per_subject: int = 8  # K
    max_len: int = 100
    features: list[str] = field(default_factory=lambda: list(DEFAULT_FEATURES))
    short_subjects: Literal["skip", "repeat"] = "skip"  # see pipeline/data/stream.py
    loader_workers: int = 0
    eval_batch_size: int = 1024
    hard_batches: HardBatchesSection = field(default_factory=HardBatchesSection)

    def __post_init__(self) -> None:
        _at_least(self, 1, "subjects_per_batch", "sessions_per_subject", "max_len", "eval_batch_size")
        _at_least(self, 0, "loader_workers", "train_subjects")
        if self.max_len > MAX_LEN:
            raise ValueError(f"data.max_len must be ≤ {MAX_LEN}, got {self.max_len}")
        self._check_features()
        hard = self.hard_batches
        if hard.enabled and hard.seeds * (1 + hard.cap) > self.subjects_per_batch:
            raise ValueError(
                f"{hard.KEY}: seeds × (1 + cap) = {hard.seeds * (1 + hard.cap)} subjects do not fit in "
                f"data.subjects_per_batch={self.subjects_per_batch}"
            )

    def _check_features(self) -> None:
        """Known feature names, each once: an unknown one would fail in every loader worker."""
        unknown = [name for name in self.features if not isinstance(name, str) or name not in FEATURES]
        if not self.features or unknown or len(set(self.features)) != len(self.features):
            raise ValueError(f"data.features must name distinct features of {list(FEATURES)}, got {self.features!r}")


@dataclass
class ModelSection:
    name: str = "typenet"
    embedding_size: int = 128
    options: dict[str, Any] = field(default_factory=dict)  # passed to the model's constructor

    def __post_init__(self) -> None:
        _at_least(self, 1, "embedding_size")


@dataclass
class MemorySection:
    """A cross-batch memory of earlier global batches (pipeline/training/memory.py); off by
    default: a naive memory raised the EER (docs/design.md §7)."""

    KEY: ClassVar[str] = "loss.memory"
    size: int = 0  # rows of the queue; 0: no memory
    start_step: int = 0  # the memory is filled and used from this step on
    encoder: Literal["momentum", "current"] = "momentum"  # who embeds the queue: an EMA copy of the model, or it
    momentum: float = 0.99  # after every optimizer step: copy = m · copy + (1 − m) · model

    def __post_init__(self) -> None:
        _at_least(self, 0, "size", "start_step")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"{self.KEY}.momentum must lie in [0, 1), got {self.momentum}")


@dataclass
class LossSection:
    name: str = "eer"
    options: dict[str, Any] = field(default_factory=dict)  # passed to the loss's constructor
    # sharded: each rank scores its share of the global batch's pairs (losses that can: eer);
    # replicated: every rank computes the whole loss. Both are exact (pipeline/losses/registry.py).
    pairs: Literal["sharded", "replicated"] = "sharded"
    memory: MemorySection = field(default_factory=MemorySection)

    def __post_init__(self) -> None:
        """The persistent threshold's momentum is checked here, naming its key; the loss's other
        options are checked when the driver builds it."""
        key, options = self.term_options("eer") or ("loss.options", {})
        momentum = options.get("threshold_momentum", 0.0)
        if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not 0 <= momentum < 1:
            raise ValueError(f"{key}.threshold_momentum must lie in [0, 1), got {momentum!r}")

    def term_options(self, term: str) -> tuple[str, dict[str, Any]] | None:
        """``(key, options)`` of the loss's ``term`` (the loss itself, or a term of a sum), e.g.
        ``term_options("eer")`` → ``("loss.options.eer", {...})``; ``None`` for a loss without it."""
        terms = self.name.split("+")
        if term not in terms:
            return None
        key, options = (("loss.options", self.options) if len(terms) == 1
                        else (f"loss.options.{term}", self.options.get(term)))
        return key, options if isinstance(options, dict) else {}

    @property
    def threshold_momentum(self) -> float:
        """The EERLoss term's persistent-threshold momentum; 0: a fresh threshold every batch."""
        _, options = self.term_options("eer") or ("", {})
        return float(options.get("threshold_momentum", 0.0))


@dataclass
class TrainSection:
    num_workers: int = 2  # Ray Train workers = data-parallel ranks
    use_gpu: bool = False
    epochs: int = 1  # ≥ 1
    steps: int = 0  # > 0: the schedule spans this many steps instead of `epochs` (equal steps on any shard set)
    max_steps: int = 0  # > 0: stop after this many steps (the schedule still spans `epochs` or `steps`)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: Literal["cosine", "constant"] = "cosine"  # after warm-up
    grad_clip: float = 1.0
    zero_stage: Literal[0, 1, 2] = 0  # not 3: the exports read the weights whole from rank 0
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: GPU
    log_every: int = 10
    val_every: int = 0  # steps between validations; 0: at each epoch end only
    checkpoint_every: int = 0  # steps between checkpoints; 0: at each epoch end only
    num_to_keep: int = 2
    max_failures: int = 0
    stop_after_epochs: int = 0  # > 0: stop (checkpointed) after this many epochs, as if preempted
    init_from: str = ""  # an exported model (file, folder or run) whose weights start a fresh run
    stages: list[dict[str, Any]] = field(default_factory=list)  # staged training: TrainConfig.stage

    def __post_init__(self) -> None:
        _at_least(self, 1, "num_workers", "epochs", "log_every", "num_to_keep")
        _at_least(self, 0, "steps", "max_steps", "warmup_steps", "val_every", "checkpoint_every", "max_failures",
                  "stop_after_epochs", "lr", "weight_decay", "grad_clip")


@dataclass
class EvalSection:
    protocol: Literal["session", "kvc"] = "session"  # session pairs, or KVC's enrolment sets (evaluation/protocol.py)
    # impostor comparisons per (verification) session: other sessions or enrolment sets;
    # "all": every one (FMR 0.1 % needs thousands)
    impostors_per_session: int | Literal["all"] = 10
    enrolment_sessions: int = 5  # kvc: enrolment sessions per subject; the rest are verified
    distance: Literal["cosine", "euclidean"] = "cosine"  # scores are −distance (EERLoss and PML losses normalise)

    def __post_init__(self) -> None:
        if self.impostors_per_session != "all":
            _at_least(self, 1, "impostors_per_session")
        _at_least(self, 1, "enrolment_sessions")


@dataclass
class WandbSection:
    enabled: bool = True
    project: str = "eerpipe"
    # auto: online when W&B has a login (WANDB_API_KEY or `wandb login`), else offline (sync later)
    mode: Literal["auto", "online", "offline", "disabled"] = "auto"
    # default: the run's folder; W&B's files go to {dir}/wandb, copied there at each checkpoint when it is
    # remote (s3://)
    dir: str = ""


@dataclass
class TrainConfig:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    loss: LossSection = field(default_factory=LossSection)
    train: TrainSection = field(default_factory=TrainSection)
    eval: EvalSection = field(default_factory=EvalSection)
    wandb: WandbSection = field(default_factory=WandbSection)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return build_settings(cls, data, "")

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> "TrainConfig":
        """Read a YAML file (or the defaults), then apply ``section.key=value`` overrides."""
        data: dict[str, Any] = {}
        if path is not None:
            loaded = parse_yaml(config_text(Path(path)), str(path))
            if not isinstance(loaded, dict):
                raise ValueError(f"{path}: a config file must hold a mapping of sections")
            data = loaded
        for override in overrides:
            key, sep, value = override.partition("=")
            if not sep or "." not in key:
                raise ValueError(f"override {override!r} must look like section.key=value")
            where, parsed = f"override {override!r}", parse_yaml(value, f"override {override!r}")
            stage_key = STAGE_OVERRIDE.fullmatch(key)
            if stage_key:
                _set_in_stage(data, stage_key[1], stage_key[2], parsed, where)
            else:
                _set(data, key, parsed, where)
        return cls.from_dict(data)

    def __post_init__(self) -> None:
        for index in range(len(self.train.stages)):
            self.stage(index)  # every stage's settings are checked with the file's, naming the stage

    def stage(self, index: int) -> "TrainConfig":
        """Stage ``index`` of a staged run (``train.stages``): this config without its stages, with
        the stage's overrides (``section.key: value``, or nested under the section's name); a
        mapping-valued setting such as ``loss.options`` is replaced whole, as on the command
        line. A stage that does not make a valid config is refused in one line naming it."""
        stage = self.train.stages[index]
        where = f"train.stages[{index}]"
        if not isinstance(stage, dict) or not isinstance(stage.get("name"), str):
            raise ValueError(f"{where} must be a mapping of a name and the settings it overrides, got {stage!r}")
        from pipeline.cluster import check_run_name

        check_run_name(stage["name"], f"{where}.name")  # its runs live in a folder named after it
        where = f"{where} ({stage['name']})"
        data = self.to_dict()
        data["train"]["stages"] = []
        try:
            for key, value in self.stage_settings(index).items():
                _refuse_in_stage(key)
                _set(data, key, value, key)
            return TrainConfig.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{where}: {error}") from None

    def stage_settings(self, index: int) -> dict[str, Any]:
        """The settings stage ``index`` overrides, by ``section.key``."""
        return dict(_settings({key: value for key, value in self.train.stages[index].items() if key != "name"}))

    @property
    def final_stage(self) -> "TrainConfig":
        """The config a run ends with: its last stage's, or its own when it has no stages."""
        return self.stage(len(self.train.stages) - 1) if self.train.stages else self

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def with_absolute_paths(self) -> "TrainConfig":
        """Local paths resolved against this process's folder: workers and jobs run elsewhere."""
        data = self.to_dict()
        for section, key in PATH_KEYS:
            data[section][key] = absolute(data[section][key])
        return TrainConfig.from_dict(data)

    @property
    def run_dir(self) -> str:
        """``{storage}/{name}``: the run's checkpoints, exports and W&B files."""
        return f"{self.run.storage}/{self.run.name}"

    def digest(self) -> str:
        """Digest of every setting that can change what training produces: not the run's name,
        how many worker failures it tolerates (resuming is exact) or where it logs."""
        settings = self.to_dict()
        del settings["run"]["name"], settings["train"]["max_failures"], settings["wandb"]
        if not self.loss.memory.size:  # no memory: the digests (arm run names) of configs before it
            del settings["loss"]["memory"]
        if not self.data.hard_batches.enabled:  # off trains as before the setting existed: same digest
            del settings["data"]["hard_batches"]
        if not self.train.stages:  # a run without stages keeps its digest (its arm name) too
            del settings["train"]["stages"]
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


# What a stage may not override: the staged run's identity and its one W&B run; and what every
# stage shares, since each stage after the first starts from the previous stage's weights.
NOT_PER_STAGE = ("run", "wandb", "model", "data.features", "train.stages", "train.init_from")


# ``train.stages[1].train.lr=1e-2`` or ``train.stages[eer].train.lr=1e-2``: one stage's setting
STAGE_OVERRIDE = re.compile(r"train\.stages\[([^\]]+)\]\.(\w+\..+)")


def _set_in_stage(data: dict[str, Any], selector: str, key: str, value: Any, where: str) -> None:
    """Set ``key`` in the stage of ``data``'s ``train.stages`` that ``selector`` names (its index
    or its name), over the stage's own value of it, whichever form the file gave it in."""
    stages = data.get("train", {}).get("stages") or []
    names = [stage.get("name") if isinstance(stage, dict) else None for stage in stages]
    index = int(selector) if selector.isdigit() else names.index(selector) if selector in names else None
    if index is None or index >= len(stages):
        raise ValueError(f"{where}: train.stages has no stage {selector!r} (its stages: {names})")
    stage = stages[index]
    settings = dict(_settings({name: setting for name, setting in stage.items() if name != "name"}))
    stages[index] = {"name": stage["name"], **settings, key: value}


def _refuse_in_stage(key: str) -> None:
    for setting in NOT_PER_STAGE:
        if key == setting or key.startswith(f"{setting}."):
            raise ValueError(f"{key} is the staged run's, not a stage's: set it outside train.stages")


def _settings(overrides: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    """A stage's overrides as ``(section.key, value)`` pairs: a mapping under a section's name
    (``train: {lr: 6e-3}``) stands for that section's keys."""
    for key, value in overrides.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and _is_section(dotted):
            yield from _settings(value, f"{dotted}.")
        else:
            yield dotted, value


def _is_section(dotted: str) -> bool:
    """Whether ``dotted`` (``data.hard_batches``) names a section of settings, not a setting."""
    section: Any = TrainConfig
    for part in dotted.split("."):
        hint = typing.get_type_hints(section).get(part) if dataclasses.is_dataclass(section) else None
        if hint is None or not dataclasses.is_dataclass(hint):
            return False
        section = hint
    return True


def _set(data: dict[str, Any], key: str, value: Any, where: str) -> None:
    """Set the setting ``key`` (``section.key``) of a config's ``data`` to ``value``."""
    node = data
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ValueError(f"{where}: {part!r} is not a section")
    node[leaf] = value


def absolute(path: str) -> str:
    """A local path (or ``file://`` URL) made absolute; URLs and ``""`` unchanged."""
    if path.startswith("file://") or (path and "://" not in path):
        return str(Path(path.removeprefix("file://")).resolve())
    return path
