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
    if path.startswith("builtin:"):
        return str(builtin_model_dir(path.split(":", 1)[1]))
    local = Path(path).expanduser()
    if local.exists():
        if not (local / "config.json").exists() and not (local / "adapter_config.json").exists():
            raise UserError(f"{key}: '{path}' is a local path without config.json or adapter_config.json")
        return str(local)
    if path.startswith((".", "/", "~")) or path.count("/") > 1:
        raise UserError(f"{key}: local model directory '{path}' not found")
    return path  # a hub id


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


def load_model(path: str, *, dtype: str = "auto", trust_remote_code: bool = False, revision: str | None = None,
               key: str = "model.path"):
    """Load a causal LM from a hub id, a local directory (full model or PEFT adapter), or a built-in name."""
    from transformers import AutoModelForCausalLM

    resolved = resolve_model_path(path, key)
    kwargs = dict(dtype=torch_dtype(dtype), trust_remote_code=trust_remote_code, revision=revision)
    try:
        if Path(resolved, "adapter_config.json").exists() and not Path(resolved, "config.json").exists():
            from peft import AutoPeftModelForCausalLM

            return AutoPeftModelForCausalLM.from_pretrained(resolved, **kwargs).merge_and_unload()
        return AutoModelForCausalLM.from_pretrained(resolved, **kwargs)
    except OSError as exc:
        raise UserError(f"{key}: cannot load model '{path}' ({_short(exc)})") from None


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] + ("..." if len(text) > 200 else "")


def model_summary(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return json.dumps({"parameters": total, "trainable": trainable})
