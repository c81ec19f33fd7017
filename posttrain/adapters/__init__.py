"""LoRA variants (PLoRA, GOAT, LoRA-GGPO). Public names are imported lazily (peft/transformers are heavy)."""

from __future__ import annotations

import importlib

_EXPORTS = {
    "plora": ("PLoRACallback", "PLoRAMixin", "merge_and_reinit", "plora_unload_", "make_periodic_scheduler",
              "merged_state_dict", "export_merged", "reset_optimizer_state"),
    "goat": ("apply_goat", "save_goat", "load_goat", "goat_aux_loss", "clear_goat_aux", "goat_token_mask",
             "goat_metrics", "GOATTrainerMixin", "GoatLinear", "GOATSettings"),
    "ggpo": ("GGPOPerturbation", "GGPOTrainerMixin", "check_ggpo_reference_model"),
    "trainer": ("make_trainer", "wrap_trainer_class", "prepare_model", "mixin_kwargs", "check_reference",
                "load_adapter_run", "run_adapter_type"),
    "spec": ("PLoRASpec", "GOATSpec", "GGPOSpec", "PEFT_TYPES", "MERGEABLE"),
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
