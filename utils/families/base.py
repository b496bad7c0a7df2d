"""The model-family seam: what training, generation, the attack and LoRA export ask of a model family.

A family (SD 1.x/2.x in sd.py) knows its parts (encoders, U-Net, VAE, scheduler), how a prompt becomes a condition,
how the denoiser is called with a weight view, the scheduler step, its module names and its pipelines. Everything
else asks the family and never names a model class. Adding a family is one file plus an entry in FAMILIES
(utils/families/__init__.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable, Mapping, Sequence

import torch
from torch.func import functional_call

from utils.cli import UserError

View = Mapping[str, torch.Tensor]  # a weight view: name -> tensor for the trained subset (see utils/train/views.py)

# what each --finetuning_method trains; each family says which of its parameters these are (Family.SUBSETS)
FINETUNING_METHODS = {
    "xattn": "cross-attention (SDD and ESD-x default)",
    "xattn-strict": "only cross-attention's text-facing projections (keys and values)",
    "text": "every weight that reads the prompt: cross-attention, and on SDXL also the pooled-text embedding "
            "(add_embedding; on SD the same as xattn)",
    "noxattn": "all but cross-attention, the time embedding and the output layer (ESD-u)",
    "selfattn": "self-attention",
    "notime": "all but the time embedding and the output layer",
    "full": "every parameter",
}


@dataclass
class Cond:
    """A prompt's condition for the denoiser: hidden states (B, L, D), and the extras a family adds (pooled, ...)."""

    hidden: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def expand(self, n: int) -> "Cond":
        """The same condition for a batch of n."""
        return Cond(self.hidden.expand(n, *self.hidden.shape[1:]),
                    {k: v.expand(n, *v.shape[1:]) for k, v in self.extra.items()})

    @staticmethod
    def cat(conds: Sequence["Cond"]) -> "Cond":
        """Conditions stacked along the batch (one forward for several prompts)."""
        return Cond(torch.cat([c.hidden for c in conds]),
                    {k: torch.cat([c.extra[k] for c in conds]) for k in conds[0].extra})

    def to(self, device: torch.device, dtype: torch.dtype | None = None) -> "Cond":
        """On `device` (and in `dtype`)."""
        return replace(self, hidden=self.hidden.to(device, dtype),
                       extra={k: v.to(device, dtype) for k, v in self.extra.items()})


