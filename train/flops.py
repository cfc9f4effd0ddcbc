"""FLOPs per token and model FLOPs utilization (MFU).

MFU = achieved model FLOP/s per device / the device's peak dense FLOP/s, where

    achieved = tokens_per_second_per_device x flops_per_token
    flops_per_token = 6 * N + 12 * L * H * Q * T                       (PaLM, Appendix B)

with N the parameters that take part in matrix multiplies (every ``nn.Linear`` weight,
the output head included; the embedding lookup excluded), L layers, H attention heads,
Q head dim and T the sequence length. 6N is forward (2N) plus backward (4N); 12·L·H·Q·T
is the attention score and value matmuls (QK^T and AV, 2·T·H·Q each per layer forward,
x3 with backward). As in PaLM and torchtitan the attention term counts the full T x T
matrix, not the causal half, and activation recomputation is not counted: MFU measures the
model's FLOPs, not the hardware's (which would be HFU). Norms, softmax, RoPE and the loss
are left out (a few % of the total at these sizes).

The peak is the device's dense 16-bit tensor-core rate (bf16 == fp16 on every GPU listed)
for PRECISION=bf16/fp16; for fp32 training (PRECISION=no) it is the dense TF32 rate when TF32
matmuls are on (train.tf32, the default) and the plain FP32 rate when they are off: the peak
of the math that really runs. Unknown devices, MIG slices, CPUs and fp8 give ``None``
(reported as "n/a", never a made-up number).
"""

from __future__ import annotations

import re

# Dense (not 2:4 sparse) peak FLOP/s from the vendors' datasheets. First match wins, so
# specific names (H200 NVL, H100 NVL, H800 PCIe, A10G, L40S) come before the families they
# contain. Patterns are checked against real ``torch.cuda.get_device_name()`` strings in
# tests/test_flops.py. Columns: 16-bit (bf16/fp16) tensor, TF32 tensor, plain FP32 (no tensor
# cores: what PRECISION=no runs with train.tf32=false).
_PEAKS: list[tuple[str, float, float | None, float | None]] = [
    (r"\bGB200\b", 2500e12, 1250e12, 80e12),
    (r"\bB200\b", 2250e12, 1100e12, 80e12),
    (r"\bH200\b.*\bNVL\b", 835e12, 417.5e12, 60e12),  # PCIe card, H100 NVL clocks
    (r"\bH200\b", 989e12, 494.5e12, 67e12),
    (r"\bGH200\b", 989e12, 494.5e12, 67e12),
    (r"\bH100\b.*\bNVL\b", 835e12, 417.5e12, 60e12),
    (r"\bH100\b.*\bPCIe\b", 756e12, 378e12, 51e12),
    (r"\bH100\b", 989e12, 494.5e12, 67e12),  # SXM ("NVIDIA H100 80GB HBM3")
    (r"\bH800\b.*\bPCIe\b", 756e12, 378e12, 51e12),
    (r"\bH800\b", 989e12, 494.5e12, 67e12),
    (r"\bH20\b", 148e12, 74e12, 44e12),
    (r"\bA100\b", 312e12, 156e12, 19.5e12),
    (r"\bA800\b", 312e12, 156e12, 19.5e12),
    (r"\bA10G\b", 70e12, 35e12, 31.2e12),  # AWS g5: GA102 with halved tensor throughput vs the A10
    (r"\bA10\b", 125e12, 62.5e12, 31.2e12),
    (r"\bL40S\b", 362e12, 183e12, 91.6e12),
    (r"\bL40\b", 181e12, 90.5e12, 90.5e12),
    (r"\bL4\b", 121e12, 60e12, 30.3e12),
    (r"RTX 6000 Ada", 364e12, 182e12, 91.1e12),
    (r"RTX A6000", 155e12, 77.4e12, 38.7e12),
    (r"RTX 5090", 209.5e12, 104.8e12, 104.8e12),
    (r"RTX 4090", 165.2e12, 82.6e12, 82.6e12),
    (r"RTX 3090", 71e12, 35.6e12, 35.6e12),
    (r"\bMI300X\b", 1307e12, 653.7e12, 163.4e12),
    (r"\bMI250X?\b", 383e12, None, 47.9e12),
    (r"\bT4\b", 65e12, None, 8.1e12),  # fp16 only (no bf16): counted for PRECISION=fp16
    (r"\bV100\b", 125e12, None, 15.7e12),  # fp16 only
]
_NO_BF16 = (r"\bT4\b", r"\bV100\b")
# A MIG slice ("NVIDIA A100-SXM4-40GB MIG 1g.5gb") has a fraction of the chip's SMs, and the
# profile name does not say the fraction in a table-safe way: no peak, so no MFU.
_PARTITIONED = re.compile(r"\bMIG\b")


