"""One command for every benchmark: prints their markdown tables one after the other.

    python benchmarks/run_all.py [--size tiny|1b] [--quick]

Runs (each measures our tool side by side with its peer in the same run):
  make_synthetic.py + bench_extract.py   extraction vs Olive ExtractAdapters, convert, adapter switching
  bench_runtime.py                       unmerged vs merged latency, export_peft vs torch.onnx.export
  bench_quant_minilm.py                  QDQ accuracy on real MiniLM, per-adapter vs shared encodings
  bench_generate.py                      generation: merged vs AdapterSession.generate vs onnxruntime-genai
Not run in CI (minutes to tens of minutes, GBs of disk for --size 1b).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=["tiny", "1b"], default="1b")
    parser.add_argument("--quick", action="store_true", help="smoke run of the runtime benchmark")
    args = parser.parse_args()
    steps = [
        [sys.executable, str(HERE / "make_synthetic.py"), "--size", args.size],
        [sys.executable, str(HERE / "bench_extract.py"), "--size", args.size],
        [sys.executable, str(HERE / "bench_runtime.py"), *(["--quick"] if args.quick else [])],
        [sys.executable, str(HERE / "bench_quant_minilm.py")],
        [sys.executable, str(HERE / "bench_generate.py"), *(["--quick"] if args.quick else [])],
    ]
    failed = 0
    for cmd in steps:
        print(f"\n<!-- {' '.join(Path(c).name if i < 2 else c for i, c in enumerate(cmd))} -->", flush=True)
        failed |= subprocess.call(cmd) != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
