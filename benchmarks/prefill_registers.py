"""Registers and spills of the LAWCAT prefill kernels in an sm_90 build, on a machine without a GPU.

Why: the output pass is register-bound at F = V = 128 (it spilled about 1 KB per thread at 4 warps
while the strong-gate exact scores lived in the same kernel). Triton compiles for a target GPU
without one present, and ``ptxas -v`` reports the registers and spill bytes of the result, so a
change to the kernels can be judged for register pressure before the GPU time to time it.

Run: ``python -m benchmarks.prefill_registers [--ptxas PATH] [--warps 4 8]``. Needs a ptxas that
accepts sm_90a (CUDA 12+; ``$PTXAS``, then ``ptxas`` on PATH, then /usr/local/cuda/bin/ptxas). A
ptxas older than Triton's PTX is handed the PTX with its ``.version`` line lowered to the ptxas's
own. Not a timing: the H200's Triton (3.6) may allocate differently from the one installed here.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from petl.linear import kernel_prefill as kp

def _signature(kernel, F: int, V: int, C: int, BV: int, H: int, group: int, bk: int) -> tuple[dict, dict]:
    """Triton signature and constants of one prefill kernel for bf16 inputs, in argument order."""
    names = list(kernel.arg_names)
    types = {"zs_ptr": "*fp32", "pz_ptr": "*fp32", "d_ptr": "*fp32", "u_ptr": "*fp32", "uz_ptr": "*fp32",
             "a_ptr": "*fp32", "strong_ptr": "*i8", "valid_ptr": "*i8", "inv_norm": "fp32", "eps": "fp32",
             "span_max": "fp32"}
    consts = dict(H=H, G=1, F=F, V=V, C=C, BV=BV, BK=bk, GROUP=group, HAS_VALID=False, PREC="tf32", SPLIT=True)
    sig = {}
    for name in names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in types:
            sig[name] = types[name]
        else:
            sig[name] = "*bf16" if name.endswith("_ptr") else "i32"
    used = {key: val for key, val in consts.items() if key in sig}
    return sig, {(names.index(key),): val for key, val in used.items()}


def _ptxas() -> str:
    for cand in (os.environ.get("PTXAS"), shutil.which("ptxas"), "/usr/local/cuda/bin/ptxas"):
        if cand and os.path.isfile(cand):
            return cand
    raise SystemExit("no ptxas found: set $PTXAS to a CUDA 12+ ptxas")


def report(kernel, warps: int, ptxas: str, F: int = 128, V: int = 128, C: int = 64, BV: int = 128,
           H: int = 32, group: int = kp.GROUP, bk: int = kp.GROUP_BK) -> str:
    """ptxas's register/spill lines for ``kernel`` built for sm_90 at ``warps`` warps."""
    sig, consts = _signature(kernel, F, V, C, BV, H, group, bk)
    compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts),
                              target=GPUTarget("cuda", 90, 32), options={"num_warps": warps, "num_stages": 1})
    ptx = compiled.asm["ptx"]
    version = subprocess.run([ptxas, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"release (\d+)\.(\d+)", version)
    if found:  # CUDA 12.x / 13.x ptxas accept PTX ISA 8.x / 9.x: lower Triton's if it is newer
        major, minor = int(found.group(1)), int(found.group(2))
        ptx = re.sub(r"^\.version \d+\.\d+", f".version {major - 4}.{min(minor, 9)}", ptx, count=1, flags=re.M)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as fh:
            fh.write(ptx)
        out = subprocess.run([ptxas, "-v", "--gpu-name=sm_90a", src, "-o", os.path.join(tmp, "k.cubin")],
                             capture_output=True, text=True)
    if out.returncode:
        return "ptxas failed: " + out.stderr.strip().splitlines()[-1]
    return "; ".join(line.split(":", 1)[-1].strip() for line in out.stderr.splitlines()
                     if "spill" in line or "registers" in line)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ptxas", default=None)
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8])
    args = ap.parse_args()
    ptxas = args.ptxas or _ptxas()
    for kernel in (kp._chunk_group_kernel, kp._chunk_update_kernel, kp._output_kernel, kp._output_exact_kernel):
        for warps in args.warps:
            print(f"{kernel.__name__:24s} {warps} warps: {report(kernel, warps, ptxas)}", flush=True)


if __name__ == "__main__":
    main()
