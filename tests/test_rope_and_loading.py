"""RoPE scaling to a target context, and model loading rules (safetensors only, clear errors)."""
from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from petl.attention.rope import extend_context, native_context_length, scaled_rope_parameters
from petl.models import ModelLoadError, load_model
from petl.testing import tiny_causal_lm, tiny_config


@pytest.mark.parametrize("target, factor", [(100, 2.0), (128, 2.0), (129, 3.0), (1000, 16.0)])
def test_linear_factor_is_longlora_ceil(target, factor):
    params, max_positions = scaled_rope_parameters(tiny_config("llama", max_position_embeddings=64), target, "linear")
    assert params["rope_type"] == "linear" and params["factor"] == factor
    assert params["original_max_position_embeddings"] == 64 and max_positions == int(64 * factor)


def test_ntk_and_yarn_use_transformers_rope_types():
    cfg = tiny_config("llama", max_position_embeddings=64)
    ntk, n_max = scaled_rope_parameters(cfg, 256, "ntk")
    yarn, y_max = scaled_rope_parameters(cfg, 256, "yarn")
    assert ntk["rope_type"] == "dynamic" and ntk["factor"] == 4.0 and n_max == 256
    assert yarn["rope_type"] == "yarn" and yarn["factor"] == 4.0 and y_max == 256


def test_target_not_longer_than_native_is_rejected():
    with pytest.raises(ValueError, match="not longer than the native context 64"):
        scaled_rope_parameters(tiny_config("llama", max_position_embeddings=64), 64)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt_neox"])
def test_extending_a_loaded_model_equals_interpolated_positions(arch):
    """Linear interpolation by 2 makes position p behave like position p/2 of the base model.

    With positions 0, 2, 4, ... the extended model must reproduce the base model at 0, 1, 2, ...
    exactly: an independent check of the rebuilt rotary embedding.
    """
    base = tiny_causal_lm(arch, max_position_embeddings=64)
    extended = tiny_causal_lm(arch, max_position_embeddings=64)
    extend_context(extended, 128, "linear")
    assert native_context_length(extended.config) == 64 and extended.config.max_position_embeddings == 128
    ids = torch.randint(0, 128, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = base(input_ids=ids, position_ids=torch.arange(20)[None]).logits
        got = extended(input_ids=ids, position_ids=2 * torch.arange(20)[None]).logits
        unchanged = base(input_ids=ids, position_ids=2 * torch.arange(20)[None]).logits
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not torch.allclose(unchanged, want, atol=1e-3)


def test_scaled_model_saves_and_reloads_with_stock_transformers(tmp_path):
    model = tiny_causal_lm("llama", max_position_embeddings=64)
    extend_context(model, 256, "yarn")
    model.save_pretrained(str(tmp_path))
    again = AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert again.config.rope_parameters["rope_type"] == "yarn"
    ids = torch.randint(0, 128, (1, 30))
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)


def test_load_model_refuses_pickled_weights(tmp_path):
    model = tiny_causal_lm("llama")
    model.config.save_pretrained(str(tmp_path))
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # a pickle: arbitrary code on load
    with pytest.raises(ModelLoadError, match="only from safetensors"):
        load_model(str(tmp_path), device="cpu")


def test_load_model_errors_are_one_line(tmp_path):
    with pytest.raises(ModelLoadError) as info:
        load_model(str(tmp_path / "nowhere"), device="cpu")
    assert "\n" not in str(info.value) and "config" in str(info.value)


def test_adapter_folder_is_checked(tiny_model_dir, tmp_path):
    with pytest.raises(ModelLoadError, match="not a peft adapter directory"):
        load_model(str(tiny_model_dir), adapter=str(tmp_path), device="cpu")


def test_qlora_without_bitsandbytes_says_how_to_install(tiny_model_dir):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    with pytest.raises(ModelLoadError, match="needs bitsandbytes"):
        load_model(str(tiny_model_dir), quantization="4bit", device="cpu")


def test_load_model_rebuilds_a_saved_lawcat_model(tmp_path):
    from petl.linear import LawcatConfig, convert_to_lawcat, save_lawcat
    from petl.testing import tiny_tokenizer

    tokenizer = tiny_tokenizer()
    model = tiny_causal_lm("llama", vocab_size=len(tokenizer))
    convert_to_lawcat(model, LawcatConfig())
    save_lawcat(model, str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    loaded, _ = load_model(str(tmp_path), device="cpu", dtype="float32")
    assert any(type(m).__name__ == "LawcatAttention" for m in loaded.modules())
    ids = torch.randint(3, 300, (1, 40))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
