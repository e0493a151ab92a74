"""Configuration of omniq's bundled tiny Nemotron 3 Nano Omni (`omniq/bundled/tiny-omni`).

Shipped inside the checkpoint directory and named in config.json's `auto_map`, as NVIDIA's Omni checkpoints
ship theirs. Self-contained: it imports only transformers. The top-level keys mirror the real
`NemotronH_Nano_Omni_Reasoning_V3` config at tiny sizes; `llm_config` becomes transformers' native
`NemotronHConfig`, `vision_config` and `sound_config` stay plain dicts.
"""

from transformers import PretrainedConfig
from transformers.models.nemotron_h import NemotronHConfig


class NemotronH_Nano_Omni_Reasoning_V3_Config(PretrainedConfig):
    model_type = "NemotronH_Nano_Omni_Reasoning_V3"
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, sound_config=None, force_image_size=128,
                 patch_size=16, downsample_ratio=0.5, ps_version="v2", vit_hidden_size=None,
                 projector_hidden_size=256, img_context_token_id=None, img_context_token="<image>",
                 sound_context_token_id=None, sound_context_token="<sound>", **kwargs):
        super().__init__(**kwargs)
        if isinstance(llm_config, NemotronHConfig):
            self.llm_config = llm_config
        else:
            self.llm_config = NemotronHConfig(**(llm_config or {}))
        self.vision_config = dict(vision_config or {})
        self.sound_config = dict(sound_config) if sound_config else None
        self.force_image_size = force_image_size
        self.patch_size = patch_size
        self.downsample_ratio = downsample_ratio
        self.ps_version = ps_version
        self.vit_hidden_size = vit_hidden_size or self.vision_config.get("hidden_size")
        self.projector_hidden_size = projector_hidden_size
        self.img_context_token_id = img_context_token_id
        self.img_context_token = img_context_token
        self.sound_context_token_id = sound_context_token_id
        self.sound_context_token = sound_context_token

    @property
    def text_config(self):
        return self.llm_config

    def to_dict(self):
        out = super().to_dict()
        out["llm_config"] = self.llm_config.to_dict()
        return out
