"""Turn a pytest-benchmark JSON of kernl's `measure` fixture into a markdown table: kernl beside torch.

python scripts/bench_table.py BENCH.json [machine.txt]
"""

import json
import sys
from collections import defaultdict


def main() -> None:
    data = json.load(open(sys.argv[1]))
    machine = open(sys.argv[2]).read().strip().replace("\n", "; ") if len(sys.argv) > 2 else ""
    rows: dict[str, dict] = defaultdict(dict)
    ceilings = {}
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        impl = bench["params"].get("implementation", "?")
        rows[bench["group"]][impl] = info
        ceilings = {k: v for k, v in info.items() if k.startswith("ceiling_")}
    print(f"Machine: {machine}")
    print(f"Ceilings measured in the same run: {', '.join(f'{k[8:]}={v:.0f}' for k, v in ceilings.items())}\n")
    print("| case | kernl ms | torch ms | torch / kernl | kernl TFLOP/s | kernl GB/s | of ceiling |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for group, impls in rows.items():
        k, t = impls.get("kernl", {}), impls.get("torch", {})
        k_ms, t_ms = k.get("median_ms"), t.get("median_ms")
        speedup = f"{t_ms / k_ms:.2f}x" if k_ms and t_ms else ""
        frac = k.get("fraction_of_matmul_peak", k.get("fraction_of_copy_bandwidth"))
        tf = f"{k['tflops']:.0f}" if "tflops" in k else ""
        gb = f"{k['gbs']:.0f}" if "gbs" in k else ""
        cells = [group, f"{k_ms:.4f}" if k_ms else "", f"{t_ms:.4f}" if t_ms else "", speedup, tf, gb]
        cells.append(f"{frac:.0%}" if frac else "")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
