"""Which text width for toy 3's contrastive text encoder (64 or 256)? Trains the contrastive phase alone at each
width on toy 3's data and captions and prints retrieval and the hidden states' cosine structure; the answer is in
docs/toy3.md.

  python -m experiments.toy3_text_width --output outputs/toy3-width.json --threads 1
"""
from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from utils.cli import ArgumentParser, HelpFormatter, add_threads_arg, apply_threads, run  # noqa: E402
from utils.eval.common import write_json  # noqa: E402
from utils.toy.contrastive import train_text_encoder  # noqa: E402
from utils.toy.models import build_sd  # noqa: E402
from utils.toy.render import make_dataset  # noqa: E402
from utils.toy.train import make_tokenizer  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--widths", type=int, nargs="+", default=[64, 256], help="text encoder widths to compare")
    p.add_argument("--clip_steps", type=int, default=1500, help="contrastive steps per width (the toy3 recipe's)")
    p.add_argument("--clip_batch_size", type=int, default=256, help="contrastive batch")
    p.add_argument("--clip_lr", type=float, default=1e-3, help="peak learning rate")
    p.add_argument("--clip_dim", type=int, default=64, help="shared embedding width")
    p.add_argument("--n_images", type=int, default=12000, help="rendered images (the toy's 12,000)")
    p.add_argument("--seed", type=int, default=2, help="the toy3 recipe's seed")
    p.add_argument("--output", required=True, help="JSON file with each width's numbers")
    add_threads_arg(p)
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    apply_threads(args.threads, torch.device("cpu"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("toy3_text_width")
    images, labels = make_dataset(args.n_images, args.seed)
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = make_tokenizer(Path(tmp) / "tok")
        for width in args.widths:
            text_encoder = build_sd(tokenizer, args.seed, text_width=width, attention="all").text_encoders["text_encoder"]
            ns = argparse.Namespace(**vars(args), articles="an", quiet=True, checkpoint_every=10 ** 9)
            t0 = time.time()
            res = train_text_encoder(text_encoder, images, labels, tokenizer, ns, Path(tmp) / f"w{width}", log)
            res["seconds"] = time.time() - t0
            res["params"] = sum(p.numel() for p in text_encoder.parameters())
            out[str(width)] = res
            print(width, res, flush=True)
    write_json(args.output, out)
    return out


if __name__ == "__main__":
    run(main, parse_args)
