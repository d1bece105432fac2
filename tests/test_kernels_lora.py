"""Fused LoRA training kernels (petl.kernels.fuse_lora and the functions under it).

CPU: every autograd Function against peft's unfused computation in float64 (outputs and every
gradient, random upstream gradients, odd shapes); tiny Llama/Mistral/Qwen2 models fused vs
unfused; save/load/merge after fusing; Triton kernels in Triton's interpreter (the ``*_interpreted``
tests, run in a child pytest by tests/interpreter_child.py, so TRITON_INTERPRET does not leak into
other test modules). GPU: bf16 kernels against float64 with
the rule written in ``_assert_kernel_error``.
"""
from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

from petl.kernels import fuse_lora, is_fused, unfuse_lora
from petl.kernels.cross_entropy import linear_cross_entropy
from petl.kernels.lora_linear import lora_projections
from petl.kernels.lora_mlp import lora_swiglu_mlp
from petl.kernels.lora_modules import kernel_plan, lora_projection
from petl.testing import tiny_causal_lm
from tests.interpreter_child import HAS_TRITON, child_only, in_child, run_child_pytest

F64 = torch.float64
CHILD_ENV = "PETL_LORA_KERNELS_CHILD"
IN_CHILD = in_child(CHILD_ENV)
child = child_only(CHILD_ENV)


def _peft(module: nn.Module, targets: list[str], r: int = 3, **kwargs):
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=r, lora_alpha=2 * r + 1, target_modules=targets, init_lora_weights=False, **kwargs)
    return get_peft_model(module, cfg)


