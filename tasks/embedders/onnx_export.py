"""The child process of start_onnx_export: fill the ONNX cache for one model and exit.

python -m tasks.embedders.onnx_export MODEL_DIR [--int8] [--lock-held]
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tasks.embedders.onnx_export")
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--int8", action="store_true", help="also the int8 quantised file")
    ap.add_argument(
        "--lock-held", action="store_true", help="the export lock came with an inherited file"
    )
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    from tasks.embedders.local import export_onnx

    export_onnx(args.model_dir, quantized=args.int8, lock_held=args.lock_held)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
