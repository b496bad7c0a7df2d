"""Atomic writes, the shareable erasure file (trained tensors only) and loading a fine-tuned U-Net."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from utils.cli import UserError

ERASURE_FORMAT = "sdd-erasure-v1"
_UMASK = os.umask(0)  # read once, at import: setting it to read it is not thread-safe
os.umask(_UMASK)


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp folder next to `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    # mkdtemp's 0700 would stay after the rename: the mode mkdir gives (the umask's, a setgid parent's group bit)
    tmp.chmod((0o777 & ~_UMASK) | (tmp.stat().st_mode & stat.S_ISGID))
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run write(temp) on a hidden temp file next to `path`, then os.replace it onto `path` (removed on failure)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def weights_digest(path: str | os.PathLike | None) -> str | None:
    """SHA-256 of the weights a loader reads from `path` (a file; a checkpoint's state.pt; else the weight and config
    files of the folder, or of its unet/): None for a hub id or None. Images record it, so weights retrained in
    place are not taken for the ones that made them."""
    if not path:
        return None
    root = Path(path).expanduser()
    if root.is_file():
        files = [root]
    elif (root / "state.pt").is_file():
        files = [root / "state.pt"]
    elif root.is_dir():
        folder = root / "unet" if (root / "unet" / "config.json").is_file() else root  # a training run's folder
        files = sorted(p for p in folder.iterdir()
                       if p.is_file() and p.suffix in WEIGHT_SUFFIXES and not p.name.startswith("."))
    else:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as fh:
            h.update(_safetensors_header(fh) if f.suffix == ".safetensors" else b"")
            h.update(hashlib.file_digest(fh, "sha256").digest())  # the rest of the file (all of it for other kinds)
    return h.hexdigest()


def _safetensors_header(fh) -> bytes:
    """The tensors' part of a safetensors header (dtypes, shapes, offsets; not its metadata, so a rewrite with the
    metadata in another order hashes the same), leaving `fh` at the data; b"" and `fh` at 0 if it is no such file."""
    try:
        n = int.from_bytes(fh.read(8), "little")
        if n > 100_000_000:  # the format's own limit: not a safetensors file (say, a git-lfs pointer)
            raise ValueError(n)
        header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        return json.dumps(header, sort_keys=True).encode()
    except (ValueError, AttributeError):
        fh.seek(0)
        return b""


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write a UTF-8 text file through a temp name and a rename."""
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_erasure(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, object]) -> None:
    """Write only the trained U-Net tensors (by parameter name) with base model, method and concepts as metadata."""
    meta = {"format": ERASURE_FORMAT}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta))


def read_erasure(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of an erasure file; UserError if it is not one."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for non-safetensors input
        raise UserError(f"{path} is not a safetensors erasure file ({str(e).splitlines()[0]})") from None
    if meta.get("format") != ERASURE_FORMAT:
        raise UserError(f"{path} is a safetensors file but not an erasure file written by train_sdd.py/train_esd.py")
    return tensors, meta


@torch.no_grad()
def copy_into(unet: torch.nn.Module, tensors: Mapping[str, torch.Tensor], source: str, base_model: str = "?") -> None:
    """Copy U-Net tensors (by parameter name) into `unet` in place; refuse if any name or shape does not fit."""
    params = dict(unet.named_parameters())
    missing = [k for k in tensors if k not in params]
    if missing:
        raise UserError(f"{source} does not fit this U-Net: {len(missing)} tensors are not in it "
                        f"(first: {missing[0]}); was it made for base model {base_model}?")
    bad = [k for k, v in tensors.items() if v.shape != params[k].shape]
    if bad:
        k = bad[0]
        raise UserError(f"{source} does not fit this U-Net: {k} has shape {tuple(tensors[k].shape)}, "
                        f"the U-Net has {tuple(params[k].shape)}; was it made for base model {base_model}?")
    for k, v in tensors.items():
        params[k].copy_(v.to(params[k].dtype))


def apply_erasure(unet: torch.nn.Module, path: str | os.PathLike) -> dict[str, str]:
    """Copy an erasure file's tensors into `unet` in place; refuse if any name or shape does not fit."""
    tensors, meta = read_erasure(path)
    copy_into(unet, tensors, f"erasure file {path}", meta.get("base_model", "?"))
    return meta


def run_folder(unet_path: str | os.PathLike) -> Path:
    """The trainer's output folder an erased U-Net path points into: OUT for OUT/unet or OUT/erasure.safetensors,
    else the path itself."""
    path = Path(unet_path)
    return path.parent if path.name == "unet" or path.is_file() else path


def checkpoint_weights(folder: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A training checkpoint's result: the method's own weights where it keeps some (SDD's EMA teacher), else the
    student's (ESD): what the run would save as its U-Net at that step."""
    try:
        blob = torch.load(Path(folder) / "state.pt", map_location="cpu", weights_only=False)
        return blob["method"] or blob["student"]
    except Exception as e:  # torch raises several types for files it cannot unpickle
        raise UserError(f"{folder}/state.pt is not a checkpoint of train_sdd.py / train_esd.py "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None


def load_unet_into(unet: torch.nn.Module, unet_path: str | os.PathLike) -> str:
    """Replace `unet`'s weights from a diffusers U-Net folder, an erasure file or a training checkpoint folder
    (checkpoint-N/ of train_sdd.py / train_esd.py); return which kind it was."""
    path = Path(unet_path)
    if not path.exists():
        raise UserError(f"--unet_path {unet_path} does not exist")
    if path.is_file():
        apply_erasure(unet, path)
        return "erasure"
    if (path / "state.pt").is_file():
        copy_into(unet, checkpoint_weights(path), f"checkpoint {path}")
        return "checkpoint"
    folder = path / "unet" if (path / "unet" / "config.json").exists() else path
    weights = sorted(folder.glob("diffusion_pytorch_model*.safetensors")) + sorted(folder.glob("diffusion_pytorch_model*.bin"))
    if not (folder / "config.json").exists() or not weights:
        raise UserError(f"--unet_path {unet_path} is not a diffusers U-Net folder (config.json + "
                        f"diffusion_pytorch_model.safetensors), an erasure .safetensors file or a training "
                        f"checkpoint folder (state.pt)")
    try:  # the base model's own U-Net class, whatever its family
        other = type(unet).from_pretrained(folder)
    except (OSError, ValueError) as e:
        raise UserError(f"could not load the U-Net in {folder}: {str(e).splitlines()[0]}") from None
    mine, theirs = unet.state_dict(), other.state_dict()
    if mine.keys() != theirs.keys() or any(mine[k].shape != theirs[k].shape for k in mine):
        raise UserError(f"the U-Net in {folder} does not fit the base model's pipeline "
                        f"(different layers or shapes: cross_attention_dim {other.config.cross_attention_dim} vs "
                        f"{unet.config.cross_attention_dim}, sample_size {other.config.sample_size} vs {unet.config.sample_size})")
    unet.load_state_dict({k: v.to(mine[k].dtype) for k, v in theirs.items()})
    return "folder"
