"""PETL-AST adapter rows of the shared adapter matrix (tests/adapter_matrix.py), plus the checks the
matrix cannot run on them: BatchNorm statistics, bfloat16 without merging, and refusal to merge."""
from __future__ import annotations

import pytest
import torch

from .adapter_matrix import BF16_REL_TOL, CHECKS, AdapterRow, perturb_adapter, rel_err, train_steps

NUM_LABELS = 5
_NOT_WEIGHTS = "not a weight change (extra tokens or a non-linear block): merging is undefined"
_MERGE_IN_BF16 = "the shared bf16 check ends with merge_and_unload; see test_bf16_without_merge"
_HEAD_DTYPE = "the head is a peft modules_to_save copy, which peft keeps in the base dtype"


def tiny_ast(seed: int = 0):
    """A 2-layer AST (width 32) on 128 mel x 100 frames: a 12 x 9 patch grid plus CLS and distillation."""
    from transformers import ASTConfig, ASTForAudioClassification

    config = ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                       max_length=100, num_labels=NUM_LABELS)
    torch.manual_seed(seed)
    return ASTForAudioClassification(config).eval()


def ast_inputs(seed: int = 1) -> dict:
    gen = torch.Generator().manual_seed(seed)
    return {"input_values": torch.randn(2, 100, 128, generator=gen),
            "labels": torch.randint(0, NUM_LABELS, (2,), generator=gen)}


def _config(**kwargs):
    def make():
        from petl.adapters.audio import AudioAdapterConfig

        return AudioAdapterConfig(**kwargs)
    return make


def _row(name: str, skip: dict | None = None, **kwargs) -> AdapterRow:
    kwargs.setdefault("modules_to_save", [])
    return AdapterRow(name, _config(**kwargs), tiny_ast, imports=("petl.adapters.audio",), make_inputs=ast_inputs,
                      loss=lambda out, inputs: out.loss, output=lambda out: out.logits, skip=skip or {})


_UNMERGEABLE = {"merge_unmerge": _NOT_WEIGHTS, "merge_and_unload": _NOT_WEIGHTS, "dtype_bf16": _MERGE_IN_BF16}
_BATCHNORM = {"only_adapter_params_change": "BatchNorm running statistics (adapter buffers) change in training; "
                                            "see test_only_adapter_state_changes"}

ROWS = [
    _row("ast-conformer-pfeiffer", skip={**_UNMERGEABLE, **_BATCHNORM}, reduction_rate=8, kernel_size=5),
    _row("ast-conformer-houlsby-cls-head", skip={**_UNMERGEABLE, **_BATCHNORM, "dtype_bf16": _HEAD_DTYPE},
         adapter_type="houlsby",
         reduction_rate=8, kernel_size=3, pooling="cls", modules_to_save=None),
    _row("ast-bottleneck-sequential-after", skip=_UNMERGEABLE, method="bottleneck", placement="sequential",
         position="after", reduction_rate=8),
    _row("ast-bottleneck-mhsa-sequential-before", skip=_UNMERGEABLE, method="bottleneck", location="mhsa",
         placement="sequential", position="before", reduction_rate=8),
    _row("ast-bottleneck-parallel-after-residual", skip=_UNMERGEABLE, method="bottleneck", position="after",
         residual=True, reduction_rate=16),
    _row("ast-convpass", skip=_UNMERGEABLE, method="convpass", reduction_rate=8, dropout=0.0),
    _row("ast-prompt-deep", skip=_UNMERGEABLE, method="prompt", num_tokens=4),
    _row("ast-prompt-shallow-cls", skip=_UNMERGEABLE, method="prompt", num_tokens=3, deep=False, pooling="cls"),
    _row("ast-prefix", skip=_UNMERGEABLE, method="prefix", num_tokens=6),
    _row("ast-lora-native", method="lora", reduction_rate=8, pooling="native"),
    _row("ast-bitfit-native", method="bitfit", pooling="native"),
    _row("ast-lora-mean-head", skip={"merge_unmerge": "checked with pooling='native' rows",
                                     "merge_and_unload": "mean pooling has no plain-AST form; see test_merge_refusals",
                                     "dtype_bf16": _HEAD_DTYPE},
         method="lora", reduction_rate=8, modules_to_save=None),
]

