"""Experiments: the same training budget, one varied setting, compared on held-out subjects.

Every arm is a training run (Ray Train + DeepSpeed, :func:`pipeline.training.train`) named after
its loss and the digest of its whole config, in the same storage. So an interrupted experiment
resumes arm by arm, a finished arm is only re-scored, an arm whose settings changed is trained
afresh (never continued from a stale run), a crashed worker resumes its arm from the last
checkpoint (up to 3 times; resuming is exact), and experiments share identical arms (the ablation's
``eer-area`` is the batch-size experiment's ``P16`` at the default batch). All arms share the
config file, the shards, the seed, the steps and the optimizer; an arm changes only what its
overrides say. An arm may be a staged recipe (``train.stages``, in the config file or the arm's
overrides): it is compared at its steps and sessions summed over its stages, and counts as ours
when its last stage trains EERLoss. Each arm validates and checkpoints at the same steps (each
stage of a staged arm at the same share of its own), which gives the validation-EER-vs-step curves.

Outputs in ``out``: ``results.md`` and ``results.json`` (the final validation EER, which choices
are made on; the test split, under both verification
protocols — session against session, and KVC's enrolment sets (``kvc_`` keys): global EER, mean
per-subject EER, AUC, FNMR at FMR 1 % and 0.1 %; steps to reach the best baseline's final
validation EER, steps and training sessions seen, training wall time; ``test_impostors`` when the
test split was scored with its own count of impostors per session), ``det.png`` (one DET curve
per arm, session protocol) and ``val_eer.png``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import TrainConfig

if TYPE_CHECKING:  # the command line loads scoring (torch, sklearn) only when an arm is scored
    from pipeline.evaluation.protocol import Impostors
    from pipeline.metrics.verification import Roc

# The losses compared by `eerpipe experiment ablation`, scored by cosine distance (the geometry
# EERLoss and pytorch-metric-learning's losses train) except Set2set, which trains raw distances.
# Arms set single keys, never a whole section, so the shared overrides (applied first) survive
# wherever the arm does not set the same key.
ABLATION_ARMS: dict[str, list[str]] = {
    "eer-area": ["loss.name=eer"],
    "eer-area-authors": [  # the authors' form: raw embeddings, hard floor (docs/archive/research-notes.md)
        "loss.name=eer", "loss.options.normalize=false", "loss.options.floor=hard", "eval.distance=euclidean"
    ],
    "eer-direct": ["loss.name=eer", "loss.options.variant=direct"],
    # EERLoss with a dense MultiSimilarity term beside it (docs/results.md, "Tried, did not help")
    "eer+multisimilarity": [
        "loss.name=eer+multisimilarity", "loss.options.weights.multisimilarity=200"
    ],
    "eer+subject-eer": ["loss.name=eer+subject_eer"],  # each subject's own EER beside the global one
    "set2set": ["loss.name=set2set", "eval.distance=euclidean"],
    "triplet-all": ["loss.name=triplet_all"],
    "triplet-semihard": ["loss.name=triplet"],
    "contrastive": ["loss.name=contrastive"],
    "multisimilarity": ["loss.name=multisimilarity"],
    "arcface": ["loss.name=arcface"],
}
MEMORY_ENCODERS = ("momentum", "current")


def chosen_arms(names: list[str]) -> dict[str, list[str]]:
    """The named ablation arms (all of them for none); an unknown name is refused, listing the choices."""
    unknown = sorted(set(names) - set(ABLATION_ARMS))
    if unknown:
        raise ValueError(f"unknown arm(s) {unknown}; choose from {sorted(ABLATION_ARMS)}")
    return {name: ABLATION_ARMS[name] for name in names or ABLATION_ARMS}


def named_arms(specs: list[str]) -> dict[str, list[str]]:
    """Arms from ``NAME: OVERRIDES`` (the overrides shell-quoted and space-separated; none: the
    config as it is), or a one-line error naming the spec."""
    import re
    import shlex

    arms: dict[str, list[str]] = {}
    for spec in specs:
        name, colon, overrides = (part.strip() for part in spec.partition(":"))
        if not colon or not re.fullmatch(r"[\w.+-]+", name):
            raise ValueError(f"--arm {spec!r} must look like 'NAME: section.key=value …' (a name of letters, digits, "
                             "'.', '+', '-' or '_')")
        if name in arms:
            raise ValueError(f"--arm {spec!r}: an arm named {name!r} is given twice")
        arms[name] = shlex.split(overrides)
    return arms


def memory_arms(losses: list[str], sizes: list[int], encoders: list[str]) -> dict[str, list[str]]:
    """Each loss arm without a memory (size 0: the ablation's own arm, hence the same run) and
    with every size and encoder, e.g. ``eer-area-mem4096-momentum``."""
    if not set(encoders) <= set(MEMORY_ENCODERS):
        raise ValueError(f"unknown memory encoder(s) {sorted(set(encoders) - set(MEMORY_ENCODERS))}; "
                         f"choose from {list(MEMORY_ENCODERS)}")
    arms = {}
    for name, overrides in chosen_arms(losses).items():
        for size in sizes:
            if size == 0:
                arms[name] = overrides
            for encoder in encoders if size else ():
                memory = [f"loss.memory.size={size}", f"loss.memory.encoder={encoder}"]
                arms[f"{name}-mem{size}-{encoder}"] = [*overrides, *memory]
    return arms


def operating_point_arms(
    fmr: float, threshold_momentum: float | None = None, band: float | None = None
) -> dict[str, list[str]]:
    """EERLoss trained for the EER and for FNMR at ``fmr`` (``target-eer``, ``target-fmr-0.001``);
    with a ``threshold_momentum``, also for ``fmr`` at a persistent threshold
    (``target-fmr-0.001-persistent``: the per-batch threshold of a low FMR is set by a batch's
    few hardest impostor pairs, so it is noisy); with a ``band``, also for the FMR band
    ``[fmr, band]`` (``target-fmr-band-0.001-0.004``, :mod:`pipeline.losses.fmr_band`)."""
    if threshold_momentum is not None and not 0 < threshold_momentum < 1:
        raise ValueError(f"--threshold-momentum must lie in (0, 1), got {threshold_momentum:g} "
                         "(0 is the plain FMR arm)")
    if band is not None and not fmr < band < 1:
        raise ValueError(f"--band must lie above --fmr ({fmr:g}) and below 1, got {band:g}")
    fmr_arm = ["loss.name=eer", f"loss.options.target.fmr={fmr}"]
    arms = {"target-eer": ["loss.name=eer"], f"target-fmr-{fmr:g}": fmr_arm}
    if threshold_momentum is not None:
        arms[f"target-fmr-{fmr:g}-persistent"] = [*fmr_arm, f"loss.options.threshold_momentum={threshold_momentum}"]
    if band is not None:
        arms[f"target-fmr-band-{fmr:g}-{band:g}"] = ["loss.name=fmr_band", f"loss.options.low={fmr}",
                                                     f"loss.options.high={band}"]
    return arms


def subjects_arms(sizes: list[int], control: str | None = None) -> tuple[dict[str, list[str]], dict[str, str]]:
    """An arm per training-set size (``subjects-1000``, ``subjects-all`` for 0), and with a
    ``control`` config, that config's arm at each size beside it (``subjects-1000-control``):
    the arms and the arms' own config files, for :func:`run_experiment`."""
    arms, configs = {}, {}
    for size in sizes:
        name = f"subjects-{size or 'all'}"
        arms[name] = [f"data.train_subjects={size}"]
        if control:
            arms[f"{name}{CONTROL_SUFFIX}"], configs[f"{name}{CONTROL_SUFFIX}"] = arms[name], control
    return arms, configs


CONTROL_SUFFIX = "-control"  # arm X-control is X's baseline: the summary reports X's lead over it
OURS = "eer"  # arms whose loss is this, or a sum with it, are "ours"; the others are baselines


@dataclass
class Arm:
    """One trained and scored arm of an experiment."""

    name: str
    overrides: list[str]
    loss: str  # a staged arm's losses in order: multisimilarity-then-eer
    ours: bool  # its (last stage's) loss is EERLoss or a sum with it
    run_dir: str
    curve: list[tuple[int, float]]  # (step, validation EER)
    seconds: float  # training wall time, summed over the launches of the run
    steps: int  # summed over a staged arm's stages, as are the sessions
    sessions: int  # training sessions seen
    train_subjects: int  # subjects of the training set (data.train_subjects rounds up to whole shards)
    report: dict[str, Any]  # session protocol
    kvc_report: dict[str, Any]  # KVC enrolment-set protocol
    groups: dict[str, dict[str, float | None]]  # a participant list's name: its test subjects' metrics
    det: Roc  # session protocol, for the DET plot (not its comparisons: every pair of a split is large)


def run_experiment(
    config_path: str | None,
    shards: str,
    out: str | Path,
    arms: dict[str, list[str]],
    *,
    overrides: list[str] | tuple[str, ...] = (),
    validations: int = 10,
    show_progress: bool = True,
    arm_configs: Mapping[str, str] | None = None,
    participants: Mapping[str, Path] | None = None,
    test_impostors: Impostors | None = None,
) -> list[Arm]:
    """Train and score every arm; write the tables and figures; return the arms. ``arm_configs``
    gives an arm its own config file instead of ``config_path`` (a recipe's control);
    ``participants`` names lists of test subjects (one per source of a combined benchmark) that
    are also scored on their own; ``test_impostors`` scores the test split with that many impostors
    per session instead of the validation's count (every pair on test, a sample to validate). An
    experiment run again finds its arms trained and only scores them."""
    from pipeline.evaluation.commands import embed_split
    from pipeline.training import train
    from pipeline.training.schedule import training_shards
    from sharding.format import load_manifest

    # every arm's settings are checked before the first one trains for an hour
    arm_configs = arm_configs or {}
    configs = {name: _arm_config(arm_configs.get(name, config_path), shards, [*overrides, *arm_overrides], validations)
               for name, arm_overrides in arms.items()}
    manifest = load_manifest(shards)
    participants = participants or {}
    _check_participants(participants, manifest)
    setting = "eval.impostors_per_session" if test_impostors is None else "--test-impostors"  # named if too large
    for name, config in configs.items():
        _check_test_scoring_fits(name, config, manifest, test_impostors, setting)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name, arm_overrides in arms.items():
        config = configs[name]
        result = train(config, show_progress=show_progress)
        report, kvc_report, curve, groups = _test_reports(embed_split(result.best_model, shards, split="test"),
                                                          participants, test_impostors, setting)
        subjects = sum(shard.samples for shard in training_shards(config.final_stage, manifest))
        results.append(
            Arm(name, arm_overrides, recipe_loss(config), OURS in config.final_stage.loss.name.split("+"),
                result.run_dir, result.curve, result.metrics["time/train_s"], result.metrics["step"], result.sessions,
                subjects, report, kvc_report, groups, curve)
        )
    _write(out, results, test_impostors)
    return results


def _test_reports(
    embedded: Any, participants: Mapping[str, Path], impostors: Impostors | None, setting: str
) -> tuple[dict[str, Any], dict[str, Any], Roc, dict[str, dict[str, float | None]]]:
    """An arm's test reports under both protocols, its session ROC and each participant list's
    metrics; the comparisons themselves (every pair of a large split: gigabytes) end here."""
    sessions, kvc = embedded.score("session", impostors, setting), embedded.score("kvc", impostors, setting)
    groups = {group: _both_protocols(embedded.only(path), impostors, setting) for group, path in participants.items()}
    return sessions.report, kvc.report, sessions.curve, groups


def _arm_config(config_path: str | None, shards: str, overrides: list[str], validations: int) -> TrainConfig:
    from pipeline.cluster import arm_run_name
    from sharding.format import load_manifest

    config = TrainConfig.load(config_path, [f"data.shards={shards}", *overrides])
    _refuse_overridden_by_every_stage(config, overrides)
    manifest = load_manifest(shards)
    stages = config.train.stages
    for index, stage in enumerate(stages):  # each stage validated as often over its own steps
        every = _validation_interval(config.stage(index), manifest, validations)
        stages[index] = {**stage, "train.val_every": every, "train.checkpoint_every": every}
    if not stages:
        config.train.val_every = config.train.checkpoint_every = _validation_interval(config, manifest, validations)
    config.train.num_to_keep = 1000  # every validated checkpoint is a point of the curve
    config.train.max_failures = max(config.train.max_failures, 3)  # a crashed worker resumes the arm
    config.run.name = arm_run_name(recipe_loss(config), config.digest())
    return config


def _check_participants(participants: Mapping[str, Path], manifest: Any) -> None:
    """Each list readable and naming at least two test subjects: refused before the first arm
    trains, not after."""
    from sharding.participants import read_participants

    test_shards = {shard.name for shard in manifest.shards_of("test")}
    test = {subject for subject, shard in manifest.subjects.items() if shard in test_shards}
    for path in participants.values():
        if len(test.intersection(read_participants(path))) < 2:
            raise ValueError(f"{path}: lists fewer than 2 of the test split's subjects")


def _check_test_scoring_fits(
    name: str, config: TrainConfig, manifest: Any, test_impostors: Impostors | None, setting: str
) -> None:
    """The arm's test scoring under both protocols fits in memory (every impostor pair of a large
    split may not): refused before any arm trains, naming the setting that asked for it."""
    from dataclasses import asdict

    from pipeline.evaluation.protocol import check_report_fits, protocol_from

    settings = asdict(config.final_stage.eval)
    if test_impostors is not None:
        settings = {**settings, "impostors_per_session": test_impostors}
    test = manifest.shards_of("test")
    sessions, subjects = sum(shard.sessions for shard in test), sum(shard.samples for shard in test)
    for protocol in ("session", "kvc"):
        check_report_fits(protocol_from(settings, protocol), sessions, subjects, f"arm {name}, the test split",
                          setting)


def _refuse_overridden_by_every_stage(config: TrainConfig, overrides: list[str]) -> None:
    """An override that every stage of a staged recipe sets again (``loss.name=…`` on a recipe
    whose stages each name their loss) would change nothing, and arms that differ only by it would
    train the same recipe under different names: refuse it, naming the way that works."""
    stages = [config.stage_settings(index) for index in range(len(config.train.stages))]
    for key in (override.partition("=")[0] for override in overrides):
        if stages and all(_sets(stage, key) for stage in stages):
            raise ValueError(f"{key} is set by every stage of train.stages, so overriding it changes nothing; "
                             "give the arm its own train.stages instead")


def _sets(stage: dict[str, Any], key: str) -> bool:
    """Whether a stage's settings set ``key``, or a setting holding it (``loss.options``)."""
    return any(key == setting or key.startswith(f"{setting}.") for setting in stage)


def _validation_interval(config: TrainConfig, manifest: Any, validations: int) -> int:
    """Steps between a run's validations (and checkpoints): ``validations`` of them over its steps."""
    from pipeline.training.schedule import schedule_of

    return max(1, schedule_of(config, manifest).stop_step // validations)


def recipe_loss(config: TrainConfig) -> str:
    """The loss of a run, or a staged run's losses in order (``multisimilarity-then-eer``)."""
    stages = [config.stage(index) for index in range(len(config.train.stages))] or [config]
    return "-then-".join(stage.loss.name for stage in stages)


def steps_to_reach(curve: list[tuple[int, float]], target: float) -> int | None:
    """First validated step whose EER is at or below ``target``; ``None`` if never."""
    return next((step for step, value in curve if value <= target), None)


def _write(out: Path, arms: list[Arm], test_impostors: Impostors | None) -> None:
    from matplotlib.figure import Figure

    from pipeline.metrics import plot_det

    baselines = [arm for arm in arms if not arm.ours and arm.curve]
    best_baseline = min(baselines, key=lambda arm: arm.curve[-1][1]) if baselines else None
    rows = []
    for arm in arms:
        reached = steps_to_reach(arm.curve, best_baseline.curve[-1][1]) if best_baseline else None
        rows.append(
            {
                "arm": arm.name,
                "loss": arm.loss,
                "overrides": arm.overrides,
                "run_dir": arm.run_dir,
                **_test_metrics(arm.report),
                **_test_metrics(arm.kvc_report, "kvc_"),
                "groups": arm.groups,
                "final_val_eer": arm.curve[-1][1] if arm.curve else None,
                "steps_to_best_baseline": reached,
                "steps": arm.steps,
                "sessions": arm.sessions,
                "train_subjects": arm.train_subjects,
                "wall_s": arm.seconds,
                "val_curve": arm.curve,
            }
        )
    (out / "results.json").write_text(json.dumps(
        {"best_baseline": best_baseline and best_baseline.name, "test_impostors": test_impostors, "arms": rows},
        indent=2))
    scored = "" if test_impostors is None else f"\nTest split scored with {test_impostors} impostors per session.\n"
    (out / "results.md").write_text(_markdown(rows, best_baseline.name if best_baseline else None) + scored)
    plot_det({arm.name: arm.det for arm in arms}, out / "det.png")

    figure = Figure(figsize=(6.4, 4.4), layout="constrained")
    axes = figure.subplots()
    for arm in arms:
        steps, values = zip(*arm.curve) if arm.curve else ((), ())
        axes.plot(steps, [100 * v for v in values], marker="o", markersize=3, label=arm.name)
    axes.set(xlabel="step", ylabel="validation EER (%)", title="Validation EER during training")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small", ncols=2)
    figure.savefig(out / "val_eer.png", dpi=120)


def _both_protocols(embedded: Any, impostors: Impostors | None, setting: str) -> dict[str, float | None]:
    """The test metrics of an embedded split under both protocols (``kvc_`` keys for KVC's)."""
    return {**_test_metrics(embedded.score("session", impostors, setting).report),
            **_test_metrics(embedded.score("kvc", impostors, setting).report, "kvc_")}


def _test_metrics(report: dict[str, Any], prefix: str = "") -> dict[str, float | None]:
    glob = report["global"]
    return {
        f"{prefix}eer": glob["eer"],
        f"{prefix}per_subject_eer": report.get("mean_per_subject", {}).get("eer"),
        f"{prefix}auc": glob["auc"],
        f"{prefix}fnmr_at_fmr_1%": glob["fnmr_at_fmr_1%"],
        f"{prefix}fnmr_at_fmr_0.1%": glob["fnmr_at_fmr_0.1%"],
    }


def _markdown(rows: list[dict[str, Any]], best_baseline: str | None) -> str:
    def pct(value: float | None) -> str:
        return "–" if value is None else f"{100 * value:.2f}"

    measured = ("eer", "per_subject_eer", "auc", "fnmr_at_fmr_1%", "fnmr_at_fmr_0.1%")
    titles = ("EER", "mean per-subject EER", "AUC", "FNMR@1%FMR", "FNMR@0.1%FMR")
    lines = [
        "| arm | loss | final val EER % | " + " | ".join(f"{t} %" for t in titles) + " | "
        + " | ".join(f"KVC {t} %" for t in titles)
        + f" | steps to {best_baseline or 'best baseline'}'s final val EER | steps | sessions | wall s |",
        "|:--|:--|" + "--:|" * (2 * len(titles) + 5),
    ]
    for row in rows:
        reached = "–" if row["steps_to_best_baseline"] is None else str(row["steps_to_best_baseline"])
        cells = [pct(row[key]) for key in measured] + [pct(row[f"kvc_{key}"]) for key in measured]
        lines.append(
            f"| {row['arm']} | {row['loss']} | {pct(row['final_val_eer'])} | " + " | ".join(cells)
            + f" | {reached} | {row['steps']} | {row['sessions']} | {row['wall_s']:.0f} |"
        )
    return "\n".join(lines) + "\n"
