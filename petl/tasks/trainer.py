"""The Trainer of task runs: petl's atomic checkpoints plus the chunk-and-aggregate loss.

Multiple choice and extractive QA use the model's own loss (transformers heads compute it from
``labels`` / ``start_positions``, ``end_positions``) and generative runs the causal-LM loss; those
pass straight through. Document classification batches are [B, C, T] chunk tensors: the loss is
computed here, on the pooled document logits, so a PeftModel stays the Trainer's model and peft's
adapter-only checkpoints and resume work unchanged.
"""
from __future__ import annotations

from typing import Any

from petl.tasks.aggregate import chunked_forward, classification_loss
from petl.train.checkpointing import AtomicCheckpointTrainer


class TaskTrainer(AtomicCheckpointTrainer):
    """``AtomicCheckpointTrainer`` that pools chunk logits for document classification.

    Args:
        aggregate (str, Optional): ``max`` / ``mean`` / ``logsumexp``; None disables chunk handling.
        multi_label (bool): binary cross-entropy over labels instead of cross-entropy.
        mean_loss (bool): the loss is a batch mean (every head except causal LM). Default: True.
        **kwargs: ``transformers.Trainer`` arguments.
    """

    def __init__(self, *args: Any, aggregate: str | None = None, multi_label: bool = False,
                 mean_loss: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.petl_aggregate = aggregate
        self.petl_multi_label = multi_label
        if mean_loss:
            # Classification / QA / multiple-choice heads return a per-batch mean that ignores
            # num_items_in_batch; tell Trainer so it divides by the accumulation steps itself.
            self.model_accepts_loss_kwargs = False

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        if self.petl_aggregate is None or "chunk_mask" not in inputs:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        labels = inputs["labels"]
        logits = chunked_forward(model, inputs, self.petl_aggregate)  # [B, L]
        loss = classification_loss(logits, labels, self.petl_multi_label)
        return (loss, {"logits": logits}) if return_outputs else loss