CASES = [pytest.param(row, check, id=f"{row.name}-{check}") for row in ROWS for check in CHECKS]


@pytest.mark.parametrize(("row", "check"), CASES)
def test_audio_adapter_matrix(row, check, tmp_path):
    if check in row.skip:
        pytest.skip(f"{row.name} does not support {check}: {row.skip[check]}")
    CHECKS[check](row, tmp_path)


def _belongs_to(name: str, adapter: str) -> bool:
    return f".{adapter}." in name or name.endswith(f".{adapter}")


def _cast(inputs: dict, dtype: torch.dtype) -> dict:
    return {k: v.to(dtype) if v.dtype.is_floating_point else v for k, v in inputs.items()}


def _adapter_state(model) -> set[str]:
    return {k for k in model.state_dict() if _belongs_to(k, "default")}


@pytest.mark.parametrize("row", [r for r in ROWS if "only_adapter_params_change" in r.skip], ids=lambda r: r.name)
def test_only_adapter_state_changes(row):
    """Training changes every trainable tensor and the adapters' BatchNorm statistics, nothing else."""
    model = row.peft_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    adapter_state = _adapter_state(model)
    assert trainable <= adapter_state
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(row, model)
    for key, value in model.state_dict().items():
        changed = not torch.equal(value, before[key])
        statistic = key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")
        expected = key in trainable or (statistic and key in adapter_state)
        assert changed == expected, f"{key}: changed={changed}, expected={expected}"


@pytest.mark.parametrize("row", [r for r in ROWS if r.skip.get("dtype_bf16") == _MERGE_IN_BF16], ids=lambda r: r.name)
def test_bf16_without_merge(row):
    """bfloat16 base: float32 adapter state, bf16 outputs within the matrix's bf16 bound, finite grads."""
    ref = row.peft_model(torch.float32)
    perturb_adapter(ref)
    model = row.peft_model(torch.bfloat16)
    model.load_state_dict({k: v for k, v in ref.state_dict().items() if k in _adapter_state(ref)}, strict=False)
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    inputs = _cast(row.make_inputs(), torch.bfloat16)
    out = row.run(model, inputs)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, row.run(ref)) < BF16_REL_TOL
    row.loss(model(**inputs), inputs).backward()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)


def test_merge_refusals():
    """Merging is refused with a one-line reason where it would change the model's function."""
    from peft import get_peft_model

    from petl.adapters.audio import AudioAdapterConfig, NotMergeableError

    model = get_peft_model(tiny_ast(), AudioAdapterConfig(reduction_rate=8, kernel_size=3))
    with pytest.raises(NotMergeableError, match="cannot be merged"):
        model.merge_and_unload()
    with pytest.raises(NotMergeableError, match="cannot be merged"):
        model.merge_adapter()
    lora = get_peft_model(tiny_ast(), AudioAdapterConfig(method="lora", reduction_rate=8))
    with pytest.raises(NotMergeableError, match="pooling='native'"):
        lora.merge_and_unload()
    assert type(get_peft_model(tiny_ast(), AudioAdapterConfig(reduction_rate=8)).unload()).__name__ == \
        "ASTForAudioClassification"


def test_different_methods_on_one_model_are_refused():
    from peft import get_peft_model

    from petl.adapters.audio import AudioAdapterConfig

    model = get_peft_model(tiny_ast(), AudioAdapterConfig(method="lora", reduction_rate=8))
    with pytest.raises(ValueError, match="same method"):
        model.add_adapter("other", AudioAdapterConfig(method="prefix", num_tokens=2))