class Family:
    """What every script asks of a model family; the defaults fit U-Net families with DDIM training."""

    name = "?"
    pipeline_classes: tuple[str, ...] = ()       # model_index.json _class_name values of this family
    SUBSETS: dict[str, Callable[[str], bool]] = {}  # --finetuning_method -> parameter-name predicate
    lora_prefix = "lora_unet_"                   # kohya-style LoRA keys of the denoiser's modules
    lora_renames: dict[str, str] = {}            # modules whose kohya key is not their diffusers path
    TEXT_EXTRAS: tuple[str, ...] = ()            # Cond.extra entries that come from the text (zeroed with it)

    # ------------------------------------------------------------------------------------------------ loading
    def load(self, name: str, revision: str | None = None, variant: str | None = None):
        """The parts training needs (tokenizer(s), text encoder(s), VAE, U-Net, a DDIM scheduler)."""
        raise NotImplementedError

    def load_unet(self, name: str, **kwargs) -> torch.nn.Module:
        """Only the denoiser, from a pipeline folder or hub id."""
        raise NotImplementedError

    def encode(self, parts, prompts: Sequence[str], device: torch.device,
               size: tuple[int, int] | None = None) -> dict[str, Cond]:
        """Condition (batch 1) for each distinct prompt, computed in one pass, for images of `size` (h, w) pixels
        (None: the model's own; only families with size conditioning use it)."""
        raise NotImplementedError

    def free_text(self, parts) -> None:
        """Drop the text encoder(s) once every prompt is encoded."""
        raise NotImplementedError

    def text_encoders(self, parts) -> list:
        """The text encoders still loaded."""
        return [parts.text_encoder] if parts.text_encoder is not None else []

    def tokenizers(self, parts) -> list:
        """The tokenizers, one per text encoder and in the same order as text_encoders()."""
        return [parts.tokenizer]

    def caption_cond(self, parts, captions: Sequence[str], device: torch.device, size: tuple[int, int] | None = None,
                     runs: Sequence[Callable] | None = None) -> Cond:
        """Condition (B, ...) of a batch of captions, with gradients; runs[i] (ids, **kwargs) -> output stands in
        for text encoder i (the attack's: with learned token rows swapped in); size as in encode."""
        raise NotImplementedError

    def load_text(self, tokenizer_path: str | None, text_encoder_path: str | None) -> dict:
        """generate.py's --tokenizer_path / --text_encoder_path: replacement parts from folders."""
        raise NotImplementedError

    def check_text_width(self, parts: dict, text_encoder_path: str | None) -> None:
        """UserError when the text encoder's width is not what the U-Net's cross-attention takes."""
        width, wanted = parts["text_encoder"].config.hidden_size, parts["unet"].config.cross_attention_dim
        if isinstance(wanted, int) and width != wanted:
            where = f" at {text_encoder_path}" if text_encoder_path else ""
            raise UserError(f"the text encoder{where} gives {width}-wide embeddings, but the U-Net's "
                            f"cross-attention takes {wanted}")

    # ------------------------------------------------------------------------------------------------ denoiser
    def zeroed(self, cond: Cond) -> Cond:
        """The condition with its text parts all zero (hidden states and TEXT_EXTRAS), other extras (sizes) kept."""
        return Cond(torch.zeros_like(cond.hidden),
                    {k: torch.zeros_like(v) if k in self.TEXT_EXTRAS else v for k, v in cond.extra.items()})

    def unet_kwargs(self, cond: Cond) -> dict:
        """The U-Net's keyword arguments for a condition."""
        return {"encoder_hidden_states": cond.hidden}

    def predict(self, unet: torch.nn.Module, view: View | None, z: torch.Tensor, t: torch.Tensor,
                cond: Cond) -> torch.Tensor:
        """The denoiser's output at (z, t, cond) with `view`'s tensors in place of its own (None: the live ones)."""
        kwargs = self.unet_kwargs(cond)
        if view is None:
            return unet(z, t, **kwargs).sample
        return functional_call(unet, dict(view), (z, t), kwargs, strict=False).sample

    def step(self, scheduler, out: torch.Tensor, t: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One sampler step from z at t given the denoiser's output (DDIM, eta 0)."""
        return scheduler.step(out, t, z).prev_sample.to(z.dtype)

    def scale_input(self, scheduler, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The denoiser's input at t (identity for DDIM; Euler-type schedulers scale it)."""
        return scheduler.scale_model_input(z, t)

    def noised(self, scheduler, x0: torch.Tensor, noise: torch.Tensor,
               t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_t, the denoiser's target at t): the forward process and epsilon, v or x_0 per the prediction type."""
        z = scheduler.add_noise(x0, noise, t)
        kind = scheduler.config.prediction_type
        target = {"epsilon": noise, "sample": x0}.get(kind)
        if target is None:
            if kind != "v_prediction":
                raise UserError(f"the scheduler's prediction_type {kind!r} is not epsilon, v_prediction or sample")
            target = scheduler.get_velocity(x0, noise, t)
        return z, target

    def jitter(self, t: torch.Tensor, scheduler, generator: torch.Generator) -> torch.Tensor:
        """A training timestep drawn uniformly from [t, t + T/N) (the reference code's jitter), kept below T."""
        num_train = scheduler.config.num_train_timesteps
        stride = num_train // scheduler.num_inference_steps
        span = (num_train - t.cpu()).clamp(min=1, max=stride)  # the top bucket is cut at T - 1, not piled onto it
        offset = (torch.rand(t.shape, generator=generator) * span).long()
        return t + offset.to(t.device)

    def epsilon_weights(self, scheduler) -> torch.Tensor | None:
        """Per-timestep weight that turns a squared difference of outputs into one of noise estimates eps.

        At equal z_t, eps = sqrt(a) v + sqrt(1 - a) z_t (v_prediction) and eps = (z_t - sqrt(a) x_0) / sqrt(1 - a)
        (sample), a = alpha_bar_t, so a difference of outputs scales by sqrt(a), resp. sqrt(a / (1 - a)); None for
        an epsilon model, whose outputs are eps already.
        """
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            return None
        a = scheduler.alphas_cumprod.float()
        if kind == "v_prediction":
            return a
        if kind == "sample":
            return a / (1 - a)
        raise UserError(f"--loss_space epsilon: the scheduler's prediction_type {kind!r} is not epsilon, "
                        f"v_prediction or sample")

    # ------------------------------------------------------------------------------------------------ shapes
    def vae_scale_factor(self, parts) -> int:
        """Pixels per latent cell (8 for SD)."""
        return 2 ** (len(parts.vae.config.block_out_channels) - 1)

    def default_resolution(self, parts) -> int:
        """The resolution the U-Net was trained at (512 for SD 1.x)."""
        return parts.unet.config.sample_size * self.vae_scale_factor(parts)

    def latent_shape(self, parts, resolution: int | None) -> tuple[int, int, int]:
        """(C, H, W) of z_T at `resolution` (None: the model's own); UserError if the U-Net cannot take it."""
        res, f = resolution or self.default_resolution(parts), self.vae_scale_factor(parts)
        multiple = f * 2 ** (len(parts.unet.config.block_out_channels) - 1)
        if res % multiple:
            raise UserError(f"--resolution {res} is not divisible by {multiple} "
                            f"(VAE factor {f} x U-Net downsampling)")
        return parts.unet.config.in_channels, res // f, res // f

    @torch.no_grad()
    def decode(self, vae: torch.nn.Module, z: torch.Tensor) -> torch.Tensor:
        """Latents -> images in [0, 1], (B, 3, H, W), float32 on the CPU."""
        x = vae.decode(z.to(vae.dtype) / vae.config.scaling_factor).sample
        return (x.float() / 2 + 0.5).clamp(0, 1).cpu()

    # ------------------------------------------------------------------------------------------------ subsets
    def subset(self, unet: torch.nn.Module, method: str) -> dict[str, torch.nn.Parameter]:
        """Name -> parameter for the subset `method` trains; the rest are frozen (requires_grad False)."""
        if method not in self.SUBSETS:
            raise KeyError(f"unknown fine-tuning method {method!r}; choose from {', '.join(self.SUBSETS)}")
        pick = self.SUBSETS[method]
        chosen = {n: p for n, p in unet.named_parameters() if pick(n)}
        for n, p in unet.named_parameters():
            p.requires_grad_(n in chosen)
        return chosen

    def subset_names(self, names, method: str) -> list[str]:
        """Which of these parameter names `method` trains."""
        return [n for n in names if self.SUBSETS[method](n)]

    # ------------------------------------------------------------------------------------------------ textual inversion
    def embedding_file(self, placeholder: str, tokens: Sequence[str],
                       learned: Sequence[torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors and extra metadata of a textual-inversion file of learned rows (one (N, D) tensor per text
        encoder): here one encoder's, {placeholder: rows}, the layout pipe.load_textual_inversion(path) reads."""
        return {placeholder: learned[0]}, {}

    def load_embedding(self, pipe, path: str) -> None:
        """Add a textual-inversion file's tokens to a pipeline of this family."""
        pipe.load_textual_inversion(str(path))

    # ------------------------------------------------------------------------------------------------ generation
    def pipeline(self, mode: str) -> type:
        """The diffusers pipeline class of a generate.py mode; UserError when the family has none."""
        raise NotImplementedError


def describe(subset: Mapping[str, torch.Tensor], unet: torch.nn.Module, method: str) -> str:
    """'trains N of M U-Net parameters (x%) [method]'."""
    n = sum(p.numel() for p in subset.values())
    total = sum(p.numel() for p in unet.parameters())
    return f"trains {n:,} of {total:,} U-Net parameters ({100 * n / total:.2f}%) in {len(subset)} tensors [{method}]"
