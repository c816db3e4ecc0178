"""One training arm of the EERLoss-recipe study (issue 8), single process, CPU.

Every arm sees the same data, model initialisation, batches and optimizer; only the loss (and,
where an arm says so, the schedule) differs. Data: synthetic desktop subjects at the default
difficulty (``SynthCorpus("desktop", seed=0, difficulty=1.0)``), subjects ``0..train-1`` for
training and ``EVAL_OFFSET..EVAL_OFFSET+eval-1`` held out. Evaluation (KVC-like, fixed for all
arms): per held-out subject, sessions 0–4 enrol and 5–14 verify; a genuine score is minus the mean
distance of a verification session to the subject's 5 enrolment sessions, and each subject gets
``IMPOSTORS_PER_SUBJECT`` impostor scores from verification sessions of other held-out subjects
(drawn once, seed 0). The distance is the one the loss trains (cosine for normalised losses).

    nice -n 10 .venv/bin/python -m experiments.recipe --arm triplet_all --loss triplet_all --steps 1000
    nice -n 10 .venv/bin/python -m experiments.recipe --arm eer_a0.1 --loss eer --eer '{"alpha": 0.1}'

Writes ``experiments/results/<arm>.json``: config, EER vs step, final official report.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from pytorch_metric_learning import distances, losses

from pipeline.data import featurize
from pipeline.losses import EERLoss, pair_distances
from pipeline.losses.registry import build_loss
from pipeline.metrics import eer, verification_report
from pipeline.models import count_parameters
from pipeline.models.layers import KeystrokeInput, MaskedBatchNorm, masked_mean
from sharding.synth import SynthCorpus

EVAL_OFFSET = 1_000_000
ENROL = 5
IMPOSTORS_PER_SUBJECT = 40
RESULTS = Path(__file__).parent / "results"
CACHE = Path("/tmp/eer_recipe_cache")


def load_features(first: int, count: int, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``[count, 15, L, F]`` features and ``[count, 15, L]`` masks, cached across arms."""
    path = CACHE / f"desktop_s0_d1_{first}_{count}_{max_len}.npz"
    if path.exists():
        cached = np.load(path)
        return cached["x"], cached["m"]
    corpus = SynthCorpus("desktop", seed=0, difficulty=1.0)
    sessions = [list(corpus.subject(i).values()) for i in range(first, first + count)]
    per_subject = min(len(s) for s in sessions)
    x, m = featurize([s for subject in sessions for s in subject[:per_subject]], max_len=max_len)
    x, m = x.reshape(count, per_subject, *x.shape[1:]), m.reshape(count, per_subject, -1)
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(path, x=x, m=m)
    return x, m


def batches(subjects: int, sessions: int, p: int, k: int, steps: int, seed: int):
    """The same (subject, session) index arrays for every arm."""
    rng = np.random.default_rng(seed)
    for _ in range(steps):
        who = rng.choice(subjects, p, replace=False)
        which = np.stack([rng.choice(sessions, k, replace=False) for _ in who])
        yield np.repeat(who, k), which.reshape(-1)


class SmallBiGRU(torch.nn.Module):
    """The study's model: keycode embedding + timings → BiGRU → masked mean → linear.

    A plain (unpacked) BiGRU: at ``max_len`` 50 nearly every session fills the window (96 % of
    keys are real), and an unpacked GRU trains ~10× faster on CPU than the packed TypeNet LSTMs,
    which is what lets every arm run 1,000 steps on this machine. Padding is masked at the input
    and in the pooling.
    """

    def __init__(self, hidden: int, embedding_size: int) -> None:
        super().__init__()
        self.input = KeystrokeInput()
        self.norm = MaskedBatchNorm(self.input.out_features)
        self.gru = torch.nn.GRU(self.input.out_features, hidden, batch_first=True, bidirectional=True)
        self.project = torch.nn.Linear(2 * hidden, embedding_size)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h, _ = self.gru(self.norm(self.input(features), mask))
        return self.project(masked_mean(h, mask))


class BatchAllTriplet(torch.nn.Module):
    """pytorch-metric-learning triplet loss over all triplets of the batch (no miner)."""

    def __init__(self, margin: float, normalize: bool = True) -> None:
        super().__init__()
        self.loss = losses.TripletMarginLoss(
            margin=margin, distance=distances.LpDistance(normalize_embeddings=normalize)
        )

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(embeddings, labels)


class Mixed(torch.nn.Module):
    """EERLoss plus ``weight`` × a batch-all triplet term (issue 8, hypothesis 4)."""

    def __init__(self, eer_loss: EERLoss, weight: float, margin: float) -> None:
        super().__init__()
        self.eer_loss, self.triplet, self.weight = eer_loss, BatchAllTriplet(margin), weight

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.eer_loss(embeddings, labels) + self.weight * self.triplet(embeddings, labels)


def build_arm_loss(args: argparse.Namespace) -> tuple[torch.nn.Module, bool]:
    """The loss, and whether evaluation should compare normalised embeddings."""
    eer_kwargs = json.loads(args.eer)
    if args.loss == "triplet_registry":
        return build_loss("triplet", args.embedding), True
    if args.loss == "triplet_all":
        return BatchAllTriplet(args.margin), True
    if args.loss == "eer":
        loss = EERLoss(**eer_kwargs)
        return loss, loss.distance == "cosine" or getattr(loss, "normalize", False)
    if args.loss == "eer+triplet":
        return Mixed(EERLoss(**eer_kwargs), args.mix_weight, args.margin), True
    raise ValueError(args.loss)


