"""The ``sd_lora`` kind: Stable Diffusion 1.x/2.x and SDXL with LoRA adapters, learned class tokens
(textual inversion) or one adapter per class.

* :mod:`.family` -- what differs between SD-1.x/2.x and SDXL (text encoders, prompt encoding, added
  conditioning, pipelines, the LoRA file), and loading the base model;
* :mod:`.prompts` -- one prompt per class;
* :mod:`.lora` -- peft configs, named adapters, the weight files a folder may name;
* :mod:`.textual_inversion` -- one learned token per class;
* :mod:`.options` -- the config's typed blocks;
* :mod:`.generator` -- :class:`SDLoRAGenerator`, the saved generator;
* :mod:`.module` -- :class:`SDLoRAModule`, the training module.
"""

from imgaug_gen.generators.sd.generator import SDLoRAGenerator
from imgaug_gen.generators.sd.module import SDLoRAModule

__all__ = ["SDLoRAGenerator", "SDLoRAModule"]
