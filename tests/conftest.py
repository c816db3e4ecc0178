"""Shared fixtures: a real S3 endpoint (moto server) on 127.0.0.1; tests marked ``gpu`` skipped
without CUDA.

``s3_endpoint`` (session): starts the server, points the AWS environment at it (endpoint,
dummy credentials, region) for the rest of the session, creates :data:`S3_BUCKET`, and
yields the endpoint URL. ``s3_url`` (per test): a fresh, empty ``s3://`` prefix in it.
``one_rank`` (per test): a one-rank gloo process group for DeepSpeed in the test's process.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator

import pytest

from pipeline.cluster import use_local_ray_settings
from tests.loopback import free_port

use_local_ray_settings()  # before anything imports ray: local clusters on 127.0.0.1 only
S3_BUCKET = "eerpipe-test"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip the ``gpu``-marked tests on a machine without CUDA (this one and CI have none), saying
    why, so that ``make test`` passes everywhere and ``make test-gpu`` runs them on a GPU."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU: torch.cuda.is_available() is False here "
                                   "(make test-gpu runs these on a GPU machine)")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)


@pytest.fixture
def one_rank(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A one-rank gloo process group for DeepSpeed in this process (its CPU accelerator), torn
    down after the test."""
    import torch
    from deepspeed.utils import groups

    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "RANK": "0", "WORLD_SIZE": "1",
                       "LOCAL_RANK": "0", "DS_ACCELERATOR": "cpu"}.items():
        monkeypatch.setenv(key, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    groups._WORLD_GROUP = None  # DeepSpeed keeps a clone of the destroyed group for the next engine


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    with pytest.MonkeyPatch.context() as env:
        env.setenv("AWS_ENDPOINT_URL", endpoint)
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
            env.delenv(name, raising=False)
        boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=S3_BUCKET)
        try:
            yield endpoint
        finally:
            server.stop()


@pytest.fixture
def s3_url(s3_endpoint: str, request: pytest.FixtureRequest) -> str:
    """``s3://eerpipe-test/<test name>-<random>``: empty, private to the calling test."""
    name = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40]
    return f"s3://{S3_BUCKET}/{name}-{uuid.uuid4().hex[:8]}"
