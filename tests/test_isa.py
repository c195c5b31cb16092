"""Each Opt4GPTQ optimization, shown in the machine code the compilers emit.

No GPU is needed: the exllama family (4-bit, 8 rows per block) is compiled for
AMD gfx906 (HYGON DCU Z100 / MI50) with hipcc and for NVIDIA sm_90a with nvcc,
disassembled, and each variant's kernel is compared with the baseline's. The
assertions were chosen from what the compilers really emit (hipcc 5.2 with
LLVM 15; nvcc 13.0), and each says why it shows the mechanism, or its absence.

Tools are looked up on PATH and in .toolchain/ (where .ci/run installs them);
a missing one skips its platform with the reason.
"""

from __future__ import annotations

import collections
import os
import re
import subprocess
from pathlib import Path

import pytest

from conftest import find_tool

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "csrc" / "gptq" / "instances" / "exllama_b4.cu"
KERNEL = re.compile(r"gemm_exllama_(splitk|smb)_kernelILi(\d)ELi(\d)ELb([01])ELb([01])E")


def kernel_ops(listing: dict, structure: str, vml: bool, ila: bool) -> collections.Counter:
    """Mnemonic counts of the 4-bit, 8-row kernel of one structure and flag set."""
    for name, ops in listing.items():
        m = KERNEL.search(name)
        if m and m.groups() == (structure, "4", "8", str(int(vml)), str(int(ila))):
            return ops
    raise AssertionError(f"no {structure} kernel with VML={vml} ILA={ila} in the disassembly")


def count(ops: collections.Counter, prefix: str) -> int:
    return sum(n for op, n in ops.items() if op.startswith(prefix))


@pytest.fixture(scope="module")
def gfx906(tmp_path_factory) -> dict:
    tools = {name: find_tool(*names) for name, names in {
        "hipcc": ["hipcc"], "objcopy": ["objcopy"],
        "bundler": ["clang-offload-bundler-15", "clang-offload-bundler"],
        "objdump": ["llvm-objdump-15", "llvm-objdump"]}.items()}
    missing = [name for name, path in tools.items() if path is None]
    if missing:
        pytest.skip(f"ROCm disassembly needs {', '.join(missing)} (apt install hipcc libamdhip64-dev rocm-device-libs)")
    work = tmp_path_factory.mktemp("gfx906")
    # hipcc picks NVIDIA as its platform when nvcc is on PATH: say AMD.
    env = dict(os.environ, HIP_PLATFORM="amd")
    run = lambda *cmd: subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)  # noqa: E731
    run(tools["hipcc"], "-x", "hip", "-O3", "-std=c++17", "--offload-arch=gfx906", "-c", str(SOURCE), "-o", str(work / "k.o"))
    run(tools["objcopy"], "-O", "binary", "--only-section=.hip_fatbin", str(work / "k.o"), str(work / "fat.bin"))
    run(tools["bundler"], "--unbundle", "--type=o", f"--input={work / 'fat.bin'}",
        "--targets=hipv4-amdgcn-amd-amdhsa--gfx906", f"--output={work / 'gfx906.co'}")
    text = run(tools["objdump"], "-d", "--mcpu=gfx906", str(work / "gfx906.co")).stdout
    listing = {}
    for block in re.split(r"\n(?=[0-9a-f]+ <)", text):
        head = re.match(r"[0-9a-f]+ <(\S+)>:", block)
        if head:
            listing[head.group(1)] = collections.Counter(re.findall(r"^\s+([a-z_0-9]+)\s", block, re.M))
    return listing


