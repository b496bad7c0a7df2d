"""A CLIP-format BPE tokenizer written from a word list: every listed word is one token."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterable

from transformers import CLIPTokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode


def write_clip_tokenizer(folder: str | os.PathLike, words: Iterable[str], model_max_length: int = 77) -> CLIPTokenizer:
    """Write vocab.json/merges.txt so each word in `words` is a single token; unknown words fall back to characters."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for tok in chars + [c + "</w>" for c in chars]:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    words = sorted({w.lower() for w in words})
    for word in words:
        # merge left to right: "r e" -> "re", "re d</w>" -> "red</w>"
        _merge_pieces(list(word[:-1]) + [word[-1] + "</w>"], merges, vocab)
    for special in ("<|startoftext|>", "<|endoftext|>"):
        vocab.setdefault(special, len(vocab))
    # Another word's merges can split a word first ("apple" merges "a p", which breaks "grape" into gr|ap|e):
    # append merges that join the pieces such a word ends up in (last rank, so no finished word changes) until
    # every word is one token.
    for _ in range(len(words) + 1):
        tok = _write(folder, vocab, merges, model_max_length)
        split = {w: tok.tokenize(w) for w in words}
        split = {w: pieces for w, pieces in split.items() if len(pieces) > 1}
        if not split:
            return tok
        for pieces in split.values():
            _merge_pieces(pieces, merges, vocab)
    raise RuntimeError(f"could not make one token of each of {sorted(split)}")


def _merge_pieces(pieces: list[str], merges: list[tuple[str, str]], vocab: dict[str, int]) -> None:
    """Add the merges that join `pieces` left to right into one symbol."""
    while len(pieces) > 1:
        pair = (pieces[0], pieces[1])
        if pair not in merges:
            merges.append(pair)
        vocab.setdefault(pieces[0] + pieces[1], len(vocab))
        pieces = [pieces[0] + pieces[1]] + pieces[2:]


def _write(folder: Path, vocab: dict[str, int], merges: list[tuple[str, str]], model_max_length: int) -> CLIPTokenizer:
    """Write vocab.json and merges.txt and load them."""
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tok = CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=model_max_length)
    return tok