def peak_flops(device_name: str, precision: str, tf32: bool = True) -> float | None:
    """Peak dense FLOP/s of one device for this training precision, or None if unknown.

    ``device_name`` is what ``torch.cuda.get_device_name()`` returns (e.g. "NVIDIA H100 80GB
    HBM3"); ``precision`` is train.precision: "bf16" / "fp16" (16-bit tensor peak), "no" /
    "fp32" (TF32 peak when ``tf32``, else the plain FP32 peak). CPUs, MIG slices, fp8 and devices
    not in the table give None.
    """
    if not device_name or "cpu" in device_name.lower() or precision not in ("bf16", "fp16", "no", "fp32"):
        return None
    if _PARTITIONED.search(device_name):
        return None
    for pattern, half, tf32_peak, fp32_peak in _PEAKS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            if precision == "bf16" and pattern in _NO_BF16:
                return None
            if precision in ("bf16", "fp16"):
                return half
            return tf32_peak if tf32 else fp32_peak
    return None


def device_peak_flops(device, precision: str) -> float | None:
    """``peak_flops`` for a torch device: None on CPU; for a CUDA device, its name and whether
    TF32 is on right now (train.tf32, set by distributed.build_accelerator), so the peak is the
    one the fp32 matmuls really run at."""
    import torch

    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return peak_flops(torch.cuda.get_device_name(device), precision, tf32=torch.backends.cuda.matmul.allow_tf32)


_COUNTS: dict[str, tuple[int, int]] = {}


def param_counts(config, trust_remote_code: bool = False) -> tuple[int, int]:
    """(matmul parameters N, total parameters P) of the causal LM the transformers ``config``
    describes, counted on a meta-device model: exact for any architecture, no memory, no download.

    A tied output head counts once in P (one tensor) but in N as the matmul it is. The model
    class is instantiated directly (not ``from_config``), so a live DeepSpeed ZeRO-3 config
    cannot wrap the count in ``zero.Init``.
    """
    key = config.to_json_string(use_diff=False)
    if key not in _COUNTS:
        import torch
        from transformers import AutoModelForCausalLM

        mapping = AutoModelForCausalLM._model_mapping
        with torch.device("meta"):
            if type(config) in mapping:
                from transformers.models.auto.auto_factory import _get_model_class

                model = _get_model_class(config, mapping)(config)
            else:  # remote code
                model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
        linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
        _COUNTS[key] = (linear, sum(p.numel() for p in model.parameters()))
    return _COUNTS[key]


def flops_per_token(config, seq_len: int, trust_remote_code: bool = False) -> float:
    """Training FLOPs per token, 6·N + 12·L·H·Q·T (PaLM, Appendix B; torchtitan's formula).

    N: matmul parameters (``param_counts``), L: num_hidden_layers, H: num_attention_heads,
    Q: head_dim (hidden_size // H unless the config sets head_dim), T: ``seq_len``.
    """
    n_matmul, _ = param_counts(config, trust_remote_code)
    layers, heads = config.num_hidden_layers, config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 6.0 * n_matmul + 12.0 * layers * heads * head_dim * seq_len


def mfu(tokens_per_second_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1] (None when the peak is unknown)."""
    if not peak or tokens_per_second_per_device is None:
        return None
    return tokens_per_second_per_device * flops_per_token / peak
