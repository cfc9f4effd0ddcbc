"""The peak-FLOPS table against the names GPUs really report.

The strings are what `torch.cuda.get_device_name()` (cudaGetDeviceProperties) returns on those
cards, MIG slices included; a pattern written for a marketing name can match the wrong SKU.
"""

from __future__ import annotations

import pytest

from train.flops import peak_flops

# (reported name, dense bf16 peak, dense TF32 peak)
REAL_NAMES = [
    ("NVIDIA H100 80GB HBM3", 989e12, 494.5e12),  # SXM5
    ("NVIDIA H100 PCIe", 756e12, 378e12),
    ("NVIDIA H100 NVL", 835e12, 417.5e12),
    ("NVIDIA H200", 989e12, 494.5e12),  # SXM
    ("NVIDIA H200 NVL", 835e12, 417.5e12),  # PCIe card: not the SXM peak
    ("NVIDIA H800", 989e12, 494.5e12),  # SXM
    ("NVIDIA H800 PCIe", 756e12, 378e12),  # not the SXM peak
    ("NVIDIA GH200 480GB", 989e12, 494.5e12),
    ("NVIDIA H20", 148e12, 74e12),
    ("NVIDIA B200", 2250e12, 1100e12),
    ("NVIDIA A100-SXM4-80GB", 312e12, 156e12),
    ("NVIDIA A100-PCIE-40GB", 312e12, 156e12),
    ("NVIDIA A10G", 70e12, 35e12),
    ("NVIDIA A10", 125e12, 62.5e12),
    ("NVIDIA L40S", 362e12, 183e12),
    ("NVIDIA L4", 121e12, 60e12),
    ("NVIDIA GeForce RTX 4090", 165.2e12, 82.6e12),
]


@pytest.mark.parametrize("name, bf16, tf32", REAL_NAMES, ids=[n for n, _, _ in REAL_NAMES])
def test_each_reported_name_gets_its_own_skus_peak(name, bf16, tf32):
    assert peak_flops(name, "bf16") == bf16
    assert peak_flops(name, "fp16") == bf16
    assert peak_flops(name, "no") == tf32


@pytest.mark.parametrize("name", ["NVIDIA A100-SXM4-40GB MIG 1g.5gb", "NVIDIA A100-SXM4-80GB MIG 3g.40gb",
                                  "NVIDIA H100 80GB HBM3 MIG 1g.10gb", "NVIDIA H200 MIG 7g.141gb"])
def test_a_mig_slice_reports_no_peak_so_no_mfu(name):
    assert peak_flops(name, "bf16") is None
    assert peak_flops(name, "no") is None


def test_fp32_without_tf32_uses_the_plain_fp32_peak():
    assert peak_flops("NVIDIA H100 80GB HBM3", "no", tf32=False) == 67e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "no", tf32=False) == 19.5e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "bf16", tf32=False) == 312e12  # 16-bit is unaffected