def _lora_params(peft_model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


def _grads(x: torch.Tensor, params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {"x": x.grad.clone()}
    out.update({n: p.grad.clone() for n, p in params.items()})
    x.grad = None
    for p in params.values():
        p.grad = None
    return out


def _assert_close(a: dict, b: dict, rtol: float = 1e-10) -> None:
    assert a.keys() == b.keys()
    for key in a:
        scale = b[key].abs().max().item() + 1e-30
        assert (a[key] - b[key]).abs().max().item() <= rtol * scale, key


class _QKV(nn.Module):
    def __init__(self, k: int, n_q: int, n_kv: int) -> None:
        super().__init__()
        self.q_proj = nn.Linear(k, n_q, bias=True)
        self.k_proj = nn.Linear(k, n_kv, bias=False)
        self.v_proj = nn.Linear(k, n_kv, bias=True)


class _MLP(nn.Module):
    def __init__(self, k: int, inter: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(k, inter, bias=False)
        self.up_proj = nn.Linear(k, inter, bias=False)
        self.down_proj = nn.Linear(inter, k, bias=True)


@pytest.mark.parametrize("tokens,k,n_q,n_kv,targets", [(13, 37, 29, 11, ["q_proj", "k_proj"]),
                                                       (1, 5, 7, 3, ["q_proj", "k_proj", "v_proj"]),
                                                       (31, 16, 16, 8, ["v_proj"])])
def test_projections_match_peft(tokens, k, n_q, n_kv, targets):
    torch.manual_seed(tokens)
    model = _peft(_QKV(k, n_q, n_kv).to(F64), targets)
    layers = [model.base_model.model.q_proj, model.base_model.model.k_proj, model.base_model.model.v_proj]
    params = _lora_params(model)
    x = torch.randn(tokens, k, dtype=F64, requires_grad=True)
    ups = [torch.randn(tokens, n, dtype=F64) for n in (n_q, n_kv, n_kv)]
    ref = [layer(x) for layer in layers]
    sum((y * g).sum() for y, g in zip(ref, ups)).backward()
    ref_grads = _grads(x, params)
    out = lora_projections(x, [lora_projection(layer, F64) for layer in layers])
    for y, y_ref in zip(out, ref):
        torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    sum((y * g).sum() for y, g in zip(out, ups)).backward()
    _assert_close(_grads(x, params), ref_grads)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("tokens,k,inter,targets", [(11, 19, 23, ["gate_proj", "up_proj", "down_proj"]),
                                                    (4, 8, 33, ["down_proj"]), (9, 6, 10, ["up_proj"])])
def test_swiglu_mlp_matches_peft(tokens, k, inter, targets, recompute):
    torch.manual_seed(inter)
    model = _peft(_MLP(k, inter).to(F64), targets, r=2)
    mlp = model.base_model.model
    params = _lora_params(model)
    x = torch.randn(tokens, k, dtype=F64, requires_grad=True)
    up = torch.randn(tokens, k, dtype=F64)
    ref = mlp.down_proj(nn.functional.silu(mlp.gate_proj(x)) * mlp.up_proj(x))
    (ref * up).sum().backward()
    ref_grads = _grads(x, params)
    projs = [lora_projection(m, F64) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)]
    out = lora_swiglu_mlp(x, *projs, recompute=recompute, use_triton=False)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    (out * up).sum().backward()
    _assert_close(_grads(x, params), ref_grads)


@pytest.mark.parametrize("recompute", [False, True])
def test_factors_in_their_own_dtype(recompute):
    """float64 factors with float32 compute: the same outputs and gradients as casting them before the
    call (autograd's ToCopy, the old path), gradients returned in float64; only activations are
    handed to saved-tensor hooks (each one costs two Python calls per step under checkpointing)."""
    from petl.kernels.lora_linear import Projection

    torch.manual_seed(5)
    f32 = torch.float32
    x = torch.randn(9, 12, requires_grad=True)
    ws = [torch.randn(n, 12) for n in (10, 6, 6)]
    bias = torch.randn(10)
    factors = [(torch.randn(4, 12, dtype=F64, requires_grad=True), torch.randn(n, 4, dtype=F64, requires_grad=True))
               for n in (10, 6)] + [(None, None)]
    ups = [torch.randn(9, n) for n in (10, 6, 6)]

    def run(cast_outside: bool):
        cast = (lambda t: t.to(f32) if t is not None else None) if cast_outside else (lambda t: t)
        projs = [Projection(w, bias if i == 0 else None, cast(a), cast(b), 1.5 + i) for i, (w, (a, b)) in
                 enumerate(zip(ws, factors))]
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            outs = lora_projections(x, projs)
        sum((y * g).sum() for y, g in zip(outs, ups)).backward()
        grads = [x.grad] + [t.grad for a, b in factors[:2] for t in (a, b)]
        out = [o.detach() for o in outs] + [g.clone() for g in grads]
        x.grad = None
        for a, b in factors[:2]:
            a.grad = b.grad = None
        return out, packed

    (new, packed), (old, _) = run(False), run(True)
    assert len(packed) == 2  # x and xa
    assert [g.dtype for g in new[4:]] == [F64] * 4
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=0, atol=0)

    inter = 7
    gate, up_, down = (torch.randn(inter, 12), torch.randn(inter, 12), torch.randn(12, inter))
    fac = [(torch.randn(3, k, dtype=F64, requires_grad=True), torch.randn(n, 3, dtype=F64, requires_grad=True))
           for k, n in ((12, inter), (12, inter), (inter, 12))]
    dy = torch.randn(9, 12)

    def mlp(cast_outside: bool):
        cast = (lambda t: t.to(f32)) if cast_outside else (lambda t: t)
        projs = [Projection(w, None, cast(a), cast(b), 2.5) for w, (a, b) in zip((gate, up_, down), fac)]
        packed = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: packed.append(t) or t, lambda t: t):
            y = lora_swiglu_mlp(x, *projs, recompute=recompute, use_triton=False)
        (y * dy).sum().backward()
        out = [y.detach(), x.grad.clone()] + [t.grad.clone() for a, b in fac for t in (a, b)]
        x.grad = None
        for a, b in fac:
            a.grad = b.grad = None
        return out, packed

    (new, packed), (old, _) = mlp(False), mlp(True)
    assert len(packed) == (3 if recompute else 5)  # x, xa, ha (+ g, u)
    for a, b in zip(new, old):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("num_items", [None, 7])
