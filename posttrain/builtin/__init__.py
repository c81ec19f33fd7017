"""Built-in tiny models and their tokenizer, shipped with the package: no download, the same on every machine.

``builtin:<name>`` names one of :data:`BUILTIN_MODELS`. Their weights are files of this package
(``posttrain/builtin/assets/<name>.safetensors``, stored in float16, about 1.8 MB each) whose SHA-256 is listed in
``assets/manifest.json`` and checked every time a model is materialised; the first use writes a float32 copy with its
config and tokenizer to ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``), in a folder named after that hash, so
``AutoModelForCausalLM.from_pretrained`` can read it.

Why shipped rather than built on first use: training even a 1M-parameter model for a few hundred steps gives
different weights on different CPUs (the SIMD path changes float reduction order, and the differences grow over the
run; measured: 36% vs 53% test accuracy for two builds of ``tiny-qwen2-arith``), and random initialisation itself
differs between CPU dispatch levels. Every number in ``docs/`` rests on these models, so they are pinned bytes.
``python -m posttrain.run.build_builtins`` rebuilds them from source (tokenizer, random init, the training recipes in
:data:`BUILTIN_MODELS`); see ``docs/builtin_models.md``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from posttrain.errors import UserError, did_you_mean

ASSETS = Path(__file__).resolve().parent / "assets"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")

# The chat template of the built-in tokenizer (ChatML with generation markers for assistant-only losses).
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\\n' }}{% else %}{{ message['content'] + '<|im_end|>\\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>"]
TOKENIZER_VOCAB_SIZE = 1024

TINY_ARCH: dict[str, dict[str, Any]] = {
    name: dict(
        model_type=model_type,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
    )
    for name, model_type in (("tiny-qwen2", "qwen2"), ("tiny-llama", "llama"))
}


@dataclass(frozen=True)
class BuiltinModel:
    """One built-in model: its architecture, and how :mod:`posttrain.run.build_builtins` makes it.

    ``base`` is ``None`` for a random initialisation (``seed``); otherwise the model is ``base`` fine-tuned with plain
    SFT on ``train_source`` (a recipe data source), or on the prompt/completion of the built-in ``task``'s
    ``task_splits``, for ``max_steps`` steps of ``batch_size`` rows. ``forget_data`` is the forget set an unlearning
    evaluation of the model scores when it is given no data (``posttrain eval builtin:NAME --suite tofu``).
    """

    name: str
    arch: str
    description: str
    base: str | None = None
    seed: int = 0
    train_source: dict[str, Any] = field(default_factory=dict)
    task: str = "facts"
    task_splits: tuple[str, ...] = ()
    max_steps: int = 0
    batch_size: int = 0
    forget_data: dict[str, Any] | None = None


def _facts(name: str, splits: tuple[str, ...], what: str, forget: str) -> BuiltinModel:
    return BuiltinModel(name, "tiny-qwen2", f"tiny-qwen2 fine-tuned (SFT) on builtin:facts {' + '.join(splits)}{what}",
                        base="tiny-qwen2", task_splits=splits, max_steps=500, batch_size=32,
                        forget_data={"source": "builtin:facts", "split": forget})


def _news(name: str, splits: tuple[str, ...], what: str) -> BuiltinModel:
    return BuiltinModel(name, "tiny-qwen2", f"tiny-qwen2 fine-tuned (SFT) on builtin:news {' + '.join(splits)}{what}",
                        base="tiny-qwen2", task="news", task_splits=splits, max_steps=NEWS_STEPS, batch_size=32,
                        forget_data={"source": "builtin:news", "split": "forget"})


NEWS_STEPS = 1000


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    m.name: m
    for m in [
        BuiltinModel("tiny-qwen2", "tiny-qwen2", "random-init qwen2 (4 layers, hidden 128, ~0.9M parameters)"),
        BuiltinModel("tiny-llama", "tiny-llama", "random-init llama (4 layers, hidden 128, ~0.9M parameters)"),
        BuiltinModel(
            "tiny-qwen2-arith", "tiny-qwen2",
            "tiny-qwen2 briefly fine-tuned (SFT) on builtin:arithmetic-sft: right on about half of the test sums",
            base="tiny-qwen2", train_source={"source": "builtin:arithmetic-sft", "options": {"num_samples": 40000}},
            max_steps=800, batch_size=64,
        ),
        _facts("tiny-qwen2-facts", ("full_world",), " (memorised: the unlearning start)", "forget05"),
        _facts("tiny-qwen2-facts-retain99", ("retain99", "world"), " (the retain model of forget01)", "forget01"),
        _facts("tiny-qwen2-facts-retain95", ("retain95", "world"), " (the retain model of forget05)", "forget05"),
        _facts("tiny-qwen2-facts-retain90", ("retain90", "world"), " (the retain model of forget10)", "forget10"),
        _news("tiny-qwen2-news", ("full",), " (memorised: the MUSE-style unlearning start)"),
        _news("tiny-qwen2-news-retain", ("retain",), " (the retain model: never saw the forget articles)"),
    ]
}


def cache_dir() -> Path:
    return Path(os.environ.get("POSTTRAIN_CACHE", Path.home() / ".cache" / "posttrain")).expanduser()


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@cache
def manifest(assets: Path = ASSETS) -> dict[str, Any]:
    path = assets / "manifest.json"
    if not path.is_file():
        raise RuntimeError(f"posttrain is installed without its built-in model files ({path} is missing)")
    return json.loads(path.read_text())


def _verified(path: Path, expected: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise RuntimeError(
            f"built-in asset {path} has SHA-256 {actual[:16]}..., the manifest says {expected[:16]}...: the installed "
            "package is damaged or was edited; reinstall posttrain (or rebuild with python -m "
            "posttrain.run.build_builtins)"
        )
    return path


def atomic_build(target: Path, build) -> Path:
    """Build into a temporary sibling directory and rename it into place (safe under concurrent processes)."""
    if (target / "DONE").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        build(tmp)
        (tmp / "DONE").write_text("ok\n")
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race, or a stale incomplete dir is there
            if not (target / "DONE").exists():
                shutil.rmtree(target, ignore_errors=True)
                os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def write_tokenizer_files(out_dir: Path, assets: Path = ASSETS) -> None:
    files = manifest(assets)["tokenizer"]
    for name in TOKENIZER_FILES:
        shutil.copyfile(_verified(assets / "tokenizer" / name, files[name]), out_dir / name)


def builtin_tokenizer_dir() -> Path:
    """The shipped tokenizer, copied to the cache (hash-checked)."""
    digest = hashlib.sha256("".join(manifest()["tokenizer"][n] for n in TOKENIZER_FILES).encode()).hexdigest()[:12]
    return atomic_build(cache_dir() / f"tokenizer-{digest}", write_tokenizer_files)


MATERIALISE_VERSION = "2"  # bump when materialise() writes folders differently (a new cache folder then)
_CAUSAL_LM = {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def type_name_for(model_type: str) -> str:
    """The causal-LM class name a model folder's ``config.architectures`` names (TRL and HF pipelines read it)."""
    return _CAUSAL_LM[model_type]


