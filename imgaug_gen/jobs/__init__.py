"""The jobs behind the front ends, each a plain function of a composed config: :func:`train
<imgaug_gen.jobs.train.train>` (``train.py``), :func:`generate <imgaug_gen.jobs.generate.generate>`
(``generate.py``) and :func:`evaluate <imgaug_gen.jobs.evaluate.evaluate>` (``evaluate.py``)."""
