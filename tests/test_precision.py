"""Precision choice: ``auto`` is bf16 only where the CPU runs it natively (AVX512-BF16 / AMX-BF16), else fp32."""
from __future__ import annotations

import contextlib

import pytest
import torch

from phivlm import runtime
from phivlm.errors import PhivlmError
from phivlm.runtime import autocast, choose_precision, cpu_bf16, cpu_flags

CPU = torch.device("cpu")


@pytest.fixture
def fresh_resolve():
    """``resolve_precision`` caches per (precision, device): clear it around tests that fake the CPU."""
    runtime.resolve_precision.cache_clear()
    yield
    runtime.resolve_precision.cache_clear()


@pytest.mark.parametrize("flag,native", [("avx512_bf16", "AVX512-BF16"), ("amx_bf16", "AMX-BF16")])
def test_auto_is_bf16_with_native_instructions(flag, native):
    chosen, why = choose_precision("auto", CPU, flags=frozenset({"fpu", "avx2", flag}))
    assert chosen == "bf16"
    assert native in why and "warning" not in why
    assert cpu_bf16(frozenset({flag})) == native


def test_auto_is_fp32_without_them():
    chosen, why = choose_precision("auto", CPU, flags=frozenset({"fpu", "sse4_2", "avx2", "avx512f"}))
    assert chosen == "fp32"
    assert "AVX512-BF16" in why and "AMX-BF16" in why and "warning" not in why
    assert cpu_bf16(frozenset({"avx2", "avx512f"})) is None
    assert choose_precision("auto", CPU, flags=frozenset())[0] == "fp32"  # no flags reported at all


def test_explicit_bf16_without_native_warns():
    chosen, why = choose_precision("bf16", CPU, flags=frozenset({"avx2"}))
    assert chosen == "bf16"
    assert "warning" in why and "AVX512-BF16" in why and "AMX-BF16" in why and "fp32" in why
    chosen, why = choose_precision("bf16", CPU, flags=frozenset({"amx_bf16"}))
    assert chosen == "bf16" and "warning" not in why


def test_explicit_fp32_is_kept():
    assert choose_precision("fp32", CPU, flags=frozenset({"amx_bf16"})) == ("fp32", "asked for")


def test_fp16_on_cpu_is_an_error():
    for flags in (frozenset(), frozenset({"amx_bf16", "avx512_fp16"})):
        with pytest.raises(PhivlmError, match="fp16 is GPU-only"):
            choose_precision("fp16", CPU, flags=flags)
    assert choose_precision("fp16", torch.device("cuda"))[0] == "fp16"  # fine on a GPU (no CUDA call made)


def test_unknown_precision():
    with pytest.raises(PhivlmError, match=r"unknown precision 'fp8'; valid: auto, bf16, fp32, fp16"):
        choose_precision("fp8", CPU, flags=frozenset())
    with pytest.raises(PhivlmError, match="unknown precision 'BF16'"):
        choose_precision("BF16", torch.device("cuda"))


X86_CPUINFO = """processor\t: 0
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: fpu vme de pse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
bugs\t\t: spectre_v1

processor\t: 1
vendor_id\t: GenuineIntel
flags\t\t: fpu vme de pse avx2 avx512f avx512_bf16 amx_bf16 amx_tile
"""
AMD_CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme de pse sse4_2 avx avx2 fma
"""
ARM_CPUINFO = """processor\t: 0
BogoMIPS\t: 50.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics bf16
CPU implementer\t: 0x41
"""


def test_cpu_flags_parses_cpuinfo(tmp_path):
    x86 = tmp_path / "x86"
    x86.write_text(X86_CPUINFO)
    flags = cpu_flags(x86)
    assert flags == frozenset("fpu vme de pse avx2 avx512f avx512_bf16 amx_bf16 amx_tile".split())
    assert "spectre_v1" not in flags and "GenuineIntel" not in flags
    assert choose_precision("auto", CPU, flags=flags)[0] == "bf16"
    amd = tmp_path / "amd"
    amd.write_text(AMD_CPUINFO)
    assert cpu_flags(amd) == frozenset("fpu vme de pse sse4_2 avx avx2 fma".split())
    assert choose_precision("auto", CPU, flags=cpu_flags(amd))[0] == "fp32"
    arm = tmp_path / "arm"
    arm.write_text(ARM_CPUINFO)
    assert {"asimd", "bf16"} <= cpu_flags(arm) and "0x41" not in cpu_flags(arm)
    (tmp_path / "none").write_text("processor\t: 0\n")
    assert cpu_flags(tmp_path / "none") == frozenset()
    assert cpu_flags(tmp_path / "missing") == frozenset()  # e.g. not Linux: no flags, no crash


def test_autocast_fp32_is_a_null_context():
    ctx = autocast(CPU, "fp32")
    assert isinstance(ctx, contextlib.nullcontext)
    a = torch.randn(4, 4)
    with ctx:
        assert not torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.float32


def test_autocast_bf16_enables_cpu_autocast():
    a = torch.randn(4, 4)
    with autocast(CPU, "bf16"):
        assert torch.is_autocast_enabled("cpu")
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert (a @ a).dtype == torch.bfloat16
    assert not torch.is_autocast_enabled("cpu")
    with pytest.raises(PhivlmError, match="GPU-only"):
        autocast(CPU, "fp16")


@pytest.mark.parametrize("flags,enabled", [({"avx2", "amx_bf16"}, True), ({"avx2"}, False)])
def test_autocast_auto_follows_the_cpu_flags(monkeypatch, fresh_resolve, flags, enabled):
    monkeypatch.setattr(runtime, "cpu_flags", lambda cpuinfo="/proc/cpuinfo": frozenset(flags))
    assert runtime.resolve_precision("auto", "cpu") == ("bf16" if enabled else "fp32")
    a = torch.randn(4, 4)
    with autocast(CPU, "auto"):
        assert torch.is_autocast_enabled("cpu") == enabled
        assert (a @ a).dtype == (torch.bfloat16 if enabled else torch.float32)


def test_training_default_precision_is_auto():
    from phivlm.config import RunConfig, TrainConfig

    assert TrainConfig().precision == "auto"
    assert RunConfig().train.precision == "auto"
