"""Command line: ``python -m a2sf.convert opt <hf_dir> <out.gguf> [--outtype f32|f16|q8_0]``."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from . import ARCHITECTURES, ConversionError
from .opt import OUTTYPES


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m a2sf.convert",
        description="Convert a local Hugging Face checkpoint directory to GGUF.")
    ap.add_argument("arch", choices=sorted(ARCHITECTURES), help="architecture of the checkpoint")
    ap.add_argument("hf_dir", help="local directory with config.json, weights and tokenizer files")
    ap.add_argument("out", help="GGUF file to write")
    ap.add_argument("--outtype", default="f32", choices=sorted(OUTTYPES),
                    help="tensor type of the 2-D weights (norms and biases stay f32); default f32")
    args = ap.parse_args(argv)
    try:
        path = ARCHITECTURES[args.arch](args.hf_dir, args.out, outtype=args.outtype)
    except ConversionError as e:
        print(f"a2sf.convert: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