def test_linear_cross_entropy_matches_torch(num_items):
    torch.manual_seed(1)
    h = torch.randn(23, 9, dtype=F64, requires_grad=True)
    w = torch.randn(41, 9, dtype=F64, requires_grad=True)
    target = torch.randint(0, 41, (23,))
    target[[0, 5, 6]] = -100
    loss = linear_cross_entropy(h, w, target, num_items_in_batch=num_items, use_triton=False, chunk_rows=5)
    (loss * 1.7).backward()
    got = (h.grad.clone(), w.grad.clone())
    h.grad = w.grad = None
    ref = nn.functional.cross_entropy(h @ w.t(), target, reduction="sum" if num_items else "mean")
    ref = ref / num_items if num_items else ref
    (ref * 1.7).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=0)
    torch.testing.assert_close(got, (h.grad, w.grad), rtol=1e-10, atol=1e-14)


def _tiny_peft(arch: str, lora_plus: bool, dropout: float = 0.0, dtype=F64):
    model = tiny_causal_lm(arch, dtype=dtype, attn_implementation="sdpa", vocab_size=96, hidden_size=48,
                           num_heads=4, num_kv_heads=2).train()
    extra = {"modules_to_save": ["embed_tokens", "norm"]} if lora_plus else {}
    return _peft(model, "all-linear", r=4, lora_dropout=dropout, **extra)


def _loss_and_grads(model, ids, labels, fused_loss: bool = False):
    if fused_loss:
        out = model(input_ids=ids, labels=labels)
        assert out.logits is None
        loss = out.loss
    else:  # float64 cross-entropy (transformers' loss upcasts only to float32)
        logits = model(input_ids=ids).logits
        loss = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten())
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads


@pytest.mark.parametrize("arch,lora_plus,checkpointing", [("llama", True, False), ("llama", False, True),
                                                          ("mistral", False, False), ("qwen2", True, True)])
def test_tiny_model_fused_matches_unfused(arch, lora_plus, checkpointing):
    torch.manual_seed(0)
    model = _tiny_peft(arch, lora_plus)
    if checkpointing:
        model.base_model.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(0, 96, (2, 14))
    labels = ids.clone()
    labels[1, :4] = -100
    keys = list(model.state_dict())
    ref_loss, ref_grads = _loss_and_grads(model, ids, labels)
    fuse_lora(model, kernels="on", triton=False, fused_loss=False)
    assert list(model.state_dict()) == keys and is_fused(model)
    loss, grads = _loss_and_grads(model, ids, labels)
    # float64 model, but transformers' RMSNorm (both paths) normalises in float32, which turns
    # 1e-16 differences into occasional float32 ulps: the paths agree to float32 rounding.
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=0)
    _assert_close(grads, ref_grads, rtol=1e-5)
    fuse_lora(model, kernels="on", triton=False)  # with the fused linear cross-entropy
    loss, grads = _loss_and_grads(model, ids, labels, fused_loss=True)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-7, atol=0)
    _assert_close(grads, ref_grads, rtol=1e-5)
    unfuse_lora(model)
    assert not is_fused(model) and list(model.state_dict()) == keys
    assert type(model.base_model.model.model.layers[0].mlp).__module__.startswith("transformers.")


def check_save_load_merge(model, ids: torch.Tensor, tmp_path) -> None:
    """A fused peft model (tiny Llama, float64) gives the same logits after save_pretrained +
    PeftModel.from_pretrained on a fresh base, and after merge_and_unload, which saves as a plain
    transformers model."""
    from peft import PeftModel

    model.eval()
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    model.save_pretrained(tmp_path / "adapter")
    base = tiny_causal_lm("llama", dtype=F64, attn_implementation="sdpa", vocab_size=96, hidden_size=48, num_heads=4,
                          num_kv_heads=2)
    loaded = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, expected, rtol=1e-12, atol=1e-12)
    merged = model.merge_and_unload()
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, expected, rtol=1e-10, atol=1e-10)
    merged.save_pretrained(tmp_path / "merged")
    assert '"LlamaForCausalLM"' in (tmp_path / "merged" / "config.json").read_text()