def sm90_listing(tmp_path_factory, source: Path) -> dict:
    """Mnemonic counts per kernel of `source` compiled for sm_90a."""
    nvcc, cuobjdump, nvdisasm = find_tool("nvcc"), find_tool("cuobjdump"), find_tool("nvdisasm")
    if not (nvcc and cuobjdump and nvdisasm):
        pytest.skip("CUDA disassembly needs nvcc, cuobjdump and nvdisasm (see .ci/run for the PyPI packages)")
    work = tmp_path_factory.mktemp("sm90")
    subprocess.run([nvcc, "-cubin", "-gencode=arch=compute_90a,code=sm_90a", "-O3", "-std=c++17",
                    "-o", str(work / "k.cubin"), str(source)], check=True, capture_output=True)
    env = dict(os.environ, NVDISASM_PATH=str(Path(nvdisasm).parent))
    text = subprocess.run([cuobjdump, "-sass", str(work / "k.cubin")], check=True, capture_output=True,
                          text=True, env=env).stdout
    listing = {}
    for block in re.split(r"\n\s*Function : ", text)[1:]:
        name = block.split("\n", 1)[0].strip()
        listing[name] = collections.Counter(re.findall(r"\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_.]+)", block))
    return listing


@pytest.fixture(scope="module")
def sm90(tmp_path_factory) -> dict:
    return sm90_listing(tmp_path_factory, SOURCE)


@pytest.fixture(scope="module")
def sm90_mma(tmp_path_factory) -> dict:
    return sm90_listing(tmp_path_factory, ROOT / "csrc" / "gptq" / "instances" / "mma_b4.cu")


@pytest.fixture(scope="module")
def sm90_wgmma(tmp_path_factory) -> dict:
    return sm90_listing(tmp_path_factory, ROOT / "csrc" / "gptq" / "instances" / "wgmma_b4.cu")


# --- AMD gfx906 -----------------------------------------------------------------------

def test_gfx906_smb_reduces_in_lds_where_the_baseline_stores_a_share_per_k_block(gfx906):
    # Neither uses atomics. The baseline's split-K epilogue stores each K
    # block's shares in its own workspace slice (splitk_sum.cuh): one 8-byte
    # global_store_dwordx2 of 4 fp16 shares per row of the 8-row block, every
    # K block again. SMB meets its K slices in LDS (more ds_write/ds_read) and
    # stores each output element once, 2 bytes (global_store_short).
    base, smb = kernel_ops(gfx906, "splitk", False, False), kernel_ops(gfx906, "smb", False, False)
    assert count(base, "global_atomic") == 0 and count(smb, "global_atomic") == 0
    assert count(base, "global_store_dwordx2") == 8 and count(base, "global_store_short") == 0
    assert count(smb, "global_store_short") >= 1 and count(smb, "global_store_dwordx2") == 0
    assert count(smb, "ds_write") > count(base, "ds_write") and count(smb, "ds_read") > count(base, "ds_read")


def test_gfx906_split_k_slices_are_added_in_fp32(gfx906):
    # The summing kernel: 8-byte loads of 4 shares per slice, fp32 adds, no atomics.
    total = next(ops for name, ops in gfx906.items() if "splitk_sum_kernel" in name)
    assert count(total, "global_load_dwordx2") >= 1 and count(total, "v_add_f32") >= 4
    assert count(total, "global_atomic") == 0


def test_gfx906_vml_stages_activations_16_bytes_at_a_time(gfx906):
    # Staging: the baseline moves one half per thread (global_load_ushort ->
    # ds_write_b16); VML adds a 16-byte path (global_load_dwordx4 -> ds_write_b128).
    base, vml = kernel_ops(gfx906, "splitk", False, False), kernel_ops(gfx906, "splitk", True, False)
    assert count(base, "ds_write_b128") == 0 and count(vml, "ds_write_b128") >= 1
    assert count(vml, "global_load_dwordx4") > count(base, "global_load_dwordx4")
    assert count(base, "global_load_ushort") >= 1  # the scalar path stays for act-order gathers


