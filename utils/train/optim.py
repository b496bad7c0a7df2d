"""AdamW with its learning-rate schedule, gradient scaling and autocast: the flags and objects the trainers and the
attack share (named as in the diffusers training examples)."""
from __future__ import annotations

import argparse

import torch
from diffusers.optimization import get_scheduler

LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def add_adamw_args(g, *, learning_rate: float, weight_decay: float, max_grad_norm: float, what: str = "") -> None:
    """AdamW, its learning-rate schedule and gradient clipping (the flags of the diffusers training examples)."""
    g.add_argument("--learning_rate", type=float, default=learning_rate, help=f"AdamW learning rate{what}")
    g.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant", help="learning-rate schedule")
    g.add_argument("--lr_warmup_steps", type=int, default=0, help="warm-up steps of the schedule")
    g.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1")
    g.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2")
    g.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon")
    g.add_argument("--weight_decay", "--adam_weight_decay", type=float, default=weight_decay,
                   help=f"AdamW weight decay{what}")
    g.add_argument("--max_grad_norm", type=float, default=max_grad_norm, help="gradient-norm clip (0: off)")


def make_adamw(params, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> tuple:
    """AdamW over `params` with add_adamw_args' flags, its lr schedule, and a GradScaler (on only in fp16)."""
    optimizer = torch.optim.AdamW(params, lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  eps=args.adam_epsilon, weight_decay=args.weight_decay)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
                                 num_training_steps=args.num_train_steps)
    return optimizer, lr_scheduler, torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def step_in_backward(optimizer: torch.optim.Optimizer, params) -> None:
    """Step `optimizer` on each of `params` as soon as backward has its gradient, then drop that gradient, so that the
    subset's gradients are never all held at once (--optimizer_in_backward; PyTorch's "optimizer step in backward").

    Each call steps the one optimizer with its parameter group narrowed to the tensor whose gradient is ready (so a
    step costs the same whatever the subset's size); the state stays the one optimizer's, saved and resumed as usual."""
    group_of = {p: g for g in optimizer.param_groups for p in g["params"]}

    def hook(p: torch.Tensor) -> None:
        group = group_of[p]
        params, group["params"] = group["params"], [p]
        try:
            optimizer.step()
        finally:
            group["params"] = params
        p.grad = None

    for p in params:
        p.register_post_accumulate_grad_hook(hook)


def autocast_to(device: torch.device, dtype: torch.dtype):
    """Autocast to the frozen weights' dtype (off in fp32)."""
    return torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
