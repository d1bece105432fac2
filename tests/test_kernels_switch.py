"""The global kernel switch PETL_KERNELS (petl/kernels/switch.py)."""
from __future__ import annotations

import pytest
import torch

from petl.kernels import switch


@pytest.fixture(autouse=True)
def clean_env(monkeypatch):
    monkeypatch.delenv(switch.ENV_KERNELS, raising=False)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_mode_precedence(monkeypatch):
    assert switch.kernel_mode() == "auto"
    monkeypatch.setenv(switch.ENV_KERNELS, "off")
    assert switch.kernel_mode() == "off"
    assert switch.kernel_mode("on") == "on"      # an explicit setting beats the environment
    assert switch.kernel_mode("auto") == "off"   # "auto" defers to the environment


def test_bad_mode_is_one_line(monkeypatch):
    monkeypatch.setenv(switch.ENV_KERNELS, "fast")
    with pytest.raises(ValueError, match=r"PETL_KERNELS='fast' is not a kernel mode; use one of") as err:
        switch.kernel_mode()
    assert "\n" not in str(err.value)


def test_auto_uses_references_on_cpu_and_off_never_uses_kernels(monkeypatch):
    cpu = torch.device("cpu")
    assert switch.use_kernels(cpu) is False
    assert switch.use_kernels(torch.device("cuda"), "off") is False
    monkeypatch.setattr(switch, "triton_available", lambda: True)
    assert switch.use_kernels(torch.device("cuda")) is True
    monkeypatch.setattr(switch, "triton_available", lambda: False)
    assert switch.use_kernels(torch.device("cuda")) is False


def test_on_explains_what_is_missing(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setattr(switch, "triton_available", lambda: True)
    with pytest.raises(RuntimeError, match="needs TRITON_INTERPRET=1"):
        switch.use_kernels(cpu, "on")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert switch.use_kernels(cpu, "on") is True
    monkeypatch.setattr(switch, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match="Triton is not installed"):
        switch.use_kernels(cpu, "on")
