"""Compiles the Triton attention kernels to a Hopper (sm_90) cubin without a GPU: Triton's own front end, its
MLIR passes and ptxas, as on the device. Run as a script, outside the Triton interpreter that conftest.py turns
on where there is no CUDA (`python tests/platform/compile_attention_kernels.py`); prints one line per kernel."""

from __future__ import annotations

import itertools

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from loomserve.platform.attention import triton_kernels

POINTERS = {
    "out_ptr": "*bf16", "q_ptr": "*bf16", "k_cache_ptr": "*bf16", "v_cache_ptr": "*bf16",
    "block_tables_ptr": "*i32", "seq_lens_ptr": "*i32", "query_start_loc_ptr": "*i32", "seq_counts_ptr": "*i64",
    "part_out_ptr": "*fp32", "part_lse_ptr": "*fp32", "slot_ptr": "*i64", "k_ptr": "*bf16", "v_ptr": "*bf16",
    "scale": "fp32", "k_scale_ptr": "*fp32", "v_scale_ptr": "*fp32",
}
FP8_CACHES = ("fp8e4nv", "fp8e5")  # torch.float8_e4m3fn, torch.float8_e5m2


def source(kernel, constants: dict, cache: str = "bf16") -> ASTSource:
    """The kernel's source for bf16 queries over a cache of `cache` elements."""
    constants = {"KV_FP8": cache != "bf16", **constants}
    constants = {name: value for name, value in constants.items() if name in kernel.arg_names}
    pointers = {**POINTERS, "k_cache_ptr": f"*{cache}", "v_cache_ptr": f"*{cache}"}
    signature = {name: "constexpr" if name in constants else pointers.get(name, "i32") for name in kernel.arg_names}
    return ASTSource(kernel, signature, constexprs={(kernel.arg_names.index(k),): v for k, v in constants.items()})


def main() -> None:
    target = GPUTarget("cuda", 90, 32)
    for (group, head_dim), has_prefill in itertools.product([(7, 64), (4, 128)], [True, False]):
        constants = dict(GROUP=group, GROUP_PAD=triton.next_power_of_2(group), BLOCK_SIZE=16, HEAD_DIM=head_dim,
                         HEAD_DIM_PAD=head_dim, SPLIT_MIN=128, MAX_SPLITS=16, DECODE_BLOCK_Q=2, DECODE_BLOCK_N=64,
                         PREFILL_BLOCK_Q=8, PREFILL_BLOCK_N=64, PRECISION="tf32", HAS_PREFILL=has_prefill)
        kernels = [triton_kernels.paged_attention_kernel] + [triton_kernels.combine_splits_kernel] * has_prefill
        for kernel in kernels:
            compiled = triton.compile(source(kernel, constants), target=target)
            print(f"{kernel.__name__} group={group} head_dim={head_dim} has_prefill={has_prefill}: "
                  f"{len(compiled.asm['cubin'])} bytes")
    compiled = triton.compile(source(triton_kernels.write_kv_kernel, dict(ROW=128, ROW_PAD=128, FP8_MAX=0.0)),
                              target=target)
    print(f"write_kv_kernel: {len(compiled.asm['cubin'])} bytes")
    for cache in FP8_CACHES:  # the fp8 KV cache's write; attention differs between the formats by one conversion
        write = dict(ROW=128, ROW_PAD=128, FP8_MAX=448.0)
        compiled = triton.compile(source(triton_kernels.write_kv_kernel, write, cache), target=target)
        print(f"write_kv_kernel cache={cache}: {len(compiled.asm['cubin'])} bytes")
    mixed = dict(constants, HAS_PREFILL=True)
    compiled = triton.compile(source(triton_kernels.paged_attention_kernel, mixed, FP8_CACHES[0]), target=target)
    print(f"paged_attention_kernel cache={FP8_CACHES[0]}: {len(compiled.asm['cubin'])} bytes")


if __name__ == "__main__":
    main()