def test_save_load_merge_after_fusing(tmp_path):
    torch.manual_seed(0)
    model = fuse_lora(_tiny_peft("llama", lora_plus=True), kernels="on", triton=False)
    check_save_load_merge(model, torch.randint(0, 96, (1, 10)), tmp_path)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_whole_fused_model_pickles_and_deep_copies(how, tmp_path):
    """torch.save / torch.load of a whole fused model, and copy.deepcopy: the copy is fused, its
    fused loss and gradients equal the original's, they land on the copy's own parameters (the
    loss hooks and the MLP's decoder-layer reference point into the copy), and it unfuses."""
    import copy

    torch.manual_seed(0)
    model = fuse_lora(_tiny_peft("llama", lora_plus=True), kernels="on", triton=False)
    if how == "torch.save":
        torch.save(model, tmp_path / "model.pt")
        clone = torch.load(tmp_path / "model.pt", weights_only=False)
    else:
        clone = copy.deepcopy(model)
    assert is_fused(clone)
    ids = torch.randint(0, 96, (2, 12))
    ref_loss, ref_grads = _loss_and_grads(model, ids, ids, fused_loss=True)
    loss, grads = _loss_and_grads(clone, ids, ids, fused_loss=True)
    torch.testing.assert_close(loss, ref_loss, rtol=0, atol=0)
    _assert_close(grads, ref_grads, rtol=0)
    assert all(p.grad is None for p in model.parameters())
    layer = clone.base_model.model.model.layers[0]
    assert type(layer.mlp) is type(model.base_model.model.model.layers[0].mlp)
    assert layer.mlp._petl_owner() is layer
    unfuse_lora(clone)
    assert not is_fused(clone) and is_fused(model)
    assert type(clone.base_model.model.model.layers[0].mlp).__module__ == "transformers.models.llama.modeling_llama"
    assert clone(input_ids=ids, labels=ids).logits is not None


def test_generate_with_cache_after_fusing():
    """Calls with a KV cache (``past_key_values`` in 5.17, ``cache`` in 5.24) run the model's own
    attention forward; calls without one run the fused path and give the same logits."""
    torch.manual_seed(0)
    model = _tiny_peft("llama", lora_plus=False).eval()
    ids = torch.randint(0, 96, (2, 7))
    with torch.no_grad():
        ref_logits = model(input_ids=ids).logits
        ref_tokens = model.generate(input_ids=ids, max_new_tokens=5, do_sample=False)
        fuse_lora(model, kernels="on", triton=False)
        torch.testing.assert_close(model(input_ids=ids).logits, ref_logits, rtol=1e-10, atol=1e-10)
        assert torch.equal(model.generate(input_ids=ids, max_new_tokens=5, do_sample=False), ref_tokens)


