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


LIGER_REFUSED = "error: training.logprob_head: liger cannot run here: liger-kernel runs on CUDA only (this model is on cpu)"


@pytest.fixture
def liger_refused_before_load(tmp_path, capsys, monkeypatch):
    """Check that ``posttrain train`` on a recipe (a dict, ``training.logprob_head: liger`` added) exits 2 with the one
    line :data:`LIGER_REFUSED`, no traceback, no output folder, and never loads a model (the loader is patched to fail)."""
    import yaml

    from posttrain.cli import main
    from posttrain.run import pipeline

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    def check(recipe: dict) -> None:
        monkeypatch.setattr(pipeline, "load_models", no_load)
        path = tmp_path / "liger.yaml"
        training = {**recipe.get("training", {}), "logprob_head": "liger"}
        path.write_text(yaml.safe_dump({**recipe, "output_dir": str(tmp_path / "out"), "training": training}))
        code = main(["train", str(path)])
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and [line for line in err if line.startswith("error:")] == [LIGER_REFUSED], err
        assert not any("Traceback" in line for line in err) and not (tmp_path / "out").exists()

    return check
