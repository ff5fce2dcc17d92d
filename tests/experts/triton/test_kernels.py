"""Every kernel compiles for an H100 (sm_90) as the JIT would specialise it, without a GPU.

The interpreter tests check the arithmetic; this catches what only the
compiler sees (types, layouts, constexpr branches). It runs in a subprocess,
because kernels defined under TRITON_INTERPRET=1 cannot be compiled. Run
directly (python -m tests.experts.triton.test_kernels) it prints, per kernel,
the shared memory, asynchronous copies (software pipelining) and warpgroup
(wgmma) products it compiled to.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

if __name__ != "__main__":  # tests.conftest turns the interpreter on, which cannot compile
    from tests.conftest import import_or_skip

    import_or_skip("triton", reason="Triton is not installed (pip install 'moekit[triton]')")

ROOT = Path(__file__).resolve().parents[3]
TILES = dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, UPCAST=False, PRECISION="tf32")


def _launches(dt: str) -> list[tuple[str, dict, dict]]:
    """(kernel name, runtime argument types, constexpr values) for each launch in
    ops.py, in bfloat16/float16 dt; contiguous weights make the innermost stride 1."""
    rows = dict(slot_ptr="*i64", tile_end_ptr="*i32", offsets_ptr="*i64", num_experts="i32",
                top_k="i32")
    ints = dict.fromkeys(("D", "F", "N", "K", "M", "stride_xt", "stride_we", "stride_wh",
                          "stride_wk", "stride_wn", "stride_wd", "stride_in", "stride_out",
                          "stride_gt", "stride_ar", "stride_br", "stride_oe", "stride_om"), "i32")
    p = f"*{dt}"
    up = dict(x_ptr=p, w1_ptr=p, h_ptr=p, a_ptr=p, **rows)
    to_slots = dict(in_ptr=p, weight_ptr="*fp32", w_ptr=p, out_ptr=p, **rows)
    grads = dict(grad_y_ptr=p, weight_ptr="*fp32", w2_ptr=p, h_ptr=p, grad_h_ptr=p,
                 partial_ptr="*fp32", **rows)
    weight_grad = dict(a_ptr=p, b_ptr=p, slot_ptr="*i64", scale_ptr="*fp32", out_ptr=p,
                       offsets_ptr="*i64", top_k="i32")
    return [
        ("up_kernel", up | ints, dict(GATED=True, ACT=0, STORE_H=True, E_POW2=256, stride_wd=1)),
        ("up_kernel", up | ints, dict(GATED=False, ACT=1, STORE_H=False, E_POW2=8, stride_wd=1)),
        ("rows_to_slots_kernel", to_slots | ints,
         dict(HAS_WEIGHT=True, ATOMIC=False, E_POW2=8, stride_wk=1)),
        ("rows_to_slots_kernel", to_slots | ints | dict(out_ptr="*fp32"),
         dict(HAS_WEIGHT=True, ATOMIC=True, E_POW2=8, stride_wk=1)),
        ("rows_to_slots_kernel", to_slots | ints,
         dict(HAS_WEIGHT=False, ATOMIC=False, E_POW2=8, stride_wn=1, weight_ptr=None)),
        ("down_grad_kernel", grads | ints,
         dict(GATED=True, ACT=0, HAS_WEIGHT=True, E_POW2=8, stride_wf=1)),
        ("weight_grad_kernel", weight_grad | ints,
         dict(GATHER_A=False, GATHER_B=True, SCALE_A=False, stride_on=1, scale_ptr=None)),
        ("weight_grad_kernel", weight_grad | ints,
         dict(GATHER_A=True, GATHER_B=False, SCALE_A=True, stride_on=1)),
    ]


def compile_all(dt: str = "bf16") -> list[str]:
    """Compile each launch for sm_90; one summary line per kernel."""
    import triton
    from triton.backends.compiler import GPUTarget

    from moekit.experts.triton import kernels

    lines = []
    for name, types, constants in _launches(dt) + [
            ("block_rank_kernel", dict(ids_ptr="*i64", rank_ptr="*i32", hist_ptr="*i32",
                                       num_assignments="i32", num_experts="i32"),
             dict(BLOCK=128))]:
        fn = getattr(kernels, name)
        constants = constants if name == "block_rank_kernel" else TILES | constants
        signature, attrs = {}, {}
        for i, arg in enumerate(fn.arg_names):
            signature[arg] = "constexpr" if arg in constants else types[arg]
            if arg not in constants:  # what the JIT assumes of 16-aligned pointers and sizes
                attrs[(i,)] = [["tt.divisibility", 16]]
        source = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constants,
                                           attrs=attrs)
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                                  options=dict(num_warps=8, num_stages=3))
        ttgir = compiled.asm["ttgir"]
        lines.append(f"{name}: shared {compiled.metadata.shared} B, "
                     f"async copies {ttgir.count('async_copy_global_to_local')}, "
                     f"wgmma {ttgir.count('warp_group_dot ')}")
    return lines


def test_kernels_compile_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-m", "tests.experts.triton.test_kernels"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == len(_launches("bf16")) + 1, done.stdout


if __name__ == "__main__":
    print("\n".join(compile_all(sys.argv[1] if len(sys.argv) > 1 else "bf16")))