def test_unsupported_model_and_dropout_fallback():
    model = tiny_causal_lm("gpt_neox")
    with pytest.raises(ValueError, match="fuse_lora supports llama, mistral, qwen2 models, not 'gpt_neox'"):
        fuse_lora(model)
    with pytest.raises(ValueError, match="not a kernel mode"):
        fuse_lora(tiny_causal_lm("llama"), kernels="yes")
    torch.manual_seed(0)
    model = _tiny_peft("llama", lora_plus=False, dropout=0.1)
    ids = torch.randint(0, 96, (1, 8))
    fuse_lora(model, kernels="on", triton=False, fused_loss=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model(input_ids=ids, labels=ids).loss.backward()
    assert any("LoRA dropout 0.1 has no fused kernel" in str(w.message) for w in caught)


def test_dispatch_switch(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.delenv("PETL_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernel_plan(cpu, None, None) == (False, False)  # auto: references on CPU
    assert kernel_plan(cpu, "on", False) == (True, False)
    assert kernel_plan(cpu, "off", False) == (False, False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernel_plan(cpu, "on", None)
    monkeypatch.setenv("PETL_KERNELS", "off")
    assert kernel_plan(cpu, None, False) == (False, False)
    assert kernel_plan(cpu, "on", False) == (True, False)  # explicit beats the environment


def test_recipe_key_and_runner_wiring(monkeypatch):
    from petl.train.recipe import Recipe, TrainSection
    from petl.train.runner import apply_kernels
    from petl.train.schema_types import RecipeError, from_dict

    monkeypatch.delenv("PETL_KERNELS", raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RecipeError, match="train.kernels"):
        from_dict(Recipe, {"train": {"kernels": "fast"}})
    with pytest.raises(RecipeError, match="train.kernels"):
        TrainSection(kernels="fast")
    recipe = from_dict(Recipe, {"train": {"kernels": "off"}})
    assert not is_fused(apply_kernels(_tiny_peft("llama", False, dtype=torch.float32), recipe))
    recipe = from_dict(Recipe, {"train": {"kernels": "auto"}})
    assert is_fused(apply_kernels(_tiny_peft("llama", False, dtype=torch.float32), recipe))
    assert not is_fused(apply_kernels(tiny_causal_lm("gpt_neox"), recipe))
    recipe = from_dict(Recipe, {"train": {"kernels": "on"}})
    with pytest.raises(RecipeError, match="TRITON_INTERPRET=1"):
        apply_kernels(_tiny_peft("llama", False, dtype=torch.float32), recipe)


def test_kernels_on_is_refused_where_no_runner_honours_it():
    """Task runners and ``petl distill`` train unfused: ``train.kernels=on`` there is a one-line error,
    not a setting silently ignored."""
    from petl.distill.runner import check_distill_recipe
    from petl.train.recipe import Recipe
    from petl.train.schema_types import RecipeError, from_dict

    with pytest.raises(RecipeError, match=r"'train.kernels' = 'on' applies to causal-LM training; task.type "
                                          r"'sequence_classification'") as err:
        from_dict(Recipe, {"task": {"type": "sequence_classification"}, "train": {"kernels": "on"}})
    assert "\n" not in str(err.value)
    from_dict(Recipe, {"task": {"type": "sequence_classification"}, "train": {"kernels": "auto"}})
    with pytest.raises(RecipeError, match="not honoured by petl distill"):
        check_distill_recipe(from_dict(Recipe, {"train": {"kernels": "on"}}))


@pytest.mark.skipif(IN_CHILD or not HAS_TRITON, reason="parent of the interpreter run / no triton")
def test_triton_kernels_under_interpreter():
    run_child_pytest(__file__, CHILD_ENV, min_passed=5, timeout=300, keyword="interpreted")


@pytest.fixture
def nan_buffers(monkeypatch):
    """Every buffer allocated with torch.empty / empty_like starts as NaN, so unwritten elements fail."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


def _outputs_and_grads(fn, inputs, ups):
    """fn's outputs and the inputs' gradients for upstream gradients ``ups``."""
    inputs = [t.detach().requires_grad_() for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, ups)
    return [o.detach() for o in outs] + [t.grad for t in inputs]


def _check_rel(got, ref, tol=1e-5):
    for g, r in zip(got, ref, strict=True):
        err = ((g.double() - r.double()).norm() / r.double().norm()).item()
        assert err < tol, err


@child
def test_rmsnorm_interpreted(nan_buffers):
    from petl.kernels.rmsnorm import rms_norm, rms_norm_reference

    torch.manual_seed(0)
    x, w, up = torch.randn(7, 37), torch.randn(37), [torch.randn(7, 37)]
    _check_rel(_outputs_and_grads(lambda a, b: rms_norm(a, b, 1e-6), [x, w], up),
               _outputs_and_grads(lambda a, b: rms_norm_reference(a, b, 1e-6), [x, w], up))


@child
def test_swiglu_interpreted(nan_buffers):
    from petl.kernels.swiglu import swiglu, swiglu_backward, swiglu_backward_reference, swiglu_reference

    torch.manual_seed(1)
    g, u, dh = torch.randn(5, 33), torch.randn(5, 33), torch.randn(5, 33)
    _check_rel([swiglu(g, u)], [swiglu_reference(g, u)])
    _check_rel(swiglu_backward(dh.clone(), g, u), swiglu_backward_reference(dh, g, u))


@child
def test_rope_interpreted(nan_buffers):
    from petl.kernels.rope import apply_rope, rope_reference

    torch.manual_seed(2)
    q, k, cos, sin = torch.randn(2, 5, 3, 12), torch.randn(2, 5, 1, 12), torch.randn(1, 5, 12), torch.randn(1, 5, 12)
    ups = [torch.randn(2, 5, 3, 12), torch.randn(2, 5, 1, 12)]
    _check_rel(_outputs_and_grads(lambda a, b: apply_rope(a, b, cos, sin), [q, k], ups),
               _outputs_and_grads(lambda a, b: rope_reference(a, b, cos, sin), [q, k], ups))


@child
def test_linear_cross_entropy_interpreted(nan_buffers):
    torch.manual_seed(3)
    h, wt, t = torch.randn(19, 16), torch.randn(50, 16), torch.randint(0, 50, (19,))
    t[3] = -100
    up = [torch.tensor(1.3)]
    _check_rel(_outputs_and_grads(lambda a, b: linear_cross_entropy(a, b, t, chunk_rows=8), [h, wt], up),
               _outputs_and_grads(lambda a, b: torch.nn.functional.cross_entropy(a @ b.t(), t), [h, wt], up))


@child
def test_tiny_llama_fused_interpreted(nan_buffers):
    """A one-layer Llama with LoRA on all linear layers and a trained norm: fused (Triton kernels in
    the interpreter) against unfused, loss and every gradient."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(4)
    model = tiny_causal_lm("llama", attn_implementation="sdpa", num_layers=1, vocab_size=64, hidden_size=32).train()
    model = get_peft_model(model, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False,
                                             modules_to_save=["norm"]))
    ids = torch.randint(0, 64, (2, 6))

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        out = [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.requires_grad]
        model.zero_grad(set_to_none=True)
        return out

    ref = step()
    fuse_lora(model, kernels="on")
    _check_rel(step(), ref)


# ----------------------------------------------------------------------------------------- GPU, bf16


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).norm() / ref.double().norm()).item()


def _assert_kernel_error(name: str, kernel, torch_same_precision, reference) -> None:
    """Tolerance rule: the kernel's error against the float64 reference is at most twice the error
    of plain PyTorch in the same precision (bf16) against that reference (plus 1e-6 for exact cases)."""
    for i, (k, t, r) in enumerate(zip(kernel, torch_same_precision, reference)):
        assert _rel(k, r) <= 2 * _rel(t, r) + 1e-6, f"{name}[{i}]: kernel {_rel(k, r):.2e}, torch {_rel(t, r):.2e}"


def _run(fn, inputs, ups, dtype):
    inputs = [t.detach().to(dtype).requires_grad_(t.is_floating_point()) for t in inputs]
    outs = fn(*inputs)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, [u.to(o.dtype) for o, u in zip(outs, ups)])
    return [o.detach() for o in outs] + [t.grad for t in inputs if t.requires_grad]


