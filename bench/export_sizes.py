"""Export half by model size on one GPU box: a sequence of bench/gpu_export.py runs within a deadline.

    python3 bench/export_sizes.py --plan vit-l --out OUT --deadline-s 570
    python3 bench/export_sizes.py --plan sizes --out OUT --deadline-s 570

Each step runs in its own process (peak host memory is per step) with what is left of the deadline as
its timeout, so one model crashing or running long does not lose the others: every step's JSON is
copied to OUT/<step>.json as soon as it ends, and the last lines of its log are appended to
OUT/logs.txt. Working folders (ONNX files) live under --work and are deleted after their last use.

Plans (one device call each; docs/benchmarks.md has the numbers and the commands):
  vit-l  warm-up (ModelOpt's CUDA extension JIT-compiled once: the cold cost), ours on ViT-L-14 both
         towers, the plain ModelOpt recipe on ViT-L-14, then the gate's variants on our FP8 files.
  sizes  ours on ViT-bigG-14 (image tower), ViT-B-32 (both towers), ViT-H-14 (both towers).
  bigg   ours on ViT-bigG-14 (image tower) alone: the >2 GiB path after a change to it.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLANS: dict[str, list[tuple[str, list[str]]]] = {
    "vit-l": [
        ("warm", ["--mode", "warm"]),
        ("vit-l-14.ours", ["--mode", "ours", "--arch", "ViT-L-14"]),
        ("vit-l-14.plain", ["--mode", "plain", "--arch", "ViT-L-14", "--no-plain-accuracy"]),
        ("vit-l-14.gate", ["--mode", "gate", "--arch", "ViT-L-14",
                           "--gate-variants", "default,single_run_profiled,optimized,concurrency8"]),
    ],
    "sizes": [
        ("vit-bigg-14-image.ours", ["--mode", "ours", "--arch", "ViT-bigG-14", "--encoders", "image"]),
        ("vit-b-32.ours", ["--mode", "ours", "--arch", "ViT-B-32"]),
        ("vit-h-14.ours", ["--mode", "ours", "--arch", "ViT-H-14"]),
    ],
    "bigg": [
        ("vit-bigg-14-image.ours", ["--mode", "ours", "--arch", "ViT-bigG-14", "--encoders", "image"]),
    ],
}


def _folder(step: str) -> str:
    return step.rsplit(".", 1)[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--plan", choices=sorted(PLANS), required=True)
    ap.add_argument("--out", required=True, help="where each step's JSON and the log tails go")
    ap.add_argument("--work", default="/tmp/export-sizes", help="working folders (ONNX files)")
    ap.add_argument("--deadline-s", type=float, default=570.0)
    ap.add_argument("--log-lines", type=int, default=60)
    args, passthrough = ap.parse_known_args()
    started = time.monotonic()
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    steps = PLANS[args.plan]
    summary: dict[str, dict] = {}
    for i, (step, argv) in enumerate(steps):
        left = args.deadline_s - (time.monotonic() - started)
        if left < 20:
            summary[step] = {"skipped": f"deadline ({left:.0f} s left)"}
            continue
        folder = work / _folder(step)
        folder.mkdir(parents=True, exist_ok=True)
        mode = argv[argv.index("--mode") + 1]
        cmd = [sys.executable, str(HERE / "gpu_export.py"), *argv, "--out", str(folder), *passthrough]
        log = folder / f"{mode}.stdout.log"
        t = time.monotonic()
        try:
            with log.open("w") as fh:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=left - 5).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
        wall = time.monotonic() - t
        result_file = folder / f"{mode}.json"
        result = json.loads(result_file.read_text()) if result_file.exists() else {}
        result.update({"step": step, "command": " ".join(cmd), "process_rc": rc, "process_wall_s": round(wall, 1)})
        (out / f"{step}.json").write_text(json.dumps(result, indent=2, default=str))
        tail = log.read_text(errors="replace").splitlines()[-args.log_lines:]
        with (out / "logs.txt").open("a") as fh:
            fh.write(f"===== {step}: rc {rc}, {wall:.1f} s\n" + "\n".join(tail) + "\n")
        summary[step] = {"rc": rc, "wall_s": round(wall, 1)}
        print(step, summary[step], flush=True)
        later = {_folder(s) for s, _ in steps[i + 1:]}
        if _folder(step) not in later:  # nobody reads these ONNX files again
            shutil.rmtree(folder / "ours", ignore_errors=True)
            shutil.rmtree(folder / "plain", ignore_errors=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
