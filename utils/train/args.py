"""The flags both trainers share (names follow the reference code and the diffusers training examples)."""
from __future__ import annotations

import argparse

from utils.cli import add_threads_arg
from utils.train.concepts import CONCEPT_METHODS
from utils.lora import rank_arg
from utils.train.optim import add_adamw_args
from utils.train.preserve import add_preserve_args
from utils.families import FINETUNING_METHODS


class _DevicesAlias(argparse.Action):
    """`--devices A [B]` (reference code: student on A, teacher on B) -> device cuda:A."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, f"cuda:{values[0]}")


def add_training_args(p: argparse.ArgumentParser, *, num_train_steps: int, weight_decay: float, max_grad_norm: float,
                      output_dir: str) -> None:
    """The flags both trainers share (names follow the reference code and the diffusers training examples)."""
    g = p.add_argument_group("model")
    g.add_argument("--pretrained_model_name_or_path", default="CompVis/stable-diffusion-v1-4",
                   help="hub id or local diffusers pipeline folder")
    g.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    g.add_argument("--variant", default=None, help="weight file variant, e.g. fp16")
    g = p.add_argument_group("concepts")
    g.add_argument("--removing_concepts", nargs="+", required=True,
                   help="concepts to remove: words/phrases, or one .txt file with one concept a line")
    g.add_argument("--concept_method", choices=CONCEPT_METHODS, default="iterative",
                   help="how c_p is chosen each step: cycle, random, the joined string, or one concept after another")
    g.add_argument("--concept_steps", type=int, nargs="+", default=None, metavar="N", help="with --concept_method "
                   "sequential: each concept's steps, adding up to --num_train_steps (default: an even split)")
    g.add_argument("--guidance_scale", type=float, default=3.0, help="s_g: CFG scale used to sample z_t")
    g.add_argument("--empty_prompt", choices=["encoded", "zeros"], default=None,
                   help="c_0, the empty prompt's condition (SDD's target, the unconditional half of CFG): 'encoded' "
                        "(or unset) = the text encoder(s) on \"\", as SD's pipelines and ESD's SDXL script; 'zeros' = "
                        "all-zero hidden states and pooled embedding, as StableDiffusionXLPipeline makes an empty "
                        "negative prompt (force_zeros_for_empty_prompt)")
    g.add_argument("--num_ddim_steps", type=int, default=50, help="N: DDIM steps of the sampling trajectory")
    g.add_argument("--trajectory_samples", type=int, default=1,
                   help="M: train on M distinct steps of each sampled trajectory (amortises the teacher; opt-in, "
                        "changes the training distribution; see docs/performance.md)")
    g.add_argument("--trajectory_reuse", type=int, default=1,
                   help="R: each teacher trajectory serves R micro-steps (M each; R * M <= N); cuts the teacher's "
                        "cost ~R-fold; opt-in, changes the training distribution; see docs/performance.md")
    g.add_argument("--timestep_jitter", action="store_true",
                   help="train at a DDPM timestep drawn uniformly from [t, t + T/N) instead of t (reference code)")
    g = p.add_argument_group("optimization")
    g.add_argument("--finetuning_method", choices=list(FINETUNING_METHODS), default="xattn",
                   help="which U-Net parameters train: " + "; ".join(f"{k} = {v}" for k, v in FINETUNING_METHODS.items()))
    g.add_argument("--num_train_steps", "--max_train_steps", type=int, default=num_train_steps,
                   help="optimizer steps (--max_train_steps: the diffusers examples' name)")
    g.add_argument("--train_batch_size", type=int, default=1, help="z_T samples per micro-step")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1, help="micro-steps per optimizer step")
    g.add_argument("--loss_space", choices=["output", "epsilon"], default=None,
                   help="'output' (or unset): the squared error of the U-Net's outputs, whatever its prediction_type; "
                        "'epsilon': of the noise estimates, as the papers write the losses (the same for an epsilon "
                        "U-Net; for a v_prediction one each timestep is weighted by alpha_bar_t)")
    add_adamw_args(g, learning_rate=1e-5, weight_decay=weight_decay, max_grad_norm=max_grad_norm)
    g.add_argument("--optimizer_in_backward", action="store_true",
                   help="update each trained tensor as soon as its gradient is ready and drop the gradient (saves "
                        "the subset's gradients: 0.17 GiB on SD 1.4, 2 GiB on SDXL); needs --max_grad_norm 0 and "
                        "--gradient_accumulation_steps 1, and no fp16 (clipping, accumulation and loss scaling need "
                        "every gradient at once)")
    g.add_argument("--resolution", type=int, default=None, help="image size of z_T (default: the model's own)")
    g.add_argument("--seed", type=int, default=0, help="seed of k, z_T, the concept order and validation")
    g = p.add_argument_group("hardware")
    g.add_argument("--device", default=None, help="torch device, e.g. cuda:1 or cpu (None: cuda when available)")
    g.add_argument("--devices", dest="device", nargs="+", type=int, action=_DevicesAlias, default=argparse.SUPPRESS,
                   metavar="GPU", help="reference code's flag: GPU indices of student and teacher; here both share "
                                       "one U-Net, so this means --device cuda:FIRST")
    add_threads_arg(g)
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no",
                   help="dtype of the frozen weights (text encoder, VAE, frozen U-Net); trained weights stay fp32; "
                        "'no' is the paper's fp32")
    g.add_argument("--use_fp16", dest="mixed_precision", action="store_const", const="fp16",
                   default=argparse.SUPPRESS, help="reference code's flag: same as --mixed_precision fp16")
    g.add_argument("--gradient_checkpointing", action="store_true", help="recompute U-Net activations in backward")
    g.add_argument("--allow_tf32", action="store_true",
                   help="allow TF32 matmuls on Ampere+ GPUs (PyTorch already allows TF32 convolutions by default)")
    g.add_argument("--conv_autotune", action="store_true",
                   help="time the convolution kernels once per shape and keep the fastest (cuDNN benchmark mode on a "
                        "GPU; oneDNN vs native im2col on the CPU, up to 1.8x faster U-Net forwards at 128 px); results "
                        "may then differ from an untuned run in the last bits")
    g = p.add_argument_group("outputs")
    g.add_argument("--output_dir", default=output_dir, help="where unet/, erasure.safetensors, logs and checkpoints go")
    g.add_argument("--overwrite_output_dir", action="store_true", help="allow writing into a folder with a finished run")
    g.add_argument("--export_lora_rank", type=rank_arg, default=None, help="at the end, also write OUTPUT_DIR/"
                   "erasure-lora-r{R}.safetensors: the erasure as a rank-R LoRA (or 'full'; docs/lora.md)")
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help="a checkpoint folder, or 'latest' in output_dir")
    g.add_argument("--validation_prompts", nargs="+", default=None, help="prompts (or one .txt) to sample during training")
    g.add_argument("--validation_steps", "--eval_every", type=int, default=250,
                   help="sample the validation prompts every N steps (--eval_every: the reference code's name)")
    g.add_argument("--num_validation_images", "--num_images_per_prompt", type=int, default=2,
                   help="images per validation prompt (--num_images_per_prompt: the reference code's name)")
    g.add_argument("--validation_guidance_scale", type=float, default=7.5, help="CFG scale of validation images")
    add_preserve_args(p)
