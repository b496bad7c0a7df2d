"""The flags of `python -m utils.toy train` and its two recipes: toy 2 (the shipped assets/toy-sd and toy-sdxl) and toy
3 (assets/toy3-sd and toy3-sdxl, Stable Diffusion 1.x's recipe: a text encoder learned first, contrastively, then
frozen; epsilon prediction on SD's schedule; cross-attention at every level; 10% empty captions; "an" before vowels).
Either recipe trains either family: with --family sdxl toy 3 learns each of the two text encoders in its own
contrastive phase, as SDXL's two CLIP models were (assets/toy3-sdxl; docs/toy_sdxl.md).

A recipe fills every flag left unset; a flag given on the command line wins. The run's identity (run.json beside each
checkpoint) records the recipe and every resolved value, so a stopped run refuses to resume under another recipe.
"""
from __future__ import annotations

import argparse

from utils.cli import HelpFormatter, add_threads_arg
from utils.toy.models import ATTENTION

RECIPES: dict[str, dict] = {
    "toy2": {"output_dir": "outputs/toy-sd", "text_encoder": "joint", "text_width": 64, "attention": "low",
             "prediction_type": "v_prediction", "zero_snr": True, "caption_dropout": 0.25, "articles": "a",
             "unet_steps": 4500},
    # text width 256: measured against 64 in docs/toy3.md; 4,000 U-Net steps (toy 2: 4,500):
    # what one thread of the shared 2-core machine trains in about an hour with attention at both levels
    "toy3": {"output_dir": "outputs/toy3-sd", "text_encoder": "contrastive", "text_width": 256, "attention": "all",
             "prediction_type": "epsilon", "zero_snr": False, "caption_dropout": 0.10, "articles": "an",
             "unet_steps": 4000},
}


def add_recipe_flags(p: argparse.ArgumentParser) -> None:
    """--recipe and the flags it sets (each None until resolve_recipe fills it from the recipe)."""
    p.add_argument("--recipe", choices=list(RECIPES), default="toy2",
                   help="toy2: text encoder trained with the U-Net, v-prediction, zero terminal SNR, cross-attention "
                        "at 8x8 + mid (assets/toy-sd, assets/toy-sdxl); toy3: SD 1.x's recipe (assets/toy3-sd; "
                        "with --family sdxl both encoders contrastive and frozen, as SDXL's); the flags below default "
                        "to the recipe's values")
    p.add_argument("--text_encoder", choices=["joint", "contrastive"], default=None,
                   help="joint: trained with the U-Net on the denoising loss (toy2); contrastive: learned first and "
                        "alone against an image encoder (symmetric InfoNCE), then frozen (toy3, as CLIP for SD; "
                        "--family sdxl: each encoder in a phase of its own, with its own image encoder and seeds)")
    p.add_argument("--text_width", type=int, choices=[32, 64, 128, 256], default=None,
                   help="text width = the U-Net's cross_attention_dim (toy2 64, toy3 256): the sd family's one text "
                        "encoder; --family sdxl: its two encoders together, each half as wide")
    p.add_argument("--attention", choices=list(ATTENTION), default=None,
                   help="U-Net levels with (self- and cross-) attention: low = 8x8 + mid (toy2), all = 16x16, 8x8 "
                        "and mid (toy3, SD's layout)")
    p.add_argument("--prediction_type", choices=["epsilon", "v_prediction"], default=None,
                   help="what the U-Net predicts (SD 1.x: epsilon; SD 2.x: v_prediction)")
    p.add_argument("--zero_snr", action=argparse.BooleanOptionalAction, default=None,
                   help="rescale the betas to zero terminal SNR and sample from t = T - 1 (needs v_prediction); "
                        "--no-zero_snr: SD 1.x's scaled-linear betas with leading spacing")
    p.add_argument("--caption_dropout", type=float, default=None,
                   help="share of empty captions in the U-Net phase (toy2 0.25, toy3 0.10 as SD)")
    p.add_argument("--articles", choices=["a", "an"], default=None,
                   help="a: 'a' before every colour word, as toy2 was trained ('a orange circle'); an: 'an' before "
                        "vowels (toy3), recorded in the model folder's toy_language.json for the measurements")


