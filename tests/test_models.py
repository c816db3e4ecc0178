"""Models: the registry, embedding sizes, and that padding never changes an embedding."""

from __future__ import annotations

import pytest
import torch

from pipeline.models import MODELS, build_model, count_parameters

# Small widths keep the test fast; the masking code paths are those of the full configs.
CONFIGS = {
    "type2branch": {"size": "small", "width": 32, "filters": 16, "dropout": 0.0},
    "bigru": {"hidden": 16},
    "typenet": {"hidden": 32, "dropout": 0.0},
    "transformer": {"d_model": 32, "feedforward": 64, "dropout": 0.0},
}


def sessions(lengths: list[int], max_len: int, garbage: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The same real keys for every call; padded positions zero, or random if ``garbage``."""
    real = torch.Generator().manual_seed(0)
    features = torch.rand(len(lengths), max(lengths), 3, generator=real)
    features[..., 0] = torch.randint(0, 256, features.shape[:2], generator=real) / 255
    mask = torch.arange(max_len) < torch.tensor(lengths)[:, None]
    padded = torch.rand(len(lengths), max_len, 3) * 50 if garbage else torch.zeros(len(lengths), max_len, 3)
    head = slice(0, max(lengths))
    padded[:, head] = torch.where(mask[:, head, None], features, padded[:, head])
    return padded, mask


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("training", [False, True])
def test_padding_does_not_change_the_embedding(name: str, training: bool) -> None:
    torch.manual_seed(0)
    model = build_model(name, embedding_size=24, **CONFIGS[name]).train(training)
    lengths = [37, 12, 1, 30]
    with torch.no_grad():
        short = model(*sessions(lengths, 40, garbage=False))
        long = model(*sessions(lengths, 100, garbage=True))
    assert short.shape == (4, 24)
    torch.testing.assert_close(short, long, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_train_on_a_batch_with_an_empty_session(name: str) -> None:
    model = build_model(name, **CONFIGS[name])
    features, mask = sessions([20, 0, 5], 30, garbage=True)
    model(features, mask).pow(2).mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_models_run_under_bf16_autocast_as_on_a_gpu(name: str) -> None:
    """configs/gpu.yaml trains in bf16: padded keys must be masked with bf16's own limits."""
    model = build_model(name, embedding_size=24, **CONFIGS[name])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        embeddings = model(*sessions([37, 12, 1, 30], 40, garbage=True))
    assert embeddings.shape == (4, 24) and torch.isfinite(embeddings.float()).all()


def test_registry_configs_and_parameter_counts() -> None:
    with torch.device("meta"):  # shapes only: the large config has ~80 M parameters
        small, large = build_model("type2branch", size="small"), build_model("type2branch", size="large")
    assert 0 < count_parameters(small) < count_parameters(large)
    assert build_model("typenet", features=["hold", "flight"], embedding_size=7)(
        torch.rand(2, 5, 2), torch.ones(2, 5, dtype=torch.bool)
    ).shape == (2, 7)
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="size"):
        build_model("type2branch", size="huge")


def test_reversing_real_keys_leaves_padding_in_place_and_undoes_itself() -> None:
    from pipeline.models.bigru import reverse_real_keys

    x = torch.arange(8.0).reshape(2, 4, 1)
    mask = torch.tensor([[True, True, True, False], [True, False, False, False]])
    reversed_ = reverse_real_keys(x, mask)
    assert reversed_[..., 0].tolist() == [[2, 1, 0, 3], [4, 5, 6, 7]]
    assert torch.equal(reverse_real_keys(reversed_, mask), x)
