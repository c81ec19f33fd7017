"""Loading models and tokenizers: hub ids, local directories, and the built-in tiny models.

Built-in models (``builtin:<name>``, :mod:`posttrain.builtin`) ship with the package as hash-checked weights and are
materialised on first use under ``$POSTTRAIN_CACHE`` (default ``~/.cache/posttrain``); they need no download.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from posttrain.builtin import BUILTIN_MODELS, builtin_model_dir, describe_builtin_models  # noqa: F401 (re-exported)
from posttrain.errors import UserError

logger = logging.getLogger(__name__)


def resolve_model_path(path: str, key: str = "model.path") -> str:
    """Map ``builtin:<name>`` to its cached directory; leave hub ids and local paths as they are."""
    from posttrain.paths import expand_home

    if path.startswith("builtin:"):
        return str(builtin_model_dir(path.split(":", 1)[1]))
    local = expand_home(path, key)
    if local.exists():
        if not (local / "config.json").exists() and not (local / "adapter_config.json").exists():
            raise UserError(f"{key}: '{path}' is a local path without config.json or adapter_config.json")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"{key}: local model directory '{path}' not found")
    parent = local.parent
    if str(parent) not in ("", ".") and parent.is_dir():  # runs/nope with a ./runs folder: a local path, not a hub id
        raise UserError(f"{key}: no directory '{path}' (a local path: './{parent}' exists in {Path.cwd()}; a run "
                        "directory is the output_dir of a finished run)")
    return path  # a hub id


def model_identity(spec) -> dict[str, str | None]:
    """A recipe ``model``'s identity: its ``path`` value, its ``revision`` and, for a local directory, the resolved
    absolute path (None for hub ids and built-in models)."""
    local = None
    if not spec.path.startswith("builtin:"):
        resolved = Path(resolve_model_path(spec.path))
        local = str(resolved.resolve()) if resolved.is_dir() else None
    return {"model": spec.path, "revision": spec.revision, "path": local}


def torch_dtype(name: str):
    import torch

    if name == "auto":
        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def load_tokenizer(path: str, *, trust_remote_code: bool = False, revision: str | None = None, key="model.path"):
    from transformers import AutoTokenizer

    resolved = resolve_model_path(path, key)
    try:
        tok = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code, revision=revision)
    except OSError as exc:
        raise UserError(f"{key}: cannot load a tokenizer from '{path}' ({_short(exc)})") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_options(spec) -> dict:
    """The keyword arguments of :func:`load_model` for a recipe's ``model:`` / ``ref_model:`` block."""
    return dict(dtype=spec.dtype, trust_remote_code=spec.trust_remote_code, revision=spec.revision,
                attn_implementation=spec.attn_implementation, device_map=spec.device_map,
                quantization=spec.quantization)


def _quantization_config(q, dtype):
    if q is None:
        return None
    from transformers import BitsAndBytesConfig

    compute = torch_dtype(q.bnb_4bit_compute_dtype) if q.bnb_4bit_compute_dtype else dtype
    return BitsAndBytesConfig(load_in_4bit=q.load_in_4bit, load_in_8bit=q.load_in_8bit,
                              bnb_4bit_quant_type=q.bnb_4bit_quant_type, bnb_4bit_compute_dtype=compute,
                              bnb_4bit_use_double_quant=q.bnb_4bit_use_double_quant)


def load_model(path: str, *, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
               attn_implementation: str | None = None, device_map: str | None = None, quantization=None,
               key: str = "model.path", head: str = "causal"):
    """Load a causal LM from a hub id, a local directory (full model or PEFT adapter), or a built-in name;
    ``head="score"``: the same checkpoint with a one-output sequence-classification head (a reward model; the head
    is new, initialised from the seed, unless the checkpoint has one)."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    resolved = resolve_model_path(path, key)
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision)
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    if device_map is not None:
        kwargs["device_map"] = device_map
    if quantization is not None:
        kwargs["quantization_config"] = _quantization_config(quantization, kwargs["dtype"])
    if head == "score":
        kwargs["num_labels"] = 1
    try:
        adapter = Path(resolved, "adapter_config.json").exists() and not Path(resolved, "config.json").exists()
        if adapter:
            from peft import AutoPeftModelForCausalLM, AutoPeftModelForSequenceClassification

            cls = AutoPeftModelForSequenceClassification if head == "score" else AutoPeftModelForCausalLM
            return cls.from_pretrained(resolved, **kwargs).merge_and_unload()
        cls = AutoModelForSequenceClassification if head == "score" else AutoModelForCausalLM
        return cls.from_pretrained(resolved, **kwargs)
    except OSError as exc:
        raise UserError(f"{key}: cannot load model '{path}' ({_short(exc)})") from None
    except (ValueError, ImportError) as exc:  # e.g. an attention kernel that is not installed or not supported
        root = key.rsplit(".", 1)[0]
        raise UserError(f"{root}: cannot load '{path}' with these options ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def model_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return json.dumps({"parameters": total, "trainable": trainable})