def add_train_parser(sub, func) -> None:
    """The `train` subcommand's flags: recipe, data, VAE, text encoder, U-Net, schedule, checkpoints."""
    p = sub.add_parser("train", help="render the data and train the toy pipeline (CPU, seeded)", formatter_class=HelpFormatter)
    p.add_argument("--output_dir", default=None, help="where the pipeline, train_toy.log and checkpoints go (a stopped "
                   "run there is resumed; default outputs/toy-sd, with --recipe toy3 outputs/toy3-sd; --family "
                   "sdxl: outputs/toy-sdxl, outputs/toy3-sdxl)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished pipeline, or a stopped run, in "
                   "--output_dir (training starts again from step 0)")
    p.add_argument("--family", choices=["sd", "sdxl"], default="sd",
                   help="the model's shape: sd (one text encoder; assets/toy-sd) or sdxl (two text encoders, pooled "
                        "embedding and time ids; assets/toy-sdxl); every recipe and flag below trains either "
                        "(sdxl: each encoder --text_width / 2 wide, attention at --attention's levels, joint or "
                        "contrastive encoders)")
    add_recipe_flags(p)
    p.add_argument("--seed", type=int, default=2, help="seed of the data, the initial weights and training (the "
                   "default is the shipped model's)")
    p.add_argument("--n_images", type=int, default=12000, help="rendered training images (colours and shapes balanced)")
    p.add_argument("--vae_from", default=None, help="copy the trained VAE of this toy folder instead of training one "
                   "(the same seed, data and VAE flags train the same VAE: e.g. assets/toy-sd)")
    p.add_argument("--vae_steps", type=int, default=600, help="VAE training steps")
    p.add_argument("--vae_batch_size", type=int, default=32, help="VAE batch size")
    p.add_argument("--vae_lr", type=float, default=1e-3, help="VAE peak learning rate (AdamW, warm-up + cosine)")
    p.add_argument("--vae_kl_weight", type=float, default=1e-6, help="weight of the VAE's KL term")
    p.add_argument("--vae_rgb_weight", type=float, default=1.0,
                   help="weight of a loss tying latent channels 0-2 to the block-averaged RGB (even colour geometry; "
                        "0: a free VAE)")
    p.add_argument("--clip_steps", type=int, default=1500, help="contrastive text encoder steps (--text_encoder "
                   "contrastive; --family sdxl: each encoder's)")
    p.add_argument("--clip_batch_size", type=int, default=256, help="contrastive batch: images, one caption each")
    p.add_argument("--clip_lr", type=float, default=1e-3, help="contrastive peak learning rate (AdamW, warm-up + cosine)")
    p.add_argument("--clip_dim", type=int, default=64, help="width of the shared image-text embedding (--family "
                   "sdxl: text_encoder_2's projection, the pooled embedding the U-Net reads; joint encoders: 32)")
    p.add_argument("--unet_steps", type=int, default=None, help="U-Net (+ text encoder) training steps (toy2 4500, "
                   "toy3 4000)")
    p.add_argument("--unet_batch_size", type=int, default=64, help="U-Net batch size")
    p.add_argument("--unet_lr", type=float, default=1e-3, help="U-Net + text encoder peak learning rate")
    p.add_argument("--unet_ema_decay", type=float, default=0.999,
                   help="save the exponential moving average of the U-Net and text encoder weights (0: the last ones)")
    p.add_argument("--checkpoint_every", type=int, default=250, help="steps between checkpoints (resumed automatically)")
    p.add_argument("--keep_checkpoints", action="store_true", help="keep OUTPUT_DIR/checkpoints after success")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_threads_arg(p)
    p.set_defaults(func=func)


def resolve_recipe(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Fill the flags left unset from args.recipe; parser.error for combinations that cannot train."""
    if args.output_dir is None and args.family == "sdxl":
        args.output_dir = RECIPES[args.recipe]["output_dir"] + "xl"  # outputs/toy-sdxl, outputs/toy3-sdxl
    for k, v in RECIPES[args.recipe].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.zero_snr and args.prediction_type != "v_prediction":
        parser.error("--zero_snr needs --prediction_type v_prediction (epsilon is undefined at zero SNR); with "
                     "epsilon pass --no-zero_snr")
    if not 0 <= args.caption_dropout < 1:
        parser.error("--caption_dropout must be in [0, 1)")
    for name in ("clip_steps", "clip_batch_size", "clip_dim"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be positive")
