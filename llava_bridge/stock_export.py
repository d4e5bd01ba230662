"""A trained model with a plain-ViT tower as stock transformers LLaVA: `LlavaForConditionalGeneration` with
`CLIPVisionModel` weights and a `LlavaProcessor` (image processor, chat template, `<image>` token), loadable
where dtpclip is not installed (`pipeline("image-text-to-text", model=DIR)`).

Stock LLaVA gives every image the same number of tokens and reads CLIP's hidden_states[k] before the final
norm, so this form takes a plain ViT (no merging, pooling or quantization), `select_layer` <= -2 (LLaVA-1.5's
-2) and the `mlp2x_gelu` projector; anything else is exported with remote code (llava_bridge.export).
The timm ViT is CLIP's layout (pre-norm, no patch-embed bias, exact GELU), so its weights map one to one
onto CLIPVisionModel's (the fused qkv split into q, k, v).
"""
import copy
import math
from pathlib import Path

import timm
import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.models.llava import LlavaImageProcessor

from dtpclip.encoders.vit import PlainViT
from dtpclip.encoders.quant import quant_config
from llava_bridge.conversation import IMAGE_TOKEN, Template

CHAT_TEMPLATES = {
    # LLaVA's conv_vicuna_v1 with `<image>\n` first in its turn (preprocess_multimodal)
    "vicuna_v1": (
        "{{ system }}{% for message in messages %}{% if message['role'] == 'user' %}USER: "
        "{% for part in message['content'] if part['type'] == 'image' %}<image>\n{% endfor %}"
        "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %} ASSISTANT:"
        "{% elif message['role'] == 'assistant' %}"
        "{% for part in message['content'] if part['type'] == 'text' %} {{ part['text'] }}{% endfor %}{{ eos_token }}"
        "{% endif %}{% endfor %}"),
    # LLaVA's conv_llava_plain: the image alone, then the caption
    "plain": (
        "{% for message in messages %}{% if message['role'] == 'user' %}"
        "{% for part in message['content'] if part['type'] == 'image' %}<image>{% endfor %}"
        "{% elif message['role'] == 'assistant' %}"
        "{% for part in message['content'] if part['type'] == 'text' %}{{ part['text'] }}{% endfor %}\n"
        "{% endif %}{% endfor %}"),
}


def stock_refusal(model, config: dict) -> str:
    """Why the trained model cannot be stock LLaVA ('' when it can)."""
    encoder = model.vision_tower.encoder
    if type(encoder) is not PlainViT or quant_config(encoder) is not None:
        return (f"its tower is {type(encoder).__name__}{' (quantized)' if quant_config(encoder) else ''}, not a "
                "plain ViT: stock LLaVA gives every image the same tokens of an unmodified CLIP ViT")
    if config["select_layer"] > -2:
        return ("it reads the tower's final-normed tokens (select_layer -1); stock LLaVA reads hidden_states[k] "
                "before the final norm: train with --select-layer -2 (LLaVA-1.5's)")
    if config["projector"] != "mlp2x_gelu":
        return f"its projector is {config['projector']!r}; stock LLaVA's is the 2-layer GELU MLP (mlp2x_gelu)"
    return ""


def clip_vision_state(vit) -> dict:
    """A CLIP-layout timm ViT's weights under CLIPVisionModel's names."""
    state = {"embeddings.class_embedding": vit.cls_token.reshape(-1),
             "embeddings.patch_embedding.weight": vit.patch_embed.proj.weight,
             "embeddings.position_embedding.weight": vit.pos_embed[0],
             "pre_layrnorm.weight": vit.norm_pre.weight, "pre_layrnorm.bias": vit.norm_pre.bias,
             "post_layernorm.weight": vit.norm.weight, "post_layernorm.bias": vit.norm.bias}
    for i, block in enumerate(vit.blocks):
        layer = f"encoder.layers.{i}."
        for name, weight, bias in zip(("q_proj", "k_proj", "v_proj"), block.attn.qkv.weight.chunk(3),
                                      block.attn.qkv.bias.chunk(3)):
            state[layer + f"self_attn.{name}.weight"], state[layer + f"self_attn.{name}.bias"] = weight, bias
        pairs = {"self_attn.out_proj": block.attn.proj, "layer_norm1": block.norm1, "layer_norm2": block.norm2,
                 "mlp.fc1": block.mlp.fc1, "mlp.fc2": block.mlp.fc2}
        for name, module in pairs.items():
            state[layer + name + ".weight"], state[layer + name + ".bias"] = module.weight, module.bias
    return {k: v.detach().clone() for k, v in state.items()}


