"""Generator kinds behind one contract (see :mod:`imgaug_gen.generators.base`); their training
modules subclass :class:`GeneratorModule` (imported lazily: it needs pytorch_lightning)."""

from imgaug_gen.generators.base import ConditionalGenerator, generator_class, load_generator, register_generator  # noqa: F401


def __getattr__(name: str):
    if name == "GeneratorModule":
        from imgaug_gen.generators.module import GeneratorModule

        return GeneratorModule
    raise AttributeError(name)
