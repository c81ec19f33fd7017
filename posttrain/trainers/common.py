"""Pieces every posttrain trainer shares: crash-safe checkpoints and resume, and the model card."""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

logger = logging.getLogger("posttrain")
COMPLETE_MARKER = "POSTTRAIN_COMPLETE"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")


def _fsync_tree(path: Path) -> None:
    for file in path.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())


class AtomicCheckpointMixin:
    """Checkpoints that a killed run cannot corrupt.

    HF writes ``checkpoint-N`` in place and then rotates old ones. Here rotation is deferred until the new
    checkpoint is fully written, synced to disk and marked complete (``POSTTRAIN_COMPLETE``); ``--resume`` only
    considers marked checkpoints, so a run killed mid-save resumes from the previous one.
    """

    # Set by posttrain.train.run: what the model card (posttrain.card) is written from.
    card_context = None

    def create_model_card(self, *args, **kwargs):
        """posttrain's card in ``output_dir/README.md``, instead of TRL's (which cannot name the base model of a
        posttrain run and says "fine-tuned version of [None]"). TRL calls this on every checkpoint save."""
        self.write_model_card(self.args.output_dir)

    def write_model_card(self, directory, checkpoint: bool = False) -> None:
        if not self.args.should_save:
            return
        from posttrain.card import last_metrics, minimal_card, model_card, write_card

        if self.card_context is None:
            base = getattr(getattr(self.model, "config", None), "_name_or_path", None)
            write_card(directory, minimal_card(getattr(self, "method", None), base))
            return
        text = model_card(self.card_context, metrics=last_metrics(self.state.log_history),
                          step=self.state.global_step, checkpoint=checkpoint)
        write_card(directory, text)

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """Every save (checkpoints and the final one) also writes the model card next to the weights."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        checkpoint = Path(output_dir).name.startswith("checkpoint-")
        self.write_model_card(output_dir, checkpoint=checkpoint)
        if checkpoint:  # the run folder's card follows the newest checkpoint (all families, not only TRL's)
            self.write_model_card(self.args.output_dir)

    def _save_checkpoint(self, model, trial):
        from transformers import trainer as hf_trainer

        limit = self.args.save_total_limit
        self.args.save_total_limit = None  # no rotation until the new checkpoint is complete
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            run_dir = Path(self._get_output_dir(trial=trial))
            ckpt = run_dir / f"checkpoint-{self.state.global_step}"
            _fsync_tree(ckpt)
            (ckpt / COMPLETE_MARKER).write_text("ok\n")
            hf_trainer.rotate_checkpoints(
                output_dir=str(run_dir),
                save_total_limit=limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )


def latest_complete_checkpoint(output_dir: str | Path, remove_incomplete: bool = True) -> str | None:
    """Newest ``checkpoint-N`` carrying the completion marker; incomplete ones (a killed save) are removed."""
    out = Path(output_dir)
    found = []
    for child in out.iterdir() if out.is_dir() else []:
        match = _CHECKPOINT_RE.match(child.name)
        if not match or not child.is_dir():
            continue
        if (child / COMPLETE_MARKER).exists():
            found.append((int(match.group(1)), child))
        elif remove_incomplete:
            logger.warning("removing incomplete checkpoint %s (interrupted save)", child)
            shutil.rmtree(child, ignore_errors=True)
    return str(max(found)[1]) if found else None