def clip_vision_config(vit) -> CLIPVisionConfig:
    return CLIPVisionConfig(hidden_size=vit.embed_dim, intermediate_size=vit.blocks[0].mlp.fc1.out_features,
                            num_hidden_layers=len(vit.blocks), num_attention_heads=vit.blocks[0].attn.num_heads,
                            image_size=vit.patch_embed.img_size[0], patch_size=vit.patch_embed.patch_size[0],
                            hidden_act="gelu", layer_norm_eps=vit.norm.eps, projection_dim=vit.embed_dim)


def image_processor(vit, image_aspect_ratio: str) -> LlavaImageProcessor:
    """The tower's eval transform as an HF image processor: timm's resize to size / crop_pct, center crop,
    normalise; 'pad' squares the image on the mean colour first (LLaVA-1.5)."""
    cfg = timm.data.resolve_data_config({}, model=vit)
    size = cfg["input_size"][-1]
    return LlavaImageProcessor(do_pad=image_aspect_ratio == "pad",
                               size={"shortest_edge": math.floor(size / cfg["crop_pct"])},
                               crop_size={"height": size, "width": size}, image_mean=list(cfg["mean"]),
                               image_std=list(cfg["std"]), resample=3)  # PIL bicubic, timm's 'bicubic'


def export_stock(model, tokenizer, template: Template, config: dict, out_dir) -> Path:
    """Write the trained LlavaModel as stock LLaVA (weights, config, processor) into `out_dir` (new)."""
    refusal = stock_refusal(model, config)
    if refusal:
        raise ValueError(f"this model cannot be exported as stock LLaVA: {refusal}")
    vit = model.vision_tower.encoder
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    lm = copy.deepcopy(model.language_model)
    lm.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    with torch.no_grad():  # the placeholder's rows: replaced by image features, and suppressed as an answer
        lm.get_input_embeddings().weight[image_token_id:] = 0
        lm.get_output_embeddings().weight[image_token_id:] = 0
    keeps_cls = config["select_feature"] == "cls_patch"
    patches = vit.patch_embed.num_patches
    hf_config = LlavaConfig(vision_config=clip_vision_config(vit), text_config=lm.config,
                            image_token_index=image_token_id, image_seq_length=patches + keeps_cls,
                            projector_hidden_act="gelu", vision_feature_layer=config["select_layer"],
                            vision_feature_select_strategy="full" if keeps_cls else "default")
    hf = LlavaForConditionalGeneration(hf_config).eval()
    hf.model.vision_tower.load_state_dict(clip_vision_state(vit))
    projector = model.projector
    hf.model.multi_modal_projector.linear_1.load_state_dict(projector[0].state_dict())
    hf.model.multi_modal_projector.linear_2.load_state_dict(projector[2].state_dict())
    hf.model.language_model.load_state_dict(lm.model.state_dict())
    hf.lm_head.load_state_dict(lm.lm_head.state_dict())
    hf.generation_config.suppress_tokens = [image_token_id]  # a placeholder, never an answer
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(hf.generation_config, key, getattr(tokenizer, key))
    hf.save_pretrained(out_dir)
    tokenizer.chat_template = None  # the processor carries the template: one place, not two that may differ
    processor = LlavaProcessor(image_processor(vit, config.get("image_aspect_ratio", "crop")), tokenizer,
                               patch_size=vit.patch_embed.patch_size[0],
                               vision_feature_select_strategy=hf_config.vision_feature_select_strategy,
                               chat_template=CHAT_TEMPLATES[template.name].replace("{{ system }}", template.system),
                               image_token=IMAGE_TOKEN, num_additional_image_tokens=vit.num_prefix_tokens)
    processor.save_pretrained(out_dir)
    return Path(out_dir)
