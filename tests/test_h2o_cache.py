"""H2O KV cache: policy, scores against a float64 loop reference, and generate() end to end."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from petl.cache import (H2OBudget, H2OCache, H2OLayer, disable_h2o, enable_h2o, generate_cache_kwargs,
                        h2o_attention_forward, h2o_enabled, select_kept)
from petl.cache import attention as h2o_attention
from petl.testing import tiny_causal_lm

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("kwargs, needle", [
    (dict(heavy=-1, recent=4), "heavy must be >= 0"),
    (dict(heavy=2, recent=-3), "recent must be >= 0"),
    (dict(heavy=0, recent=0), "budget is 0"),
    (dict(heavy_ratio=0.0, recent_ratio=0.0), "budget is 0"),
    (dict(heavy=0, recent_ratio=0.0), "budget is 0"),
    (dict(heavy=2), "needs recent= or recent_ratio="),
    (dict(recent=2), "needs heavy= or heavy_ratio="),
    (dict(heavy=2, heavy_ratio=0.1, recent=2), "both heavy=2 and heavy_ratio=0.1"),
    (dict(heavy=2.5, recent=2), "must be an int"),
    (dict(heavy_ratio=-0.1, recent=2), "finite number >= 0"),
    (dict(heavy_ratio=float("nan"), recent=2), "finite number >= 0"),
])
def test_bad_budgets_give_one_line_errors(kwargs, needle):
    with pytest.raises(ValueError) as info:
        H2OCache(**kwargs)
    message = str(info.value)
    assert needle in message and "\n" not in message


def test_ratios_resolve_against_prompt_length():
    assert H2OBudget(heavy_ratio=0.1, recent_ratio=0.2).resolve(20) == (2, 4)
    assert H2OBudget(heavy_ratio=0.1, recent_ratio=0.2).resolve(17) == (2, 4)  # ceil(1.7), ceil(3.4)
    assert H2OBudget(heavy_ratio=0.3, recent=5).resolve(10) == (3, 5)  # 0.3*10 is 3.0000000000000004
    assert H2OBudget(heavy=0, recent_ratio=0.01).resolve(7) == (0, 1)


def test_ratio_cache_resolves_at_prefill_and_keeps_its_budget():
    model = enable_h2o(tiny_causal_lm("llama"))
    ids = torch.randint(1, 100, (1, 20), generator=torch.Generator().manual_seed(0))
    cache = H2OCache(heavy_ratio=0.1, recent_ratio=0.2)
    model.generate(input_ids=ids, max_new_tokens=8, do_sample=False, pad_token_id=0,
                   **generate_cache_kwargs(cache))
    assert [(layer.heavy, layer.recent) for layer in cache.layers] == [(2, 4)] * 2
    assert cache.kept_lengths() == [6, 6]
    assert cache.get_seq_length() == 20 + 7  # the 8th token is sampled, never fed back


# ----------------------------------------------------------------------------- eviction policy
def test_select_kept_hand_checked():
    scores = torch.tensor([
        [[5.0, 1.0, 4.0, 0.5, 3.0, 9.0, 9.0],    # b0 h0: top-2 of slots 0..4 are 0 (5.0) and 2 (4.0)
         [0.1, 7.0, 0.2, 6.0, 0.3, 0.0, 0.0]],   # b0 h1: slots 1 and 3
        [[0.0, 0.0, 0.0, 8.0, 2.0, 1.0, 1.0],    # b1 h0: slots 3 and 4
         [9.0, 0.0, 0.0, 0.0, 8.0, 0.0, 0.0]],   # b1 h1: slots 0 and 4
    ])
    kept = select_kept(scores, heavy=2, recent=2)
    assert kept.tolist() == [[[0, 2, 5, 6], [1, 3, 5, 6]], [[3, 4, 5, 6], [0, 4, 5, 6]]]
    assert select_kept(scores, heavy=0, recent=3).tolist() == [[[4, 5, 6]] * 2] * 2
    assert select_kept(scores, heavy=1, recent=0)[1, 0].tolist() == [3]


def _kept(layer, b, h):
    """{position: score} of the tokens slot-holding in (sample b, kv head h)."""
    return {p: sc for p, sc in zip(layer.positions[b, h].tolist(), layer.scores[b, h].tolist()) if p >= 0}


def test_layer_evicts_and_gathers_keys_values_positions_scores():
    layer = H2OLayer(H2OBudget(heavy=1, recent=2))
    # keys/values carry their position so a gather mistake is visible: [B=1, H=2, 5, D=3]
    pos = torch.arange(5.0).view(1, 1, 5, 1).expand(1, 2, 5, 3)
    keys, values = layer.update(pos.clone(), -pos.clone())
    assert keys.shape == (1, 2, 5, 3) and layer.get_seq_length() == 5
    # prefill: top-1 of slots 0..2 by score, plus the 2 newest
    layer.accumulate(torch.tensor([[[1.0, 3.0, 2.0, 0.0, 0.0], [4.0, 0.0, 5.0, 0.0, 0.0]]]))
    assert layer.positions.tolist() == [[[1, 3, 4], [2, 3, 4]]]
    assert layer.keys[..., 0].tolist() == [[[1, 3, 4], [2, 3, 4]]]
    assert layer.values[..., 0].tolist() == [[[-1, -3, -4], [-2, -3, -4]]]
    assert layer.scores.tolist() == [[[3.0, 0.0, 0.0], [5.0, 0.0, 0.0]]]

    # decode 1: the new token is appended, then one slot per head is freed in place
    layer.update(torch.full((1, 2, 1, 3), 5.0), torch.full((1, 2, 1, 3), -5.0))
    assert layer.positions.tolist() == [[[1, 3, 4, 5], [2, 3, 4, 5]]]
    layer.accumulate(torch.tensor([[[0.5, 4.0, 0.1, 0.1], [0.5, 0.1, 0.1, 0.1]]]))
    # outside the recent window {4, 5}: h0 has 1 (3.5) and 3 (4.0) -> frees 1; h1 has 2 (5.5), 3 (0.1)
    assert layer.positions.tolist() == [[[-1, 3, 4, 5], [2, -1, 4, 5]]]
    assert layer.kept_length == 3 and layer.get_seq_length() == 6 and layer.get_mask_sizes(1) == (7, 0)

    # decode 2: the new token goes into the freed slot; no other row moves
    keys, values = layer.update(torch.full((1, 2, 1, 3), 6.0), torch.full((1, 2, 1, 3), -6.0))
    assert layer.positions.tolist() == [[[6, 3, 4, 5], [2, 6, 4, 5]]]
    assert keys[..., 0].tolist() == [[[6, 3, 4, 5], [2, 6, 4, 5]]]
    assert values[..., 0].tolist() == [[[-6, -3, -4, -5], [-2, -6, -4, -5]]]
    layer.accumulate(torch.zeros(1, 2, 4))
    # outside {5, 6}: h0 has 3 (4.0), 4 (0.1) -> frees 4; h1 has 2 (5.5), 4 (0.1) -> frees 4
    assert layer.positions.tolist() == [[[6, 3, -1, 5], [2, 6, -1, 5]]]

    # a multi-token step sorts slots back into position order and drops the free slot
    new = torch.tensor([7.0, 8.0]).view(1, 1, 2, 1).expand(1, 2, 2, 3)
    keys, _ = layer.update(new.clone(), -new.clone())
    assert layer.positions.tolist() == [[[3, 5, 6, 7, 8], [2, 5, 6, 7, 8]]]
    assert keys[..., 0].tolist() == [[[3, 5, 6, 7, 8], [2, 5, 6, 7, 8]]]
    layer.accumulate(torch.zeros(1, 2, 5))
    assert layer.positions.tolist() == [[[3, 7, 8], [2, 7, 8]]]
    assert layer.scores.tolist() == [[[4.0, 0.0, 0.0], [5.5, 0.0, 0.0]]]
    with pytest.raises(ValueError, match="cannot be cropped"):
        layer.crop(-1)


# ----------------------------------------------------------------------------- scores vs float64
class _Attn(nn.Module):
    layer_idx = 0
    is_causal = True


def _reference_h2o(steps, pad, heavy, recent, scaling):
    """Loop-by-loop float64 H2O: per sample, per kv head, independent of the tensor code."""
    batch, q_heads = steps[0][0].shape[:2]
    kv_heads = steps[0][1].shape[1]
    groups = q_heads // kv_heads
    keys, vals = {}, {}                         # (b, h, pos) -> vector
    kept = {(b, h): [] for b in range(batch) for h in range(kv_heads)}
    score = {}                                  # (b, h, pos) -> accumulated probability
    seen, outputs = 0, []
    for q, k, v in steps:
        q, k, v = q.double(), k.double(), v.double()
        new = list(range(seen, seen + q.shape[2]))
        out = torch.zeros(batch, q.shape[2], q_heads, v.shape[-1], dtype=torch.float64)
        for b in range(batch):
            for h in range(kv_heads):
                for i, p in enumerate(new):
                    keys[b, h, p], vals[b, h, p] = k[b, h, i], v[b, h, i]
                    score[b, h, p] = 0.0
                slots = kept[b, h] + new
                for g in range(groups):
                    hq = h * groups + g
                    for i, p in enumerate(new):
                        vis = [s for s in slots if s <= p and s >= pad[b]]
                        if not vis:
                            continue
                        logit = torch.stack([q[b, hq, i] @ keys[b, h, s] for s in vis]) * scaling
                        prob = torch.softmax(logit, dim=0)
                        for s, pr in zip(vis, prob.tolist()):
                            score[b, h, s] += pr
                        out[b, i, hq] = sum(pr * vals[b, h, s] for s, pr in zip(vis, prob))
                if len(slots) > heavy + recent:
                    old, last = slots[:len(slots) - recent], slots[len(slots) - recent:]
                    top = sorted(old, key=lambda s: -score[b, h, s])[:heavy]
                    slots = sorted(top) + last
                kept[b, h] = slots
        seen += q.shape[2]
        outputs.append(out)
    return outputs, kept, score


@pytest.mark.parametrize("heavy, recent, chunk", [
    (100, 100, None),   # no eviction: pure accumulated column sums
    (2, 2, None),
    (0, 3, 7),          # recent window only, prefill chunked into 1-row pieces (7 / (2*4*...))
    (3, 1, 1),
])
@pytest.mark.parametrize("padded", [False, True])
def test_scores_and_outputs_match_float64_loop_reference(monkeypatch, heavy, recent, chunk, padded):
    if chunk is not None:
        monkeypatch.setattr(h2o_attention, "CHUNK_ELEMENTS", chunk)
    gen = torch.Generator().manual_seed(3)
    batch, q_heads, kv_heads, dim, prompt, decode = 2, 4, 2, 8, 7, 5
    pad = [2, 0] if padded else [0, 0]
    steps = []
    for length in [prompt] + [1] * decode:
        steps.append((torch.randn(batch, q_heads, length, dim, generator=gen),
                      torch.randn(batch, kv_heads, length, dim, generator=gen),
                      torch.randn(batch, kv_heads, length, dim, generator=gen)))
    scaling = dim ** -0.5
    ref_out, ref_kept, ref_score = _reference_h2o(steps, pad, heavy, recent, scaling)

    cache, module, seen = H2OCache(heavy=heavy, recent=recent), _Attn(), 0
    for (q, k, v), expected in zip(steps, ref_out):
        length = q.shape[2]
        mask = None
        if padded:  # what transformers' sdpa_mask builds: [B, 1, L, seen + L] over all positions
            cols = torch.arange(seen + length)
            rows = torch.arange(seen, seen + length)
            mask = (cols[None, :] <= rows[:, None])[None, None] & (cols >= torch.tensor(pad)[:, None])[:, None, None]
        k_all, v_all = cache.update(k, v, 0)
        out, weights = h2o_attention_forward(module, q, k_all, v_all, mask, scaling=scaling,
                                             past_key_values=cache)
        assert weights is None and out.shape == (batch, length, q_heads, dim)
        torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)
        seen += length
    layer = cache.layers[0]
    for b in range(batch):
        for h in range(kv_heads):
            kept = _kept(layer, b, h)
            assert sorted(kept) == ref_kept[b, h]
            got = torch.tensor([kept[s] for s in ref_kept[b, h]], dtype=torch.float64)
            want = torch.tensor([ref_score[b, h, s] for s in ref_kept[b, h]], dtype=torch.float64)
            torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert layer.kept_length == min(heavy + recent, prompt + decode)
    assert layer.keys.shape[2] <= heavy + recent + 1


def test_cache_is_found_through_the_cache_kwarg_too():
    cache = H2OCache(heavy=4, recent=4)
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 1, 3, 4)
    k_all, v_all = cache.update(k, k, 0)
    h2o_attention_forward(_Attn(), q, k_all, v_all, None, cache=cache)
    assert not cache.layers[0].awaiting_scores and cache.layers[0].scores.sum().item() == pytest.approx(6.0)


# ----------------------------------------------------------------------------- generate() end to end
def _batch(n_rows, length, pads, seed=0):
    ids = torch.randint(1, 120, (n_rows, length), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(n_rows, length, dtype=torch.long)
    for row, pad in enumerate(pads):
        mask[row, :pad] = 0
        ids[row, :pad] = 0
    return ids, mask


def _greedy(model, ids, mask, new_tokens, cache=None):
    kwargs = {} if cache is None else generate_cache_kwargs(cache)
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          pad_token_id=0, **kwargs)


@pytest.mark.parametrize("arch", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("pads", [[0], [3, 0, 5]], ids=["batch1", "batch3-left-padded"])
def test_full_budget_is_token_identical_to_full_cache(arch, pads):
    model = tiny_causal_lm(arch, attn_implementation="eager")
    ids, mask = _batch(len(pads), 11, pads)
    reference = _greedy(model, ids, mask, 24)
    model.set_attn_implementation("sdpa")
    assert torch.equal(_greedy(model, ids, mask, 24), reference)
    enable_h2o(model)
    cache = H2OCache(heavy=20, recent=20)  # 40 >= 11 + 24: nothing is ever evicted
    assert torch.equal(_greedy(model, ids, mask, 24, cache), reference)
    assert cache.kept_lengths() == [11 + 23] * 2


def test_recent_only_budget_equals_sliding_window_attention():
    """heavy=0, recent=W is exactly sliding-window attention over W+1 keys (prompt <= W+1)."""
    window = 6
    ids, mask = _batch(2, window + 1, [2, 0], seed=1)
    sliding = tiny_causal_lm("mistral", attn_implementation="eager", sliding_window=window + 1)
    reference = _greedy(sliding, ids, mask, 30)
    model = enable_h2o(tiny_causal_lm("mistral"))
    cache = H2OCache(heavy=0, recent=window)
    assert torch.equal(_greedy(model, ids, mask, 30, cache), reference)


def test_batched_scores_are_per_sample():
    """With eviction, each row of a left-padded batch generates what it generates alone."""
    model = enable_h2o(tiny_causal_lm("llama", num_layers=3))
    ids, mask = _batch(2, 12, [3, 0], seed=2)
    batched = _greedy(model, ids, mask, 20, H2OCache(heavy=3, recent=4))
    for row, pad in enumerate([3, 0]):
        alone = _greedy(model, ids[row:row + 1, pad:], mask[row:row + 1, pad:], 20, H2OCache(heavy=3, recent=4))
        assert torch.equal(batched[row, 12:], alone[0, 12 - pad:])


def test_cache_stays_within_budget_during_long_generation():
    from transformers import LogitsProcessor, LogitsProcessorList

    heavy, recent, prompt, new_tokens = 4, 6, 12, 48
    model = enable_h2o(tiny_causal_lm("qwen2"))
    cache = H2OCache(heavy=heavy, recent=recent)
    trace = []

    class Record(LogitsProcessor):
        def __call__(self, input_ids, scores):
            seen = cache.get_seq_length()
            assert seen == input_ids.shape[1]
            for layer in cache.layers:
                assert layer.keys.shape[-2] <= heavy + recent + 1  # one free slot between steps
                pos = layer.positions.sort(dim=-1).values
                pos = pos[..., pos.shape[-1] - heavy - recent:]  # drop the free slot (-1), if any
                assert (pos[..., :heavy] >= 0).all() and (pos[..., 1:] > pos[..., :-1]).all()
                assert (pos[..., heavy:] == torch.arange(seen - recent, seen)).all()
                assert (pos[..., :heavy] < seen - recent).all()
            trace.append((tuple(cache.kept_lengths()), cache.kv_bytes()))
            return scores

    ids, mask = _batch(2, prompt, [2, 0], seed=4)
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                   pad_token_id=0, logits_processor=LogitsProcessorList([Record()]),
                   **generate_cache_kwargs(cache))
    assert len(trace) == new_tokens
    assert {t[0] for t in trace} == {(heavy + recent,) * 2}
    # memory does not grow with new tokens: the first decode step adds the one free slot, then
    # every step reuses it
    assert trace[0][1] < trace[1][1] and len({t[1] for t in trace[1:]}) == 1
    per_slot = sum(t.element_size() * t.shape[-1] for t in (cache.layers[0].keys, cache.layers[0].values)) + 8 + 4
    assert trace[-1][1] == 2 * 2 * 2 * per_slot * (heavy + recent + 1)  # layers * batch * kv heads
    positions = torch.stack([layer.positions for layer in cache.layers])
    assert not (positions == positions[:, :1, :1]).all()  # heavy hitters differ by sample/head


def test_generation_with_h2o_cache_on_unswitched_model_fails_clearly():
    model = tiny_causal_lm("llama", attn_implementation="sdpa")
    ids, mask = _batch(1, 6, [0])
    with pytest.raises(RuntimeError) as info:
        _greedy(model, ids, mask, 4, H2OCache(heavy=2, recent=2))
    assert "enable_h2o(model)" in str(info.value) and "\n" not in str(info.value)


def test_switched_model_matches_eager_without_h2o_cache_and_disable_restores():
    model = tiny_causal_lm("llama", attn_implementation="eager")
    ids, mask = _batch(2, 9, [4, 0], seed=5)
    with torch.no_grad():
        ref_logits = model(input_ids=ids, attention_mask=mask).logits
    reference = _greedy(model, ids, mask, 10)
    enable_h2o(model)
    enable_h2o(model)  # idempotent
    assert h2o_enabled(model) and model.config._attn_implementation == "petl_h2o"
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits
    real = mask.bool()
    torch.testing.assert_close(logits[real], ref_logits[real], atol=1e-5, rtol=1e-5)
    assert torch.equal(_greedy(model, ids, mask, 10), reference)  # DynamicCache still fine
    disable_h2o(model)
    assert not h2o_enabled(model) and model.config._attn_implementation == "eager"
    assert not any(hasattr(m, "_petl_h2o_binding") for m in model.modules())


def test_peft_model_with_h2o_cache():
    from peft import LoraConfig, get_peft_model

    model = tiny_causal_lm("llama", attn_implementation="eager")
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False)).eval()
    ids, mask = _batch(2, 8, [2, 0], seed=6)
    reference = _greedy(peft_model, ids, mask, 12)
    enable_h2o(peft_model)
    assert torch.equal(_greedy(peft_model, ids, mask, 12, H2OCache(heavy=10, recent=10)), reference)
    cache = H2OCache(heavy=2, recent=3)
    _greedy(peft_model, ids, mask, 12, cache)
    assert cache.kept_lengths() == [5, 5]


# ----------------------------------------------------------------------------- CLI
def _run_cli(args):
    from click.testing import CliRunner

    from petl.cli.generate import generate

    return CliRunner().invoke(generate, args)


def test_cli_generate_h2o_full_budget_equals_full_cache(tiny_model_dir):
    base = ["--model", str(tiny_model_dir), "--prompt", "the quick brown fox", "--prompt",
            "a stitch in time saves nine", "--max-new-tokens", "12", "--dtype", "float32", "--device", "cpu"]
    full = _run_cli(base)
    assert full.exit_code == 0, full.output
    h2o = _run_cli(base + ["--h2o-heavy", "40", "--h2o-recent", "40"])
    assert h2o.exit_code == 0, h2o.output
    assert h2o.stdout == full.stdout and full.stdout.startswith("### 0\n")
    small = _run_cli(base + ["--h2o-heavy-ratio", "0.1", "--h2o-recent-ratio", "0.2"])
    assert small.exit_code == 0, small.output
    assert "h2o: heavy=" in small.stderr and "KV cache" in small.stderr


@pytest.mark.parametrize("extra, needle", [
    (["--h2o-heavy", "2"], "needs both halves"),
    (["--h2o-heavy", "2", "--h2o-heavy-ratio", "0.1", "--h2o-recent", "2"], "both heavy=2 and heavy_ratio=0.1"),
    (["--h2o-heavy", "0", "--h2o-recent", "0"], "budget is 0"),
    (["--h2o-heavy", "-3", "--h2o-recent", "2"], "heavy must be >= 0"),
])
def test_cli_bad_budgets(tiny_model_dir, extra, needle):
    result = _run_cli(["--model", str(tiny_model_dir), "--prompt", "hello", "--max-new-tokens", "2"] + extra)
    assert result.exit_code == 2
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and needle in error_lines[0]


def test_cli_needs_exactly_one_prompt_source(tiny_model_dir, tmp_path):
    prompt_file = tmp_path / "p.txt"
    prompt_file.write_text("the lazy dog")
    both = _run_cli(["--model", str(tiny_model_dir), "--prompt", "x", "--prompt-file", str(prompt_file)])
    assert both.exit_code == 2 and "not both" in both.output
    none = _run_cli(["--model", str(tiny_model_dir)])
    assert none.exit_code == 2 and "no prompt" in none.output
    ok = _run_cli(["--model", str(tiny_model_dir), "--prompt-file", str(prompt_file), "--max-new-tokens", "3",
                   "--sample", "--temperature", "0.7", "--top-p", "0.9", "--device", "cpu"])
    assert ok.exit_code == 0, ok.output


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_gpu_full_budget_identical_and_budget_held(arch):
    model = tiny_causal_lm(arch, attn_implementation="eager").cuda()
    ids, mask = _batch(3, 40, [5, 0, 17], seed=8)
    ids, mask = ids.cuda(), mask.cuda()
    reference = _greedy(model, ids, mask, 32)
    enable_h2o(model)
    assert torch.equal(_greedy(model, ids, mask, 32, H2OCache(heavy=64, recent=64)), reference)
    cache = H2OCache(heavy_ratio=0.1, recent_ratio=0.1)
    _greedy(model, ids, mask, 32, cache)
    assert cache.kept_lengths() == [8, 8] and cache.layers[0].keys.is_cuda