def test_gfx906_ila_emits_the_same_packed_instructions_the_compiler_already_chose(gfx906):
    # The packed-half math is v_pk_fma_f16 / v_pk_add_f16 (VOP3P) in BOTH
    # kernels: LLVM already lowers __hfma2/__hadd2 to them on gfx906, so ILA
    # adds no new instruction here (the paper's DTK compiler may have differed).
    base, ila = kernel_ops(gfx906, "splitk", False, False), kernel_ops(gfx906, "splitk", False, True)
    assert count(base, "v_pk_fma_f16") > 0 and count(ila, "v_pk_fma_f16") == count(base, "v_pk_fma_f16")
    assert count(ila, "v_pk_add_f16") == count(base, "v_pk_add_f16") > 0
    # What the asm does change: its register operands stop the compiler from
    # fusing the activation pair reads (4 bytes each, at the rows the 4-bit
    # tensor-core pack order puts together) into 64-bit LDS loads.
    assert count(base, "ds_read2_b64") > count(ila, "ds_read2_b64")
    assert count(ila, "ds_read2_b32") > count(base, "ds_read2_b32")


# --- NVIDIA sm_90a --------------------------------------------------------------------

def test_sm90_smb_reduces_in_shared_memory_where_the_baseline_stores_a_share_per_k_block(sm90):
    # Neither uses atomics (vLLM's kernel has ATOM.E.ADD.F16 here). The
    # baseline stores each K block's shares in its own workspace slice: two
    # 4-byte STG.E (half2) per row of the 8-row block. SMB adds its K slices
    # in shared memory and stores each output element once (STG.E.U16).
    base, smb = kernel_ops(sm90, "splitk", False, False), kernel_ops(sm90, "smb", False, False)
    assert count(base, "ATOM") + count(base, "RED") == 0 and count(smb, "ATOM") + count(smb, "RED") == 0
    assert count(base, "STG.E") == 16 and count(base, "STG.E.U16") == 0
    assert count(smb, "STG.E.U16") >= 1
    assert count(smb, "STS") > count(base, "STS") and count(smb, "LDS") > count(base, "LDS")


def test_sm90_split_k_slices_are_added_in_fp32(sm90):
    # The summing kernel: 8-byte loads of 4 shares per slice, fp32 adds, no atomics.
    total = next(ops for name, ops in sm90.items() if "splitk_sum_kernel" in name)
    assert count(total, "LDG.E.64") >= 1 and count(total, "FADD") >= 4
    assert count(total, "ATOM") + count(total, "RED") == 0


def test_sm90_vml_adds_128_bit_activation_staging(sm90):
    base, vml = kernel_ops(sm90, "splitk", False, False), kernel_ops(sm90, "splitk", True, False)
    assert count(base, "STS.128") == 0 and count(vml, "STS.128") >= 1
    assert count(vml, "LDG.E.128") > count(base, "LDG.E.128")


def test_sm90_ila_is_the_same_machine_code(sm90):
    # cuda_fp16's __hfma2 is itself fma.rn.f16x2 PTX: ILA yields the same SASS mix.
    base, ila = kernel_ops(sm90, "splitk", False, False), kernel_ops(sm90, "splitk", False, True)
    assert count(base, "HFMA2") > 0 and count(ila, "HFMA2") == count(base, "HFMA2")
    assert count(ila, "HADD2") == count(base, "HADD2")


def test_sm90_mma_path_runs_on_the_tensor_cores_without_atomics(sm90_mma):
    # The 4-bit decode path (gemm_mma.cuh): HMMA.16816.F32 is mma.sync m16n8k16
    # with fp32 accumulators; weights arrive as 128-bit loads that skip L1
    # (LDG.E.NA.128.CONSTANT: .nc + L1::no_allocate); the K-slices meet in shared memory,
    # so no global atomics and no reduction instructions at all.
    kernels = {name: ops for name, ops in sm90_mma.items() if "gemm_mma_kernel" in name}
    # 8 or 16 rows per block, 16 or 4 K-slice warps, contiguous or gathered activations.
    assert len(kernels) >= 4, sorted(sm90_mma)
    for name, ops in kernels.items():
        assert count(ops, "HMMA.16816.F32") >= 4, name
        assert count(ops, "LDG.E.NA.128") >= 1, name
        assert count(ops, "ATOM") == 0 and count(ops, "RED") == 0, name


