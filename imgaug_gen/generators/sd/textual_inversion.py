"""Textual inversion per class (DA-Fusion's recipe) for the ``sd_lora`` kind.

Each class gets a new placeholder token (``<golden_retriever>``) added to the tokenizer(s);
its embedding row starts from the mean embedding of the class name's words (or of
``model.textual_inversion.init``) and is the only part of the text encoder that trains.
Training keeps the embedding matrix frozen: the learned vectors are a separate float32
parameter (:class:`TokenVectors`, checkpointed with the LoRA weights) that a forward hook
on the input-embedding layer substitutes for the placeholder tokens' rows, so no other row
can move and the optimiser state is ``classes x dim``, not ``vocabulary x dim``.

Saved per class in the generator folder, in the files diffusers' ``load_textual_inversion``
reads: SD-1.x/2.x ``{token: [1, dim]}`` (as ``textual_inversion.py`` writes
``learned_embeds.safetensors``); SDXL ``{"clip_l": [1, 768], "clip_g": [1, 1280]}`` (the
two-encoder format diffusers documents for SDXL embeddings), loaded with
``pipe.load_textual_inversion(sd["clip_l"], token=..., text_encoder=pipe.text_encoder,
tokenizer=pipe.tokenizer)`` and the same with ``clip_g`` / ``text_encoder_2`` / ``tokenizer_2``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from imgaug_gen.errors import ConfigError

TI_DIR = "textual_inversion"
#: the key of each text encoder's vector in an SDXL embedding file (diffusers' documented names)
SDXL_KEYS = ("clip_l", "clip_g")


def placeholder_tokens(class_names: Sequence[str]) -> list[str]:
    """One placeholder per class: ``<class_name>`` lower-cased (CLIP tokenizers lower-case their
    input), whitespace as ``_``; a clash gets the class index appended."""
    tokens: list[str] = []
    for i, name in enumerate(class_names):
        token = "<" + "_".join(str(name).lower().split()) + ">"
        tokens.append(token if token not in tokens else f"<{token[1:-1]}_{i}>")
    return tokens


def ti_file(label: int) -> str:
    return f"{TI_DIR}/class_{int(label):03d}.safetensors"


class TokenVectors(nn.Module):
    """The learned vectors of the placeholder tokens ``first_id .. first_id + n - 1`` of one text
    encoder; :meth:`attach` makes the input-embedding layer return them for those ids."""

    def __init__(self, first_id: int, init: torch.Tensor):
        super().__init__()
        self.first_id = int(first_id)
        self.vectors = nn.Parameter(init.detach().clone().float())

    def substitute(self, module, args, output: torch.Tensor) -> torch.Tensor:
        ids = args[0]
        rel = ids - self.first_id
        mask = (rel >= 0) & (rel < self.vectors.shape[0])
        if not bool(mask.any()):
            return output
        rows = self.vectors.to(output.dtype)[rel.clamp(0, self.vectors.shape[0] - 1)]
        return torch.where(mask.unsqueeze(-1), rows, output)

    def attach(self, embedding: nn.Module):
        return embedding.register_forward_hook(self.substitute)


def _init_vector(tokenizer, weight: torch.Tensor, text: str, key: str) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if not ids:
        raise ConfigError(f"`{key}` = {text!r} tokenizes to nothing; give a word, e.g. `{key}=object`.")
    return weight[torch.tensor(ids)].float().mean(0)


def add_placeholder_tokens(
    tokenizer, text_encoder, tokens: Sequence[str], init_texts: Sequence[str], key: str = "model.textual_inversion.init"
) -> TokenVectors:
    """Add ``tokens`` to ``tokenizer`` (contiguous new ids), grow ``text_encoder``'s embedding
    matrix to hold them, set each new row to the mean embedding of its ``init_texts`` entry and
    return the trainable :class:`TokenVectors` (already attached to the embedding layer)."""
    clash = [t for t in tokens if t in tokenizer.get_vocab()]
    if clash:
        raise ConfigError(
            f"the placeholder tokens {clash} are already in the tokenizer's vocabulary; rename the "
            "class folders (placeholders are `<class_name>`)."
        )
    first = len(tokenizer)
    tokenizer.add_tokens(list(tokens))
    ids = tokenizer.convert_tokens_to_ids(list(tokens))
    if ids != list(range(first, first + len(tokens))):
        raise ConfigError(f"the placeholder tokens got ids {ids}, expected {first}..; the tokenizer splits them.")
    emb = text_encoder.get_input_embeddings()
    if emb.num_embeddings < len(tokenizer):
        text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
        emb = text_encoder.get_input_embeddings()
    with torch.no_grad():
        init = torch.stack([_init_vector(tokenizer, emb.weight, t, key) for t in init_texts])
        emb.weight[first : first + len(tokens)] = init.to(emb.weight.dtype)
    vectors = TokenVectors(first, init)
    vectors.attach(emb)
    return vectors


def current_vectors(tokenizer, text_encoder, tokens: Sequence[str]) -> torch.Tensor:
    """[n, dim] float32: what the embedding layer returns for ``tokens`` now (through the training
    hook while training, the loaded rows after ``load_textual_inversion``)."""
    ids = torch.tensor(tokenizer.convert_tokens_to_ids(list(tokens)), device=text_encoder.device)
    with torch.no_grad():
        return text_encoder.get_input_embeddings()(ids).float().cpu()


def save_embeddings(path: Path, family_name: str, tokens: Sequence[str], vectors: Sequence[torch.Tensor]) -> None:
    """One file per class under ``path / textual_inversion`` (see the module docstring for the keys)."""
    from imgaug_gen.io import atomic_save_safetensors

    (path / TI_DIR).mkdir(parents=True, exist_ok=True)
    for i, token in enumerate(tokens):
        if family_name == "sdxl":
            sd = {k: v[i : i + 1].contiguous() for k, v in zip(SDXL_KEYS, vectors)}
        else:
            sd = {token: vectors[0][i : i + 1].contiguous()}
        atomic_save_safetensors(path / ti_file(i), sd)


def load_embeddings(pipe, path: Path, family_name: str, tokens: Sequence[str]) -> None:
    """Load the per-class files into ``pipe`` with diffusers' ``load_textual_inversion``."""
    files = [path / ti_file(i) for i in range(len(tokens))]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(
            f"`{missing[0]}` is missing ({len(missing)} textual-inversion files); the generator folder is incomplete."
        )
    from safetensors.torch import load_file

    sds = [load_file(str(f)) for f in files]  # read here: safetensors only, never a pickle
    if family_name != "sdxl":
        pipe.load_textual_inversion(sds, token=list(tokens))
        return
    for key, encoder, tokenizer in zip(SDXL_KEYS, ("text_encoder", "text_encoder_2"), ("tokenizer", "tokenizer_2")):
        pipe.load_textual_inversion(
            [sd[key] for sd in sds],
            token=list(tokens),
            text_encoder=getattr(pipe, encoder),
            tokenizer=getattr(pipe, tokenizer),
        )


def textual_inversion_config(tokens: Sequence[str] | None, init: Any) -> dict | None:
    if tokens is None:
        return None
    return {"tokens": list(tokens), "init": init, "files": [ti_file(i) for i in range(len(tokens))]}