def embed(model: torch.nn.Module, x: np.ndarray, m: np.ndarray, chunk: int = 1024) -> torch.Tensor:
    model.eval()
    flat_x, flat_m = torch.from_numpy(x.reshape(-1, *x.shape[2:])), torch.from_numpy(m.reshape(-1, m.shape[2]))
    with torch.no_grad():
        out = torch.cat([model(flat_x[i : i + chunk], flat_m[i : i + chunk]) for i in range(0, len(flat_x), chunk)])
    model.train()
    return out.view(x.shape[0], x.shape[1], -1)


def comparisons(subjects: int, sessions: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference subject, probe subject, probe session) of every comparison; fixed by seed 0."""
    rng = np.random.default_rng(0)
    verify = np.arange(ENROL, sessions)
    ref, probe_subject, probe_session = [], [], []
    for s in range(subjects):
        ref += [s] * len(verify)
        probe_subject += [s] * len(verify)
        probe_session += list(verify)
        others = rng.choice(np.delete(np.arange(subjects), s), IMPOSTORS_PER_SUBJECT)
        ref += [s] * IMPOSTORS_PER_SUBJECT
        probe_subject += list(others)
        probe_session += list(rng.choice(verify, IMPOSTORS_PER_SUBJECT))
    return np.array(ref), np.array(probe_subject), np.array(probe_session)


def scores(emb: torch.Tensor, normalize: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(labels, scores, reference subjects) of the fixed protocol; score = −mean distance to enrolment."""
    if normalize:
        emb = torch.nn.functional.normalize(emb, dim=-1)
    ref, probe_subject, probe_session = comparisons(emb.shape[0], emb.shape[1])
    enrol = emb[torch.from_numpy(ref), :ENROL]  # [C, 5, D]
    probe = emb[torch.from_numpy(probe_subject), torch.from_numpy(probe_session)]  # [C, D]
    distance = (enrol - probe[:, None]).norm(dim=-1).mean(1)
    return (ref == probe_subject).astype(int), -distance.double().numpy(), ref


def batch_eer(embeddings: torch.Tensor, labels: np.ndarray, normalize: bool) -> float:
    """Exact EER of the last training batch's pairs: how separable the loss has made its own batch."""
    embeddings = embeddings.detach()
    if normalize:
        embeddings = torch.nn.functional.normalize(embeddings, dim=-1)
    genuine, impostor = pair_distances(embeddings, torch.from_numpy(labels))
    truth = np.r_[np.ones(genuine.numel()), np.zeros(impostor.numel())]
    return eer(truth, -torch.cat([genuine, impostor]).double().numpy())[0]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arm", required=True)
    parser.add_argument("--loss", required=True, choices=["triplet_registry", "triplet_all", "eer", "eer+triplet"])
    parser.add_argument("--eer", default="{}", help="EERLoss keyword arguments as JSON")
    parser.add_argument("--margin", type=float, default=1.0, help="batch-all triplet margin")
    parser.add_argument("--mix-weight", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=0, help="linear LR warm-up steps")
    parser.add_argument("--p", type=int, default=32)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--train", type=int, default=3000)
    parser.add_argument("--eval", type=int, default=400)
    parser.add_argument("--max-len", type=int, default=50)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--embedding", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--init", default=None, help="state_dict to start from (warm start)")
    parser.add_argument("--save", default=None, help="where to save the final state_dict")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    train_x, train_m = load_features(0, args.train, args.max_len)
    eval_x, eval_m = load_features(EVAL_OFFSET, args.eval, args.max_len)
    torch.manual_seed(args.seed)
    model = SmallBiGRU(args.hidden, args.embedding)
    if args.init:
        model.load_state_dict(torch.load(args.init))
    loss_fn, normalize = build_arm_loss(args)
    optimizer = torch.optim.Adam([*model.parameters(), *loss_fn.parameters()], lr=args.lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, args.warmup)))

    def evaluate() -> float:
        labels, values, _ = scores(embed(model, eval_x, eval_m), normalize)
        return eer(labels, values)[0]

    curve, losses_seen, start = [], [], time.time()
    stream = batches(args.train, train_x.shape[1], args.p, args.k, args.steps, args.seed)
    for step, (who, which) in enumerate(stream, 1):
        features, mask = torch.from_numpy(train_x[who, which]), torch.from_numpy(train_m[who, which])
        embeddings = model(features, mask)
        loss = loss_fn(embeddings, torch.from_numpy(who))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses_seen.append(loss.item())
        if step % args.eval_every == 0 or step == args.steps:
            curve.append({"step": step, "eer": evaluate(), "batch_eer": batch_eer(embeddings, who, normalize),
                          "loss": float(np.mean(losses_seen[-args.eval_every :])),
                          "seconds": round(time.time() - start, 1)})
            print(args.arm, curve[-1], flush=True)
    labels, values, refs = scores(embed(model, eval_x, eval_m), normalize)
    report = verification_report(labels, values, refs)
    RESULTS.mkdir(exist_ok=True)
    config = {k: v for k, v in vars(args).items() if k not in ("threads",)}
    config["parameters"] = count_parameters(model)
    config["loss_repr"] = repr(loss_fn)  # the resolved options, defaults included
    (RESULTS / f"{args.arm}.json").write_text(json.dumps({"config": config, "curve": curve, "report": report}, indent=1))
    if args.save:
        torch.save(model.state_dict(), args.save)
    print(args.arm, "final global EER", round(100 * report["global"]["eer"], 2), "%", flush=True)


if __name__ == "__main__":
    main()