def test_sm90_tiled_mma_kernel_stages_operands_through_shared_memory(sm90_mma):
    # The batch kernel (gemm_mma_tiled.cuh), in its two shapes (one or two
    # packs per K-warp and stage): weights, activations and group data of each
    # stage arrive by cp.async (LDGSTS, 16 bytes, L1 bypassed), are read back
    # from shared memory (weights LDS.128, activation pairs, the B fragments as
    # stored, 32-bit LDS: 4 per token tile) and multiplied on the tensor cores
    # (HMMA.16816.F32: 2 per m16 tile per token tile, 32 per pack and warp);
    # K-warps and cluster blocks meet in shared memory, so no atomics.
    kernels = {name: ops for name, ops in sm90_mma.items() if "gemm_mma_tiled_kernel" in name}
    assert len(kernels) == 2, sorted(sm90_mma)
    for name, ops in kernels.items():
        packs = 2 if "Li3ELi2ELi2E" in name else 1
        assert count(ops, "HMMA.16816.F32") >= 32 * packs, name
        assert count(ops, "LDGSTS.E.BYPASS.128") >= 3 * packs, name
        assert count(ops, "LDS.128") >= packs, name
        assert count(ops, "LDS") - count(ops, "LDS.") >= 32 * packs, name
        assert count(ops, "ATOM") == 0 and count(ops, "RED") == 0, name


WGMMA_KERNEL = re.compile(r"gemm_wgmma_kernelINS_10WgmmaShapeILi(\d+)ELi(\d+)ELi(\d+)ELi(\d+)E")


def test_sm90_wgmma_kernels_run_on_the_warpgroup_tensor_cores_fed_by_the_copy_engine(sm90_wgmma):
    # The Hopper family (gemm_wgmma.cuh), every block shape: HGMMA.64xNx16.F32
    # is wgmma m64nNk16 with fp32 accumulators (N = the block's rows), one per
    # k16 step of a stage and none of mma.sync's HMMA; the weight and activation
    # boxes arrive by the tensor copy engine (two 3-D tensor copies per stage:
    # UTMALDG), the scale and zero rows by the producer lanes' cp.async
    # (LDGSTS), never by one small bulk copy each (UBLKCP: ~80 ns of copy
    # engine per row, benchmarks/NOTES.md), all on transaction barriers (SYNCS); weights
    # reach the registers by 8-byte shared loads. Beyond 64 rows the producer
    # warpgroup hands registers to the consumers (setmaxnreg: USETMAXREG).
    # Cluster blocks add their K ranges through shared memory: no atomics.
    kernels = {WGMMA_KERNEL.search(name).groups(): ops for name, ops in sm90_wgmma.items() if WGMMA_KERNEL.search(name)}
    assert {int(tokens) for tokens, *_ in kernels} == {8, 16, 32, 64, 128, 256}, sorted(sm90_wgmma)
    for (tokens, stage_k, _, _), ops in kernels.items():
        name = f"{tokens} rows, {stage_k} k per stage"
        assert count(ops, "HGMMA") >= int(stage_k) // 16, name
        assert count(ops, "HMMA") == 0, name
        assert count(ops, "UTMALDG") >= 2 and count(ops, "LDGSTS") >= 1, name
        assert count(ops, "UBLKCP") == 0, name
        assert count(ops, "SYNCS") >= 1 and count(ops, "LDS.64") >= 1, name
        assert count(ops, "ATOM") == 0 and count(ops, "RED") == 0, name
        assert (count(ops, "USETMAXREG") >= 2) == (int(tokens) > 64), name