@pytest.mark.gpu
def test_gpu_element_wise_kernels_bf16():
    from petl.kernels.rmsnorm import rms_norm
    from petl.kernels.rope import apply_rope
    from petl.kernels.swiglu import swiglu, swiglu_backward, swiglu_backward_reference

    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    x, w = torch.randn(4099, 2048, device=dev), 1 + 0.1 * torch.randn(2048, device=dev)
    up = [torch.randn(4099, 2048, device=dev)]
    for_all = [lambda a, b, t=t: rms_norm(a, b, 1e-6, use_triton=t) for t in (True, False)]
    _assert_kernel_error("rmsnorm", _run(for_all[0], [x, w], up, bf), _run(for_all[1], [x, w], up, bf),
                         _run(for_all[1], [x, w], up, F64))
    q, k = torch.randn(2, 1031, 32, 128, device=dev), torch.randn(2, 1031, 8, 128, device=dev)
    ang = torch.rand(1, 1031, 64, device=dev) * 100
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    ups = [torch.randn_like(q), torch.randn_like(k)]
    rope = [lambda a, b, t=t, d=d: apply_rope(a, b, cos.to(d), sin.to(d), use_triton=t)
            for t, d in ((True, bf), (False, bf), (False, F64))]
    _assert_kernel_error("rope", _run(rope[0], [q, k], ups, bf), _run(rope[1], [q, k], ups, bf),
                         _run(rope[2], [q, k], ups, F64))
    g, u, dh = (torch.randn(2053, 5632, device=dev) for _ in range(3))
    _assert_kernel_error("swiglu", [swiglu(g.to(bf), u.to(bf))], [swiglu(g.to(bf), u.to(bf), use_triton=False)],
                         [swiglu(g.double(), u.double(), use_triton=False)])
    ref = swiglu_backward_reference(dh.double(), g.double(), u.double())
    torch_bf = [torch.nn.functional.silu(g.to(bf)) * u.to(bf)]
    gb, ub = g.to(bf).requires_grad_(), u.to(bf).requires_grad_()
    (torch.nn.functional.silu(gb) * ub).backward(dh.to(bf))
    torch_bf += [gb.grad, ub.grad]
    _assert_kernel_error("swiglu_bwd", swiglu_backward(dh.to(bf), g.to(bf), u.to(bf)), torch_bf, ref)


