"""Build a full-shape pipeline with random weights for the speed and memory benchmarks (no hub needed).

    python -m benchmarks.sd_shaped /tmp/sd14-bench-pipeline                      # SD 1.4's shape
    python -m benchmarks.sd_shaped /tmp/sdxl-bench-pipeline --family sdxl --width 0.5
"""
from __future__ import annotations

import argparse
from typing import Sequence

from utils.cli import ArgumentParser, HelpFormatter, run


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The folder, the family's shape and SDXL's width."""
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("folder", help="where the pipeline is saved")
    p.add_argument("--family", choices=["sd", "sdxl"], default="sd", help="SD 1.4's shape or SDXL base's")
    p.add_argument("--width", type=float, default=1.0,
                   help="SDXL: channels as a share of SDXL base's (1.0: the 2.57 B U-Net; 0.5: a quarter of it)")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    """Build and save it."""
    from utils.families.shaped import build_sd14_pipeline, build_sdxl_pipeline

    folder = build_sd14_pipeline(args.folder) if args.family == "sd" else build_sdxl_pipeline(args.folder, args.width)
    print(f"saved {folder}")


if __name__ == "__main__":
    run(main, parse_args)
