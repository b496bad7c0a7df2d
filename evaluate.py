"""Evaluate folders of generated images: NudeNet nudity, CLIP score, FID/KID, the toy-world judge, and a merged report.

A folder is what generate.py writes (PNGs + metadata.csv with file, prompt, seed, ..., and carried columns such as
I2P's categories); a plain folder of images works where prompts are not needed (nudity, fid). Results go to
--output_dir (default: the image folder) and are rewritten when the command is run again.

  python evaluate.py nudity outputs/i2p_sdd      # -> nudity_detections.csv, nudity_summary.json, nudity_counts.png
  python evaluate.py nudity outputs/i2p_sdd --classes strict --threshold 0.45
  python evaluate.py clip outputs/coco_sdd                        # -> clip_scores.csv, clip_summary.json
  python evaluate.py fid outputs/coco_sdd --reference data/coco30k_512   # -> fid_summary.json
  python evaluate.py toy outputs/toy_erased_red                   # -> toy_judgements.csv, toy_summary.json
  python evaluate.py report --runs SD=outputs/i2p_sd SD=outputs/coco_sd SDD=outputs/i2p_sdd SDD=outputs/coco_sdd \\
      --output_dir outputs/report                                 # -> report.md, report.csv, report.png

The optional packages are in requirements-eval.txt (NudeNet's package carries an AGPL-3.0 licence file).
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Sequence

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from utils.cli import ArgumentParser, HelpFormatter, UserError, run, setup_logging  # noqa: E402
from utils.eval.clip import DEFAULT_CLIP, DEFAULT_PREFIX  # noqa: E402
from utils.eval.nudity import CLASS_SETS, DEFAULT_THRESHOLD, SWEEP_THRESHOLDS  # noqa: E402
from utils.eval.common import load_image_folder  # noqa: E402

LOG_FILE = "evaluate.log"


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _unit(text: str) -> float:
    value = float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def _resolution(text: str) -> int:
    value = int(text)
    if value < 32 or value % 32:
        raise argparse.ArgumentTypeError(f"must be a multiple of 32 (320 or 640 for NudeNet's models), got {text}")
    return value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse `python evaluate.py {nudity,clip,fid,toy,report} ...`."""
    parser = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="{nudity,clip,fid,toy,report}")

    def folder_parser(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text, formatter_class=HelpFormatter)
        p.add_argument("folder", help="image folder written by generate.py (PNGs + metadata.csv)")
        p.add_argument("--output_dir", default=None, help="where results go; None: into the image folder")
        return p

    p = folder_parser("nudity", "NudeNet detections: share of images with an exposed class, counts per class "
                                "(and per I2P category)")
    p.add_argument("--classes", nargs="+", default=["default"], metavar="CLASS",
                   help=f"counted classes: a preset ({', '.join(f'{k}: {len(v)} classes' for k, v in CLASS_SETS.items())}; "
                        "default = the nine exposed classes of MACE/UnlearnDiffAtk, strict = without belly, armpits, "
                        "feet) or NudeNet class names such as FEMALE_BREAST_EXPOSED")
    p.add_argument("--threshold", type=_unit, default=DEFAULT_THRESHOLD,
                   help="a detection counts when its score is at least this (papers use 0.45 to 0.6)")
    p.add_argument("--nudenet_model", default=None,
                   help="ONNX detector file (e.g. NudeNet's 640m.onnx); None: the 320n model inside the nudenet package")
    p.add_argument("--nudenet_resolution", type=_resolution, default=None,
                   help="detector input size; None: 640 for a model file named 640*.onnx, else 320")
    p.add_argument("--batch_size", type=_positive, default=16, help="images per detector call")

    p = folder_parser("clip", "CLIP score: mean and standard deviation of cos(image, prefix + prompt) (the SDD "
                              "paper's form), and of 100 * max(cos, 0)")
    p.add_argument("--model", "--pretrained_model_name_or_path", default=DEFAULT_CLIP,
                   help="CLIP model: hub id or local save_pretrained folder (CLIPModel + tokenizer + "
                        "preprocessor_config.json); --pretrained_model_name_or_path is the SDD reference's name")
    p.add_argument("--prompt_prefix", default=DEFAULT_PREFIX, help="text put before every prompt ('' for none)")
    p.add_argument("--batch_size", type=_positive, default=32, help="images per CLIP forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")

    p = folder_parser("fid", "FID and KID of the folder against a reference folder (Inception-v3 pool3 features)")
    p.add_argument("--reference", required=True, default=argparse.SUPPRESS,
                   help="folder of reference images (e.g. the COCO-30k images)")
    p.add_argument("--inception_weights", default=None,
                   help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth; None: the torch hub cache, "
                        "else a download from GitHub")
    p.add_argument("--batch_size", type=_positive, default=50, help="images per Inception forward pass")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--kid_subset_size", type=_positive, default=1000,
                   help="images per KID subset (capped at the smaller folder's size)")
    p.add_argument("--kid_subsets", type=_positive, default=100, help="KID subsets averaged")
    p.add_argument("--seed", type=int, default=0, help="seed of KID's random subsets")
    p.add_argument("--workers", type=_positive, default=4, help="threads decoding images")

    p = folder_parser("toy", "toy-world judge: per asked colour the rate the image shows it (explicit, paraphrase and "
                             "implied prompts), shape accuracy; with --base, erasure rates and same-seed preservation")
    p.add_argument("--base", default=None,
                   help="folder of the same prompt file and seeds drawn by the base model: adds before/after rates of "
                        "the erased colours and preservation of the others")
    p.add_argument("--concepts", nargs="+", default=None,
                   help="erased colours (with --base); None: read from the prompt file's groups")

    p = sub.add_parser("report", help="merge runs' summaries into report.md, report.csv and report.png",
                       description="merge runs' summaries into report.md, report.csv and report.png",
                       formatter_class=HelpFormatter)
    p.add_argument("--runs", nargs="+", required=True, default=argparse.SUPPRESS, metavar="NAME=PATH",
                   help="method name = a folder holding *_summary.json (or one summary JSON); repeat a name to "
                        "combine e.g. its I2P folder (nudity) and its COCO folder (CLIP, FID)")
    p.add_argument("--output_dir", required=True, default=argparse.SUPPRESS,
                   help="where report.md, report.csv and report.png go")
    args = parser.parse_args(argv)
    if getattr(args, "concepts", None) and not args.base:
        parser.error("--concepts names the erased colours of a --base comparison; pass --base too")
    return args


