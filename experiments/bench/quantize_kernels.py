"""Which int8 linear kernel to use on an x86 CPU: the same ``nn.Linear`` timed in float32, bfloat16,
``torch.ao.quantization.quantize_dynamic`` (FBGEMM's dynamic int8 kernel, the one ``mmstory/compress/quantize.py``
calls), ``mmstory``'s ``Int8Linear``, and torchao's ``Int8DynamicActivationInt8WeightConfig`` and
``Int8WeightOnlyConfig`` (when torchao is installed: ``pip install torchao``), at the main job's shapes (width 192,
MLP 768, vocabulary 6,000) for one decoding row and for 1,024 rows (a batch of 64 x 16 tokens).

    python experiments/bench/quantize_kernels.py [--out experiments/bench/quantize_kernels_results.json]

Microseconds per call, median of 7 rounds of 100 calls, 2 threads.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from mmstory.compress.quantize import Int8Linear  # noqa: E402


def per_call_us(fn, x, calls: int = 100, rounds: int = 7) -> float:
    with torch.inference_mode():
        for _ in range(10):
            fn(x)
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            for _ in range(calls):
                fn(x)
            times.append((time.perf_counter() - t) / calls * 1e6)
    return statistics.median(times)


def variants(lin: nn.Linear) -> dict:
    out = {"float32": lin, "bfloat16": copy.deepcopy(lin).to(torch.bfloat16),
           "torch.ao quantize_dynamic (FBGEMM)": torch.ao.quantization.quantize_dynamic(
               nn.Sequential(copy.deepcopy(lin)), {nn.Linear}, dtype=torch.qint8),
           "mmstory Int8Linear (FBGEMM)": Int8Linear.from_float(lin)}
    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, Int8WeightOnlyConfig, quantize_
    except ImportError:
        return out
    for name, config in (("torchao int8 dynamic", Int8DynamicActivationInt8WeightConfig()),
                         ("torchao int8 weight-only", Int8WeightOnlyConfig())):
        m = nn.Sequential(copy.deepcopy(lin))
        quantize_(m, config)
        out[name] = m
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).with_name("quantize_kernels_results.json")))
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(2)
    torch.manual_seed(0)
    rows = []
    for n_rows in (1, 1024):
        for fan_in, fan_out in ((192, 576), (192, 768), (768, 192), (192, 6000)):
            lin = nn.Linear(fan_in, fan_out).eval()
            x = torch.randn(n_rows, fan_in)
            times = {name: per_call_us(m, x.to(torch.bfloat16) if name == "bfloat16" else x)
                     for name, m in variants(lin).items()}
            rows.append({"rows": n_rows, "in": fan_in, "out": fan_out, "us": times,
                         "speedup_vs_float32": {k: times["float32"] / v for k, v in times.items()}})
            print(n_rows, (fan_in, fan_out), {k: round(v, 1) for k, v in times.items()}, flush=True)
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    cpu = "AVX512-BF16/AMX" if ("avx512_bf16" in flags or "amx_tile" in flags) else ("AVX2" if "avx2" in flags else "?")
    try:
        import torchao
        tao = torchao.__version__
    except ImportError:
        tao = None
    Path(args.out).write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
                                          f"{os.cpu_count()} cores, {cpu}", "torch": torch.__version__,
                                          "torchao": tao, "threads": 2, "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
