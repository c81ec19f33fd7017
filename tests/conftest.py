import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Built-in models and tokenizers are built offline into a cache; keep the test one inside the checkout (gitignored).
os.environ.setdefault("POSTTRAIN_CACHE", str(ROOT / ".cache" / "posttrain-test"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_model_dir():
    from posttrain.models import builtin_model_dir

    return builtin_model_dir("tiny-qwen2")


@pytest.fixture(scope="session")
def arith_model_dir():
    from posttrain.models import builtin_model_dir

    return builtin_model_dir("tiny-qwen2-arith")


@pytest.fixture
def reference_cache(tmp_path, monkeypatch):
    """The precomputed references of a test (``posttrain.logprobs.reference``) cached in its own folder; the list
    of the passes that computed one (its length: how many)."""
    from posttrain.logprobs import reference as R

    passes = []
    compute = R._compute

    def counted(*args, **kwargs):
        passes.append(1)
        return compute(*args, **kwargs)

    monkeypatch.setattr(R, "reference_cache_dir", lambda: tmp_path / "reference-cache")
    monkeypatch.setattr(R, "_compute", counted)
    return passes
