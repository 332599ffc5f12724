"""Generator kinds behind one contract (see :mod:`imgaug_gen.generators.base`)."""

from imgaug_gen.generators.base import (  # noqa: F401
    ConditionalGenerator,
    generator_class,
    load_generator,
    register_generator,
)
