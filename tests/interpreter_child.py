"""Run a kernel test module again in a child pytest under Triton's interpreter.

Why a child process: ``TRITON_INTERPRET=1`` must be set before Triton is imported, and it changes
what every later ``@triton.jit`` call does in that process. Setting it in the parent would leak
into the other test modules of the same run (the CUDA tests, the timing-sensitive ones). So a
kernel test module marks its interpreter tests with :func:`child_only` and has one parent test
that calls :func:`run_child_pytest` on its own file; the child sees ``TRITON_INTERPRET=1`` and the
module's marker variable, and runs exactly those tests.

Usage in a test module::

    from tests.interpreter_child import HAS_TRITON, child_only, in_child, run_child_pytest

    CHILD_ENV = "PETL_MY_KERNELS_CHILD"
    child = child_only(CHILD_ENV)

    @pytest.mark.skipif(in_child(CHILD_ENV) or not HAS_TRITON, reason="parent of the interpreter run / no triton")
    def test_kernels_under_triton_interpreter():
        run_child_pytest(__file__, CHILD_ENV, min_passed=10)
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest

HAS_TRITON = importlib.util.find_spec("triton") is not None
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def in_child(env_name: str) -> bool:
    """Whether this process is the interpreter child of the module that owns ``env_name``."""
    return os.environ.get(env_name) == "1"


def child_only(env_name: str) -> pytest.MarkDecorator:
    """Marker for tests that run only inside that module's interpreter child."""
    return pytest.mark.skipif(not in_child(env_name), reason=f"runs inside the TRITON_INTERPRET=1 child ({env_name})")


def run_child_pytest(test_file: str, env_name: str, min_passed: int, timeout: float = 900.0,
                     keyword: str | None = None) -> None:
    """Run ``test_file`` in a child pytest with ``TRITON_INTERPRET=1`` and ``env_name=1``; fail with
    the child's output tail unless it passes and at least ``min_passed`` tests ran (so a child that
    silently skips everything cannot pass). ``PETL_KERNELS`` is dropped so each test's own switch
    decides. ``keyword`` (a pytest ``-k`` expression) restricts the child to those tests: for a
    module whose other CPU tests are too slow to run twice."""
    env = dict(os.environ, TRITON_INTERPRET="1", **{env_name: "1"})
    env.pop("PETL_KERNELS", None)
    select = ["-k", keyword] if keyword else []
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *select, test_file],
                          env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    summary = proc.stdout.strip().splitlines()[-1]
    passed = int(summary.split(" passed")[0].split()[-1]) if " passed" in summary else 0
    assert passed >= min_passed, f"only {passed} interpreter tests ran (expected >= {min_passed}): {summary}"
