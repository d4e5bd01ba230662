"""The exported model's Hugging Face classes, so the directory loads offline with
`AutoModelForImageTextToText.from_pretrained(dir, trust_remote_code=True)`.

Stock `LlavaForConditionalGeneration` expects a fixed number of image tokens per image (it
repeats an image token id that many times in the prompt), which DTP-ViT does not have; this
class wraps our `LlavaModel`, so the exported model splices each image's own token count
exactly as in training. The export copies this module and every dtpclip / llava_bridge module it
imports into the directory (remote_code.py), so loading needs torch, transformers and timm only.
"""
from transformers import AutoConfig, AutoModelForCausalLM, GenerationMixin, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

import dtpclip.encoders  # noqa: F401  (registers every family and transform with the registry)
from dtpclip.factory import create_encoder, restore_structure
from llava_bridge.model import LlavaModel, VisionTower


class DtpLlavaConfig(PretrainedConfig):
    """encoder (registry name), model_kwargs, tower_structure (its transforms and quantization), select_layer,
    select_feature, projector, lm_config (LM config dict), max_sequence_length (the LM sequence cut after splicing)."""

    model_type = "dtpclip_llava"

    def __init__(self, encoder: str = "dtp_vit_tiny_patch16_64_4x", model_kwargs=None, tower_structure=None,
                 select_layer: int = -1, select_feature: str = "patch", projector: str = "mlp2x_gelu",
                 lm_config=None, max_sequence_length=None, **kwargs):
        self.encoder, self.model_kwargs, self.tower_structure = encoder, model_kwargs or {}, tower_structure or {}
        self.select_layer, self.select_feature, self.projector = select_layer, select_feature, projector
        self.lm_config, self.max_sequence_length = lm_config or {}, max_sequence_length
        super().__init__(**kwargs)


class DtpLlavaForConditionalGeneration(PreTrainedModel, GenerationMixin):
    """`forward(input_ids (IMAGE_TOKEN_INDEX placeholders), attention_mask, pixel_values, labels)`."""

    config_class = DtpLlavaConfig
    base_model_prefix = "model"

    def __init__(self, config: DtpLlavaConfig):
        super().__init__(config)
        text = dict(config.lm_config)
        lm = AutoModelForCausalLM.from_config(AutoConfig.for_model(text.pop("model_type"), **text))
        encoder = create_encoder(config.encoder, **config.model_kwargs)
        tower = VisionTower(restore_structure(encoder, config.tower_structure), config.select_layer,
                            config.select_feature)
        self.model = LlavaModel(tower, lm, config.projector, config.max_sequence_length)
        self.post_init()

    def _init_weights(self, module):
        """Every weight comes from the export; nothing to initialise."""

    def generate(self, input_ids, pixel_values=None, attention_mask=None, **kwargs):
        """HF `generate` on the spliced prompts: the LM's own `generate` with its KV cache, after the splice
        (prompts padded on either side; each image's own token count). Returns the new token ids only: the
        prompt's placeholders are no token ids."""
        return self.model.generate(input_ids, pixel_values, attention_mask=attention_mask, **kwargs)

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        if attention_mask is None:
            attention_mask = input_ids.new_ones(input_ids.shape)
        logits, labels, _ = self.model(input_ids, attention_mask, labels, pixel_values)
        loss = None
        if labels is not None:
            from torch.nn.functional import cross_entropy
            loss = cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)
