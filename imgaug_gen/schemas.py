"""Typed schemas of the job configs, validated once at the front door (pydantic).

The YAML files in ``conf/`` hold the defaults and the comments; a schema holds the types, the
allowed values and the cross-field rules, and refuses unknown keys. :func:`validate` turns the
first violation into a :class:`~imgaug_gen.errors.ConfigError` naming the key, its value and
what is expected, before any heavy work. Facts that need the filesystem or a model (a folder
exists, a generator can edit) stay with the job that knows them.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from imgaug_gen.errors import ConfigError

Mode = Literal["sample", "img2img"]
#: the most images (or edits per real image) a generate job plans per class; the whole plan is
#: bounded too (``imgaug_gen.jobs.generate.MAX_PLANNED``): every planned item is held in memory
MAX_PER_CLASS = 10_000_000
Fraction = Field(ge=0, le=1)


class _Block(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


class Img2Img(_Block):
    edits_per_image: int = Field(ge=1, le=MAX_PER_CLASS)
    strengths: list[float] = Field(min_length=1)
    blend: Optional[tuple[float, float]] = None

    @field_validator("strengths")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if min(v) <= 0 or max(v) > 1:
            raise ValueError("give values in (0, 1]")
        return v

    @field_validator("blend")
    @classmethod
    def _ordered(cls, v):
        if v is not None and not 0 <= v[0] <= v[1] <= 1:
            raise ValueError("give null (plain edits) or [lo, hi] with 0 <= lo <= hi <= 1, e.g. [0.3, 0.7]")
        return v


class Source(_Block):
    mode: Mode
    fraction: float = Field(ge=0)


class Mix(_Block):
    synthetic_ratio: Optional[float] = Field(default=None, ge=0, le=MAX_PER_CLASS, allow_inf_nan=False)
    target_per_class: Optional[int] = Field(default=None, ge=0, le=MAX_PER_CLASS)
    sources: list[Source] = Field(min_length=1)

    @model_validator(mode="after")
    def _rules(self):
        if self.synthetic_ratio is not None and self.target_per_class is not None:
            raise ValueError(
                f"`mix.synthetic_ratio` = {self.synthetic_ratio} and `mix.target_per_class` = "
                f"{self.target_per_class} are both set; set one of them (the other null)"
            )
        modes = [s.mode for s in self.sources]
        if len(set(modes)) != len(modes):
            raise ValueError(f"`mix.sources` names a mode twice ({modes}); give each mode once")
        total = sum(s.fraction for s in self.sources)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"`mix.sources` fractions sum to {total}; they must sum to 1")
        return self


class Filter(_Block):
    enabled: bool
    tau: Optional[float] = Field(ge=0, le=1)
    delta: Optional[float | Literal["auto"]]
    metric: Literal["cosine", "l2"]
    space: Literal["features", "pixels"]
    max_factor: float = Field(ge=1, le=100, allow_inf_nan=False)
    classifier_data: Literal["train", "reference"]

    @field_validator("delta")
    @classmethod
    def _distance(cls, v):
        if isinstance(v, float) and not 0 <= v <= 2:
            raise ValueError("give a distance in [0, 2], 'auto' or null to disable")
        return v


class Metrics(_Block):
    """``conf/metrics/*.yaml``: the feature space of FID/KID/precision/recall and where its weights are."""

    features: Literal["domain", "inception", "dinov2", "clip"] = "domain"
    inception_weights: Optional[str] = None  # the FID Inception file (pt_inception-2015-12-05)
    dinov2_weights: Optional[str] = None  # a local DINOv2 model folder
    clip_weights: Optional[str] = None  # a local CLIP model folder
    cache_dir: Optional[str] = None
    kid_subset_size: int = Field(default=100, ge=2)
    kid_subsets: int = Field(default=50, ge=1)
    domain_steps: int = Field(default=300, ge=1)
    seed: int = 0

    @model_validator(mode="after")
    def _weights_given(self):
        key = f"{self.features}_weights"
        if self.features != "domain" and not getattr(self, key):
            raise ValueError(
                f"`metrics.features` = {self.features!r} needs `metrics.{key}` (a local path; nothing is "
                "downloaded at run time; README: Which feature space), or use `metrics.features=domain`"
            )
        return self


class Generate(_Block):
    """``conf/generate.yaml``."""

    run_dir: str = Field(min_length=1)
    out_dir: str = Field(min_length=1)
    format: Literal["folder", "webdataset", "parquet"] = "folder"
    shard_size: int = Field(10000, ge=1, le=10_000_000)
    mode: Mode
    n_per_class: int = Field(ge=0, le=MAX_PER_CLASS)
    seed: int
    include_real: bool
    img2img: Img2Img
    mix: Mix
    filter: Filter
    precision_recall_k: int = Field(ge=1)
    score_max_images: Optional[int] = Field(ge=1)
    sample_kwargs: Optional[dict[str, Any]]  # checked by the generator kind (each declares its keys)
    batch_size: int = Field(ge=1, le=65536)
    io_workers: Optional[int] = Field(ge=0, le=64)  # null: io_workers_for's choice
    render_streams: Optional[int] = Field(default=None, ge=1, le=64)  # null: render_streams_for's choice
    device: str
    score: bool
    progress: bool
    overwrite: bool
    durable: bool = True
    shard: int = Field(ge=0)
    num_shards: int = Field(ge=1, le=100_000)
    data: Any = None  # a data config: validated by the data module
    augment: Any = None  # checked by build_augmenter
    metrics: Optional[Metrics] = None

    @model_validator(mode="after")
    def _shards(self):
        if self.shard >= self.num_shards:
            raise ValueError(f"`shard` = {self.shard}, `num_shards` = {self.num_shards}: need 0 <= shard < num_shards")
        return self


def _where(loc: tuple) -> str:
    return ".".join(str(p) for p in loc)


def _value_at(data: Any, loc: tuple) -> Any:
    for p in loc:
        try:
            data = data[p]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def validate(
    config: Any, schema: type[BaseModel], name: str, prefix: str | None = None, source: str | None = None
) -> BaseModel:
    """``config`` (a DictConfig or a mapping) checked against ``schema``; the first problem raises a
    :class:`ConfigError` ``` `key` = value: what is expected (conf/<name>.yaml) ```. ``prefix``: the
    block's key in its job config (``metrics``), put in front of the keys named in messages.
    ``source``: the file the values were read from (a generator's config.json), named instead of
    ``conf/<name>.yaml``."""
    from omegaconf import DictConfig, OmegaConf

    where = source or f"conf/{name}.yaml"
    data = OmegaConf.to_container(config, resolve=True) if isinstance(config, DictConfig) else dict(config)
    try:
        return schema.model_validate(data)
    except ValidationError as e:
        err = e.errors(include_url=False)[0]
        loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p in ("float", "literal['auto']")))
        if prefix:
            loc, data = (prefix, *loc), {prefix: data}
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "missing" and loc and isinstance(loc[-1], int):  # a fixed-length list too short
            loc, msg = loc[:-1], f"too few items (item {loc[-1]} is missing)"
        if err["type"] == "extra_forbidden":
            allowed = sorted(_fields_at(schema, loc[:-1]))
            raise ConfigError(
                f"`{_where(loc)}` is not a key of the {name} config ({where}); "
                f"allowed here: {allowed}. Check the spelling."
            ) from None
        if not loc:  # a cross-field rule of the top-level config
            raise ConfigError(f"{msg} ({where}).") from None
        if msg.startswith("`"):  # a cross-field rule of a block: already names its keys
            raise ConfigError(f"{msg}{'' if source is None else f' ({where})'}.") from None
        value = repr(_value_at(data, loc))
        if len(value) > 200:
            value = value[:200] + "..."
        raise ConfigError(f"`{_where(loc)}` = {value}: {msg[0].lower() + msg[1:]} ({where}).") from None


def _model_in(ann: Any) -> type[BaseModel] | None:
    """The schema inside an annotation (``Optional[X]``, ``dict[str, X]``, ``list[X]`` ...), if any."""
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return ann
    for arg in getattr(ann, "__args__", ()):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _fields_at(schema: type[BaseModel], loc: tuple) -> list[str]:
    """The keys allowed at ``loc`` (dict keys and list indices walk into the value's schema)."""
    current: type[BaseModel] | None = schema
    for p in loc:
        if current is not None and isinstance(p, str) and p in current.model_fields:
            ann = current.model_fields[p].annotation
            nested = _model_in(ann)
            if nested is None:
                return []
            current = nested
        # else: a mapping key or list index: stay with the value schema found so far
    return list(current.model_fields) if current is not None else []


def _distinct(v: list) -> list:
    if len(set(v)) != len(v):
        raise ValueError("give distinct values")
    return v


class GeneratorEntry(_Block):
    """One synthetic source of ``evaluate.py`` (``generators.<name>``)."""

    enabled: bool = True  # entries added with `+generators.<name>...` are on
    train: Optional[list[str]] = None
    run_of: Optional[str] = None
    run_dir: Optional[str] = None
    folder: Optional[str] = None
    generate: Optional[list[str]] = None
    label: Optional[str] = None
    policies: Optional[list[str]] = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_source(self):
        given = [k for k in ("train", "run_of", "run_dir", "folder") if getattr(self, k) is not None]
        if self.enabled and len(given) != 1:
            raise ValueError(
                f"must give exactly one of ['train', 'run_of', 'run_dir', 'folder'], got {given or 'none'}"
            )
        return self


class Pseudo(_Block):
    """``pseudo`` of ``evaluate.py``: the ``real+pseudo+classical`` baseline of an unlabelled pool."""

    enabled: bool = True
    thresholds: list[float] = Field(min_length=1)  # the teacher's confidence to keep a pseudo-label; val-chosen
    copies: int = Field(default=0, ge=0, le=1000)  # classical copies of each kept pseudo-labelled image

    @field_validator("thresholds")
    @classmethod
    def _in_unit_interval(cls, v: list[float]) -> list[float]:
        if min(v) < 0 or max(v) > 1:
            raise ValueError("give confidences in [0, 1], e.g. [0.5, 0.8, 0.95]")
        return _distinct(v)


class Evaluate(_Block):
    """``conf/evaluate.yaml``."""

    out_dir: str = Field(min_length=1)
    shots: list[Optional[int]] = Field(min_length=1)
    data_seeds: list[int] = Field(min_length=1)
    seeds: list[int] = Field(min_length=1)
    seed: int
    selection: Literal["val", "none"]
    methods: Optional[list[str]]
    synthetic_copies: int = Field(ge=0)
    cas_seeds: int = Field(ge=0)
    distill_control: bool = True
    classifier: dict[str, Any]  # the fixed recipe: checked by metrics.downstream.check_recipe
    policies: dict[str, Any] = Field(min_length=1)  # each checked by data.mixed.MixPolicy.from_config
    generators: dict[str, Optional[GeneratorEntry]]
    data: Any = None
    augment: Any = None
    metrics: Optional[Metrics] = None
    pseudo: Optional[Pseudo] = None

    _distinct_lists = field_validator("shots", "data_seeds", "seeds")(_distinct)

    @field_validator("shots")
    @classmethod
    def _positive(cls, v):
        if any(s is not None and s <= 0 for s in v):
            raise ValueError("give positive ints (null = all training images), e.g. shots=[5,10]")
        return v


class PseudoLabelOptions(_Block):
    """``pseudo_labels`` of ``conf/train.yaml``: a teacher (the fixed-recipe classifier trained on the shots)
    labels the unlabelled pool; the images it is at least ``threshold`` sure of train as labelled ones."""

    enabled: bool = False
    threshold: float = Field(default=0.9, ge=0, le=1)
    steps: int = Field(default=300, ge=1)  # the teacher's optimisation steps
    seed: int = 0


class Train(_Block):
    """``conf/train.yaml``: the top level. Each group's content is checked by what it builds
    (the data module, the generator module, Lightning's Trainer, the callbacks)."""

    seed: int
    ckpt_path: Optional[str]
    run_dir: str = Field(min_length=1)
    data: dict[str, Any]
    model: dict[str, Any]
    trainer: dict[str, Any]
    metrics: Metrics
    callbacks: Optional[dict[str, Optional[dict[str, Any]]]]
    logger: Optional[dict[str, Optional[dict[str, Any]]]]
    pseudo_labels: PseudoLabelOptions = PseudoLabelOptions()

    @field_validator("model")
    @classmethod
    def _target(cls, v):
        if not isinstance(v.get("_target_"), str):
            raise ValueError("needs `_target_` (the generator module class), e.g. model=cgan|ddpm|sd_lora")
        return v

    @field_validator("trainer")
    @classmethod
    def _steps(cls, v):
        steps = v.get("max_steps", -1)
        if not (isinstance(steps, int) and (steps == -1 or steps > 0)):
            raise ValueError(f"`trainer.max_steps` = {steps!r}; give a positive number of optimiser steps")
        return v


# --------------------------------------------------------------------------- `_target_` blocks
# A block that Hydra instantiates (`data`, `model`, `trainer`, each callback and logger) has its
# class's constructor as its schema: the annotated signature gives the keys, the types and the
# defaults, so they are written once, in the code that uses them (as LightningCLI does).
_SKIP = {"self", "args", "kwargs"}


def _locate(target: str, key: str, name: str) -> type:
    from hydra.utils import get_class

    try:
        return get_class(target)
    except Exception as e:  # noqa: BLE001 - Hydra raises ImportError / ValueError with its own wording
        raise ConfigError(
            f"`{key}._target_` = {target!r} cannot be imported ({type(e).__name__}: "
            f"{str(e).splitlines()[0]}); give a class path like `package.module.Class` "
            f"(conf/{name}.yaml)."
        ) from None


def _hint(hints: dict, param) -> Any:
    import inspect

    ann = hints.get(param.name, param.annotation)
    if ann is inspect.Parameter.empty or isinstance(ann, str):
        return Any
    try:  # a hint pydantic cannot check (a framework object, a callable protocol) checks nothing
        from pydantic import TypeAdapter

        TypeAdapter(ann)
    except Exception:  # noqa: BLE001
        return Any
    return ann


def signature_schema(cls: type) -> tuple[type[BaseModel], bool]:
    """A pydantic model of ``cls.__init__``'s keyword parameters (following ``**kwargs`` up the
    class hierarchy), and whether the chain ends in ``**kwargs`` (then unknown keys pass)."""
    import inspect
    import typing

    from pydantic import create_model

    fields: dict[str, Any] = {}
    open_ended = False
    for klass in cls.__mro__:
        if klass is object or "__init__" not in vars(klass):
            continue
        init = inspect.unwrap(vars(klass)["__init__"])  # the constructor itself, not a checking wrapper
        try:
            hints = typing.get_type_hints(init, include_extras=True)
        except Exception:  # noqa: BLE001 - unresolvable forward references: types unchecked
            hints = {}
        params = inspect.signature(init).parameters.values()
        for p in params:
            if p.name in _SKIP or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                continue
            if p.name not in fields:  # the most derived class speaks first
                default = None if p.default is inspect.Parameter.empty else p.default
                fields[p.name] = (_hint(hints, p), default)
        open_ended = any(p.kind == p.VAR_KEYWORD for p in params)
        if not open_ended:
            break
    else:
        open_ended = True
    config = ConfigDict(extra="allow" if open_ended else "forbid", arbitrary_types_allowed=True)
    return create_model(f"{cls.__name__}Args", __config__=config, **fields), open_ended


def check_args(cls: type, key: str, values: dict[str, Any], name: str | None = None, target: str | None = None) -> None:
    """``values`` (the arguments given for ``cls``) against ``cls``'s annotated constructor: unknown keys
    (naming the allowed ones), wrong types and out-of-range values raise a :class:`ConfigError` naming
    ``key.<arg>``. Missing required arguments are left to the job, which injects data facts
    (``num_classes`` ...)."""
    schema, _ = signature_schema(cls)
    target = target or f"{cls.__module__}.{cls.__qualname__}"
    where = f"{target} (conf/{name}.yaml)" if name else target
    try:
        schema.model_validate(values)
    except ValidationError as e:
        err = next((x for x in e.errors(include_url=False) if x["type"] != "missing"), None)
        if err is None:
            return
        loc = (key, *err["loc"])
        if err["type"] == "extra_forbidden":
            raise ConfigError(
                f"`{_where(loc)}` is not an argument of {where}; allowed here: "
                f"{sorted(schema.model_fields)}. Check the spelling."
            ) from None
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(
            f"`{_where(loc)}` = {_value_at(values, err['loc'])!r}: {msg[0].lower() + msg[1:]} "
            f"(an argument of {target}{f'; conf/{name}.yaml' if name else ''})."
        ) from None


def check_target(node: Any, key: str, name: str) -> None:
    """:func:`check_args` for one ``_target_`` block (``key`` is its path, e.g. ``model``), before
    anything is built."""
    from omegaconf import DictConfig, OmegaConf

    data = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    target = data.pop("_target_", None)
    for k in [k for k in data if k.startswith("_") and k.endswith("_")]:  # _convert_, _partial_ ...
        data.pop(k)
    if isinstance(target, str):
        check_args(_locate(target, key, name), key, data, name, target)


def check_targets(cfg: Any, keys: tuple[str, ...], name: str) -> None:
    """:func:`check_target` for each of ``keys`` (a block, or a mapping of blocks like ``callbacks``)."""
    for key in keys:
        node = cfg.get(key) if hasattr(cfg, "get") else None
        if node is None:
            continue
        if "_target_" in node:
            check_target(node, key, name)
            continue
        for sub, block in node.items():
            if block is not None and hasattr(block, "get") and "_target_" in block:
                check_target(block, f"{key}.{sub}", name)