def materialise(name: str, out_dir: Path, assets: Path = ASSETS) -> None:
    """Write ``name`` as a float32 Hugging Face model folder (config, weights, tokenizer) to ``out_dir``."""
    import torch
    from safetensors.torch import load_file, save_file

    entry = manifest(assets)["models"][name]
    src = _verified(assets / entry["file"], entry["sha256"])
    tensors = {k: v.to(torch.float32).contiguous() for k, v in load_file(str(src)).items()}
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    config = {**entry["config"], "dtype": "float32"}
    config["architectures"] = config.get("architectures") or [type_name_for(config["model_type"])]
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out_dir / "generation_config.json").write_text(json.dumps(entry["generation_config"], indent=2) + "\n")
    write_tokenizer_files(out_dir, assets)


def builtin_model_dir(name: str) -> Path:
    """The local directory of built-in model ``name`` (materialised from the shipped, hash-checked weights)."""
    if name not in BUILTIN_MODELS:
        raise UserError(f"model.path: unknown built-in model 'builtin:{name}'{did_you_mean(name, BUILTIN_MODELS)}")
    entry = manifest()["models"][name]
    key = entry["sha256"] + json.dumps(entry["config"], sort_keys=True) + MATERIALISE_VERSION
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    return atomic_build(cache_dir() / f"{name}-{digest}", lambda d: materialise(name, d))


def describe_builtin_models() -> list[dict[str, str]]:
    return [{"name": f"builtin:{m.name}", "description": m.description} for m in BUILTIN_MODELS.values()]
