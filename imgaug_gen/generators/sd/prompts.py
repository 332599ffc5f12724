"""Per-class prompts of the ``sd_lora`` kind (``model.prompts``): a template, per-class overrides,
DreamBooth identifier tokens, and textual inversion's placeholder tokens."""

from __future__ import annotations

from typing import Mapping, Sequence

from imgaug_gen.errors import ConfigError


def _identifier_list(class_names: list[str], identifier_tokens) -> list[str | None]:
    """``model.prompts.identifier_tokens`` as one entry per class (None: no identifier)."""
    if identifier_tokens is None:
        return [None] * len(class_names)
    if isinstance(identifier_tokens, str):
        return [identifier_tokens] * len(class_names)
    if isinstance(identifier_tokens, Mapping):
        missing = [c for c in class_names if c not in identifier_tokens]
        extra = sorted(set(identifier_tokens) - set(class_names))
        if missing or extra:
            raise ConfigError(
                f"`model.prompts.identifier_tokens` must map every class to a token; missing {missing}, "
                f"unknown {extra} (classes: {class_names})."
            )
        return [str(identifier_tokens[c]) for c in class_names]
    tokens = [str(t) for t in identifier_tokens]
    if len(tokens) != len(class_names):
        raise ConfigError(
            f"`model.prompts.identifier_tokens` has {len(tokens)} tokens for {len(class_names)} classes "
            f"{class_names}; give one per class, one string for all, or null."
        )
    return tokens


def build_prompts(
    class_names: Sequence[str],
    template: str = "a photo of a {class_name}",
    class_prompts: Mapping[str, str] | None = None,
    identifier_tokens: str | Sequence[str] | Mapping[str, str] | None = None,
    humanize_class_names: bool = True,
    placeholder_tokens: Sequence[str] | None = None,
) -> list[str]:
    """One prompt per class.

    ``template`` (and each ``class_prompts`` override) may use ``{class_name}`` and
    ``{token}``. ``identifier_tokens``: null; one string used for every class (a
    DreamBooth identifier such as ``"sks"``, the class name tells classes apart); a
    list with one rare token per class; or a ``{class_name: token}`` mapping.
    ``humanize_class_names`` turns ``golden_retriever`` into ``golden retriever``.
    ``placeholder_tokens`` (textual inversion): ``{class_name}`` becomes the class's placeholder
    token, and every prompt must contain it.
    """
    class_names = [str(c) for c in class_names]
    class_prompts = dict(class_prompts or {})
    unknown = sorted(set(class_prompts) - set(class_names))
    if unknown:
        raise ConfigError(
            f"`model.prompts.class_prompts` names unknown classes {unknown}; the classes are {class_names}."
        )
    tokens = _identifier_list(class_names, identifier_tokens)
    prompts = []
    for i, (name, token) in enumerate(zip(class_names, tokens)):
        text = class_prompts.get(name, template)
        key = f"model.prompts.class_prompts.{name}" if name in class_prompts else "model.prompts.template"
        if "{token}" in text and token is None:
            raise ConfigError(
                f"`{key}` = {text!r} uses {{token}} but `model.prompts.identifier_tokens` is null; set "
                "`model.prompts.identifier_tokens=sks` (or one rare token per class), or drop {token}."
            )
        if token is not None and "{token}" not in text and name not in class_prompts:
            raise ConfigError(
                f"`model.prompts.identifier_tokens` is set but `{key}` = {text!r} has no {{token}}; use e.g. "
                "`model.prompts.template='a photo of {token} {class_name}'`."
            )
        if placeholder_tokens is not None and "{class_name}" not in text:
            raise ConfigError(
                f"`model.textual_inversion.enabled=true` puts each class's learned token where the prompt says "
                f"{{class_name}}, but `{key}` = {text!r} has none; add {{class_name}}."
            )
        shown = name.replace("_", " ").strip() if humanize_class_names else name
        if placeholder_tokens is not None:
            shown = placeholder_tokens[i]
        try:
            prompts.append(" ".join(text.format(class_name=shown, token=token or "").split()))
        except (KeyError, IndexError, ValueError) as e:
            raise ConfigError(
                f"`{key}` = {text!r} is not a valid template ({e}); the only fields are {{class_name}} and {{token}}."
            ) from e
    return prompts