def _upcast(logits: torch.Tensor) -> torch.Tensor:
    """transformers' ``logits.float()``, keeping float64 references in float64."""
    return logits.float() if logits.element_size() < 4 else logits


@pytest.mark.gpu
def test_gpu_fused_lora_and_cross_entropy_bf16():
    dev, bf = torch.device("cuda"), torch.bfloat16
    torch.manual_seed(0)
    h, w = torch.randn(3001, 1024, device=dev), torch.randn(32000, 1024, device=dev) / 32
    target = torch.randint(0, 32000, (3001,), device=dev)
    target[::7] = -100
    up = [torch.tensor(1.0, device=dev)]
    fused = lambda a, b: linear_cross_entropy(a, b, target, chunk_rows=1024)  # noqa: E731
    plain = lambda a, b: nn.functional.cross_entropy(_upcast(a @ b.t()), target)  # noqa: E731
    _assert_kernel_error("linear_cross_entropy", _run(fused, [h, w], up, bf), _run(plain, [h, w], up, bf),
                         _run(plain, [h, w], up, F64))
    model = _peft(_MLP(1024, 2816).to(dev), ["gate_proj", "up_proj", "down_proj"], r=16)
    mlp = model.base_model.model
    x, dy = torch.randn(2048, 1024, device=dev), torch.randn(2048, 1024, device=dev)

    def run(dtype, fused_path):
        model.to(dtype)
        params = _lora_params(model)
        xi = x.to(dtype).requires_grad_()
        if fused_path:
            y = lora_swiglu_mlp(xi, *[lora_projection(m, dtype) for m in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)])
        else:
            y = mlp.down_proj(nn.functional.silu(mlp.gate_proj(xi)) * mlp.up_proj(xi))
        y.backward(dy.to(dtype))
        return [y.detach(), *_grads(xi, params).values()]

    _assert_kernel_error("lora_swiglu_mlp", run(bf, True), run(bf, False), run(F64, False))
