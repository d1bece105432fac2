"""Two CPU processes (gloo, launched with torchrun) train to the same adapter as one process.

`accelerate launch` starts GPU jobs through torchrun (its multi-GPU launcher); on CPUs it would need
mpirun, so the test launches torchrun directly, which exercises the same distributed code path in
petl: Trainer + accelerate with a process group. Two processes with per-device batch 1 see, at each
step, the two consecutive batches that one process with batch 1 and gradient accumulation 2 sees
(accelerate shards batches round-robin), and DDP averages gradients as accumulation does. So both
runs must end at the same weights.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.test_finetune import shrink


@pytest.mark.slow
def test_two_process_run_matches_one_process(tiny_model_dir, text_file, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    common = {"train.max_steps": 3, "eval.perplexity_lengths": "[]", "eval.before_training": "false",
              "train.lr": "1e-3", "train.logging_steps": 1}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "petl.cli.main", "finetune", "quickstart",
                    *shrink(tiny_model_dir, text_file, one, **common, **{"train.grad_accum": 2})],
                   env=env, check=True, capture_output=True)
    launched = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", "29561", "-m", "petl.cli.main", "finetune", "quickstart", *shrink(tiny_model_dir, text_file, two, **common)],
                              env=env, capture_output=True, text=True)
    assert launched.returncode == 0, launched.stderr[-3000:]
    a = load_file(str(one / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(two / "adapter" / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    moved = max((a[k] - base[k.replace("base_model.model.", "")]).abs().max().item()
                for k in a if "lora" not in k and k.replace("base_model.model.", "") in base)
    assert moved > 1e-4, "training changed nothing; the comparison would be vacuous"
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-4, atol=1e-5, msg=key)