def main(args: argparse.Namespace) -> dict:
    """Run one evaluation subcommand and print where its results went; returns its summary."""
    if args.command == "report":
        from utils.eval.report import make_report

        Path(args.output_dir).expanduser().mkdir(parents=True, exist_ok=True)
        setup_logging(args.output_dir, LOG_FILE)
        res = make_report(args.runs, args.output_dir)
        print(res["markdown"], end="")
        print(f"wrote {Path(args.output_dir) / 'report.md'}, report.csv" + (", report.png" if res["chart"] else ""))
        return res

    load_image_folder(args.folder)  # fail on a missing or empty folder before anything is written
    if args.command == "fid":
        load_image_folder(args.reference, "reference folder")
    out = Path(args.output_dir or args.folder).expanduser()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file, not a folder")
    setup_logging(out, LOG_FILE)

    if args.command == "nudity":
        from utils.eval.nudity import evaluate_nudity

        s = evaluate_nudity(args.folder, out, args.classes, args.threshold, args.nudenet_model,
                            args.nudenet_resolution, args.batch_size)
        sweep = ", ".join(f"{s['threshold_sweep'][f'{t:g}']['nude_percent']:.2f}% at {t:g}" for t in SWEEP_THRESHOLDS)
        print(f"{s['images']} images, {s['nude_images']} nude ({s['nude_percent']:.2f}%) with {s['class_set']} "
              f"classes at score >= {s['threshold']:g} (sweep: {sweep}); wrote {out}/nudity_summary.json, "
              f"nudity_detections.csv, nudity_counts.png")
    elif args.command == "clip":
        from utils.eval.clip import evaluate_clip

        s = evaluate_clip(args.folder, out, args.model, args.prompt_prefix, args.batch_size, args.device)
        print(f"CLIP score (mean cosine) {s['mean']:.4f} ± {s['std']:.4f}, 100 * max(cos, 0) "
              f"{s['clip_score_100']['mean']:.2f} over {s['images']} images; wrote {out}/clip_summary.json, "
              f"clip_scores.csv")
    elif args.command == "fid":
        from utils.eval.fid import evaluate_fid

        s = evaluate_fid(args.folder, args.reference, out, inception_weights=args.inception_weights,
                         batch_size=args.batch_size, device=args.device, kid_subset_size=args.kid_subset_size,
                         kid_subsets=args.kid_subsets, seed=args.seed, workers=args.workers)
        print(f"FID {s['fid']:.3f}, KID {s['kid_mean']:.5f} ± {s['kid_std']:.5f} ({s['images']} vs "
              f"{s['reference_images']} reference images); wrote {out}/fid_summary.json")
    else:
        from utils.eval.toy import evaluate_toy

        s = evaluate_toy(args.folder, out, args.base, args.concepts)
        rates = ", ".join(f"{c} {100 * r:.1f}%" for c, r in s["colour_rate"].items())
        print(f"{s['images']} images; asked colour shown: {rates}; shape accuracy {100 * s['shape_acc']:.1f}%")
        if "erasure" in s:
            from utils.toy.cli import format_erasure

            print(format_erasure(s["erasure"]))
        print(f"wrote {out}/toy_summary.json, toy_judgements.csv")
    return s


if __name__ == "__main__":
    run(main, parse_args)
