"""The child process of start_onnx_export: fill the ONNX cache for one model and exit.

python -m tasks.embedders.onnx_export MODEL_DIR [--int8] [--lock-held]
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path


def export_command(model_dir: Path, *, int8: bool, lock_held: bool) -> list[str]:
    """This module's command line for one model (start_onnx_export's child, and the child's
    own fp32 stage)."""
    cmd = [sys.executable, "-m", "tasks.embedders.onnx_export", str(model_dir)]
    return cmd + ["--int8"] * int8 + ["--lock-held"] * lock_held


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.embedders.onnx_export")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--int8", action="store_true", help="also the int8 quantised file")
    ap.add_argument(
        "--lock-held", action="store_true", help="the export lock came with an inherited file"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from tasks.embedders.local import export_onnx, onnx_file

    if args.int8 and not onnx_file(args.model_dir, quantized=False).exists():
        # the fp32 export in a process of its own, which exits before this one quantises: the
        # export's peak (torch, the model, the traced graph) and the quantiser's do not stack
        fp32_stage = export_command(args.model_dir, int8=False, lock_held=args.lock_held)
        subprocess.run(fp32_stage, check=True)
    export_onnx(args.model_dir, quantized=args.int8, lock_held=args.lock_held)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
