"""SubjectEERLoss: the mean over a batch's subjects of each subject's own EER surrogate.

Why: EERLoss shapes one global threshold, and on real keystrokes it shows — EERLoss models have
the lowest global EER but a worse *mean per-subject* EER than MultiSimilarity's (the block KVC
reports beside the global one; docs/results.md, "Findings"). A subject whose genuine sessions
spread wide, or whose impostors crowd in, costs the global surrogate little as long as other
subjects make up for it at the shared threshold. Here every subject gets its own threshold and its own loss:
its rows' pairs with each other (genuine) and with every other row of the batch (impostor) —
the comparisons KVC's per-subject EER counts for it — searched and scored by an
:class:`~pipeline.losses.eer.EERLoss` with the same options.

Gradient: in subject ``s``'s term its own rows move, the other rows are constants (they enter as
the EERLoss's reference rows, ``memory=``); every impostor pair ``(i ∈ s, j ∈ t)`` is scored
twice, once from each side, so both of its rows move. The cost is one small EERLoss per
subject (``K × N`` pairs each; EERLoss's threshold search bins them only once a subject's
impostor pairs outnumber its histogram's bins): about the batch's pairs once more, in ``P``
calls. It is replicated across ranks (each computes every subject), like the other non-EERLoss
terms of a sum.

Measured (docs/results.md, "Tried, did not help"): beside EERLoss on real keystrokes it made
training unstable (validation EER swinging between 8 and 14 %, test EER 13.9 vs 8.5 % without
it, one seed), and with each subject's threshold held constant (``threshold_grad="detached"``)
the embeddings collapsed. A subject's ~28 genuine pairs leave few pairs near its threshold, so the implicit
gradient's slope ``∂F/∂d`` is small and noisy. A tool for experiments, not a recipe.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from pipeline.losses.eer import EERLoss


class SubjectEERLoss(nn.Module):
    """``mean_s EERLoss(rows of s, references = the other rows)`` over the batch's subjects ``s``."""

    def __init__(self, **eer_options: Any) -> None:
        super().__init__()
        if eer_options.get("threshold_momentum"):
            raise ValueError(
                "subject_eer: threshold_momentum is not supported (one running threshold cannot follow "
                "every subject's own); leave it out of this term's options"
            )
        self.eer = EERLoss(**eer_options)

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        terms = []
        for subject in labels.unique():
            own = labels == subject
            if own.sum() < 2 or own.all():
                continue  # a subject needs a genuine pair and an impostor to have an EER
            others = (embeddings[~own], labels[~own])
            terms.append(self.eer(embeddings[own], labels[own], memory=others))
        if not terms:
            raise ValueError("SubjectEERLoss needs a subject with two or more samples beside another subject")
        return torch.stack(terms).mean()
