"""diffusers DiT checkpoints -> `DiTDetectionConfig` + the weights of our backbone (its DiT and VAE encoder).

Accepts a diffusers DiT pipeline (`model_index.json`, `transformer/`, `vae/`, e.g. `facebook/DiT-XL-2-256`; a
pixel-space DiT's pipeline has no VAE: `"vae": [null, null]`, as pretrain_dit.py saves it) or a lone
`DiTTransformer2DModel` folder, on the Hub or on disk; diffusers' own loaders read the weights. Every
transformer and VAE-encoder weight is mapped; what is left out is left out on purpose and logged: the
noise-prediction head, diffusers' per-block copies of the conditioning embedder, the VAE decoder, and the blocks
after the deepest tapped one (they cannot change the detections).

Not part of a saved model's code: loading a diffusers checkpoint needs the installed package (and diffusers).
"""

from __future__ import annotations

import json
import logging
import os

import torch

from .configuration_dit_backbone import DiTBackboneConfig, default_out_indices
from .configuration_dit_detection import BACKBONE_ARGUMENTS, DiTDetectionConfig

logger = logging.getLogger(__name__)

DIFFUSERS_DIT_CLASSES = ("DiTTransformer2DModel", "Transformer2DModel")
# Fields of diffusers' AutoencoderKL config that shape its encoder or scale its latents.
VAE_ENCODER_FIELDS = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "act_fn",
                      "latent_channels", "norm_num_groups", "sample_size", "scaling_factor", "shift_factor",
                      "use_quant_conv", "mid_block_add_attention")
# diffusers block parameter -> ours, per block.
BLOCK_KEY_MAP = {
    "norm1.linear": "adaln_modulation",
    "attn1.to_q": "attention.q_proj",
    "attn1.to_k": "attention.k_proj",
    "attn1.to_v": "attention.v_proj",
    "attn1.to_out.0": "attention.o_proj",
    "ff.net.0.proj": "mlp.fc1",
    "ff.net.2": "mlp.fc2",
}
EMBEDDER_KEY_MAP = {
    "norm1.emb.timestep_embedder.linear_1": "timestep_embedder.linear_1",
    "norm1.emb.timestep_embedder.linear_2": "timestep_embedder.linear_2",
    "norm1.emb.class_embedder.embedding_table": "class_embedder",
}


def checkpoint_kind(name_or_path: str, **hub_kwargs) -> str:
    """`"diffusers"` for a diffusers DiT pipeline or transformer, `"dit_detection"` for a saved detector; decided
    from the files (`model_index.json`, `config.json`), never from the name. Raises `ValueError` otherwise."""
    if _read_json(name_or_path, "model_index.json", **hub_kwargs) is not None:
        return "diffusers"
    config = _read_json(name_or_path, "config.json", **hub_kwargs)
    if config is None:
        raise ValueError(f"{name_or_path} has neither model_index.json (a diffusers pipeline) nor config.json.")
    if config.get("model_type") == DiTDetectionConfig.model_type:
        return "dit_detection"
    if config.get("_class_name") in DIFFUSERS_DIT_CLASSES:
        return "diffusers"
    raise ValueError(f"{name_or_path} is neither a diffusers DiT nor a saved DiT detector: its config.json has "
                     f"model_type={config.get('model_type')!r}, _class_name={config.get('_class_name')!r}.")


def load_diffusers_components(name_or_path: str, vae=None, **hub_kwargs):
    """The diffusers `DiTTransformer2DModel` and `AutoencoderKL` (or None for a pixel-space DiT) of a pipeline or
    a lone transformer folder. `vae` (an `AutoencoderKL` or its path) replaces or supplies the pipeline's VAE."""
    from diffusers import AutoencoderKL, DiTTransformer2DModel

    index = _read_json(name_or_path, "model_index.json", **hub_kwargs)
    if index is not None:
        if "transformer" not in index:
            components = sorted(k for k in index if not k.startswith("_"))
            raise ValueError(f"{name_or_path} is a diffusers {index.get('_class_name')} pipeline with components "
                             f"{components}: it has no transformer, so it is not a DiT.")
        transformer = DiTTransformer2DModel.from_pretrained(name_or_path, subfolder="transformer", **hub_kwargs)
        if vae is None and _has_component(index, "vae"):
            vae = AutoencoderKL.from_pretrained(name_or_path, subfolder="vae", **hub_kwargs)
    else:
        config = _read_json(name_or_path, "config.json", **hub_kwargs) or {}
        if config.get("_class_name") not in DIFFUSERS_DIT_CLASSES:
            raise ValueError(f"{name_or_path} is not a diffusers DiT: expected model_index.json or a config.json "
                             f"of {' / '.join(DIFFUSERS_DIT_CLASSES)}, got _class_name={config.get('_class_name')!r}.")
        transformer = DiTTransformer2DModel.from_pretrained(name_or_path, **hub_kwargs)
    if isinstance(vae, (str, os.PathLike)):
        vae = AutoencoderKL.from_pretrained(vae, **hub_kwargs)

    transformer_config = transformer.config
    if transformer_config.get("norm_type") != "ada_norm_zero" or transformer_config.get("num_embeds_ada_norm") is None:
        raise ValueError(f"{name_or_path}: the transformer is not a class-conditional adaLN-Zero DiT "
                         f"(norm_type={transformer_config.get('norm_type')!r}).")
    if vae is None and transformer_config["in_channels"] != 3:
        raise ValueError(f"{name_or_path} is a latent DiT ({transformer_config['in_channels']} input channels) but no "
                         f"VAE was found; pass vae=<AutoencoderKL or its path>.")
    if vae is not None and vae.config["latent_channels"] != transformer_config["in_channels"]:
        raise ValueError(f"The VAE has {vae.config['latent_channels']} latent channels but the DiT reads "
                         f"{transformer_config['in_channels']}.")
    return transformer, vae


def _has_component(index: dict, name: str) -> bool:
    """Whether a pipeline's model_index.json holds component `name`. diffusers writes a component that was None (the
    VAE of a pixel-space DiT pipeline, as pretrain_dit.py saves one) as `[null, null]`."""
    entry = index.get(name)
    if isinstance(entry, (list, tuple)):
        return any(part is not None for part in entry)
    return bool(entry)


def config_from_diffusers(transformer_config, vae_config=None, **overrides) -> DiTDetectionConfig:
    """A `DiTDetectionConfig` whose backbone has the geometry of a diffusers DiT (and VAE). `overrides` set the rest:
    backbone fields (`out_indices` as stages, `feature_timestep`, `image_size`, ...) and detector fields
    (`id2label`, neck, decoder, loss ...); a geometry override that disagrees with the checkpoint is an error.
    `num_hidden_layers` defaults to the deepest tapped stage: later blocks cannot change the detections."""
    vae = {key: vae_config[key] for key in VAE_ENCODER_FIELDS if key in vae_config} if vae_config else None
    heads, patch = transformer_config["num_attention_heads"], transformer_config["patch_size"]
    latent_size = transformer_config["sample_size"]
    vae_factor = 2 ** (len(vae["block_out_channels"]) - 1) if vae else 1
    geometry = {
        "hidden_size": heads * transformer_config["attention_head_dim"],
        "num_attention_heads": heads,
        "patch_size": patch,
        "in_channels": transformer_config["in_channels"],
        "num_class_embeds": transformer_config["num_embeds_ada_norm"],
        "attention_bias": transformer_config.get("attention_bias", True),
        "mlp_norm_eps": transformer_config.get("norm_eps", 1e-5),
        "attention_norm_eps": 1e-6,  # hard-coded in diffusers' AdaLayerNormZero
        "timestep_freq_shift": 1,  # diffusers' CombinedTimestepLabelEmbeddings
        "frequency_embedding_size": 256,
        "mlp_ratio": 4.0,
        "base_grid_size": latent_size // patch,
        "vae_config": vae,
    }
    mismatched = {key: (value, geometry[key]) for key, value in overrides.items()
                  if key in geometry and value != geometry[key]}
    if mismatched:
        details = ", ".join(f"{key}={given!r} (checkpoint: {actual!r})" for key, (given, actual) in mismatched.items())
        raise ValueError(f"Config overrides disagree with the checkpoint's geometry: {details}.")

    depth = transformer_config["num_layers"]
    backbone = {key: overrides.pop(key) for key in list(overrides) if key in BACKBONE_ARGUMENTS}
    out_indices = [int(i) for i in backbone.pop("out_indices", None) or default_out_indices(depth)]
    out_indices = [i % (depth + 1) if -depth - 1 <= i < 0 else i for i in out_indices]  # negative: from the end
    num_hidden_layers = backbone.pop("num_hidden_layers", max(out_indices))
    if num_hidden_layers > depth:
        raise ValueError(f"num_hidden_layers={num_hidden_layers} exceeds the checkpoint's {depth} blocks.")
    if max(out_indices) > num_hidden_layers:
        raise ValueError(f"out_indices {out_indices} tap stages beyond the {num_hidden_layers} blocks kept "
                         f"(the checkpoint has {depth}).")
    backbone.setdefault("image_size", latent_size * vae_factor)
    backbone_config = DiTBackboneConfig(**{**geometry, **backbone, "num_hidden_layers": num_hidden_layers,
                                           "out_indices": out_indices})
    return DiTDetectionConfig(backbone_config=backbone_config, **overrides)


def backbone_state_dict_from_diffusers(state_dict: dict, num_layers: int) -> dict[str, torch.Tensor]:
    """diffusers `DiTTransformer2DModel` weights -> `DiTBackbone` weights for its first `num_layers` blocks.

    diffusers keeps a copy of the timestep and class embedder in every block; a converted DiT has one embedder, so
    the copies must be equal, and block 0's is used. Raises `ValueError` on any weight it cannot place.
    """
    converted = {"patch_embed.weight": state_dict["pos_embed.proj.weight"],
                 "patch_embed.bias": state_dict["pos_embed.proj.bias"]}
    used = {"pos_embed.proj.weight", "pos_embed.proj.bias"}
    depth = 1 + max(int(key.split(".")[1]) for key in state_dict if key.startswith("transformer_blocks."))
    for block in range(depth):
        for theirs, ours in EMBEDDER_KEY_MAP.items():
            for suffix in ("weight", "bias"):
                key = f"transformer_blocks.{block}.{theirs}.{suffix}"
                if key not in state_dict:
                    continue
                first = state_dict[f"transformer_blocks.0.{theirs}.{suffix}"]
                if first.device.type != "meta" and not torch.equal(state_dict[key], first):
                    raise ValueError(f"{key} differs from block 0's copy: this DiT has a separate conditioning "
                                     f"embedder per block, which a single-embedder backbone cannot represent.")
                converted[f"{ours}.{suffix}"] = first
                used.add(key)
        if block >= num_layers:
            used.update(key for key in state_dict if key.startswith(f"transformer_blocks.{block}."))
            continue
        for theirs, ours in BLOCK_KEY_MAP.items():
            for suffix in ("weight", "bias"):
                key = f"transformer_blocks.{block}.{theirs}.{suffix}"
                if key in state_dict:
                    converted[f"layers.{block}.{ours}.{suffix}"] = state_dict[key]
                    used.add(key)
    used.update(key for key in state_dict if key.startswith(("proj_out_1.", "proj_out_2.")))  # noise head
    unplaced = sorted(set(state_dict) - used)
    if unplaced:
        raise ValueError(f"diffusers weights with no place in the backbone: {unplaced[:8]}"
                         f"{' ...' if len(unplaced) > 8 else ''}")
    return converted


def vae_encoder_state_dict_from_diffusers(state_dict: dict) -> dict[str, torch.Tensor]:
    """`AutoencoderKL` weights -> `DiTVAEEncoder` weights (the encoder half; same names)."""
    return {key: value for key, value in state_dict.items() if key.startswith(("encoder.", "quant_conv."))}


def load_from_diffusers(model_class, name_or_path, vae=None, id2label=None, fold_conditioning=False,
                        hub_kwargs=None, **config_overrides):
    """Build `model_class` (`DiTForObjectDetection` or `DiTDetectionModel`) from a diffusers DiT: backbone and VAE
    encoder pretrained, the neck and head newly initialised."""
    hub_kwargs = hub_kwargs or {}
    transformer, vae = load_diffusers_components(name_or_path, vae, **hub_kwargs)
    if id2label is not None:
        config_overrides["id2label"] = {int(k): v for k, v in id2label.items()}
    config = config_from_diffusers(transformer.config, vae.config if vae is not None else None, **config_overrides)
    model = model_class(config)
    num_blocks = config.backbone_config.num_hidden_layers
    weights = backbone_state_dict_from_diffusers(transformer.state_dict(), num_blocks)
    if vae is not None:
        weights.update({f"vae.{key}": value
                        for key, value in vae_encoder_state_dict_from_diffusers(vae.state_dict()).items()})
    model.base_model.backbone.load_state_dict(weights, strict=True)
    dropped = transformer.config["num_layers"] - num_blocks
    logger.info("Loaded %s: %d DiT blocks (%d after the deepest tap dropped), %s VAE encoder; not kept: the "
                "noise-prediction head%s.", name_or_path, num_blocks, dropped,
                "with" if vae is not None else "no", " and the VAE decoder" if vae is not None else "")
    if fold_conditioning:
        model.fold_conditioning()
    return model


def _read_json(name_or_path, filename: str, **hub_kwargs) -> dict | None:
    """A JSON file of a local folder or a Hub repo, or None if that file is not there."""
    if os.path.isdir(name_or_path):
        path = os.path.join(name_or_path, filename)
        if not os.path.isfile(path):
            return None
    else:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError

        allowed = {k: v for k, v in hub_kwargs.items() if k in ("revision", "token", "cache_dir", "local_files_only")}
        try:
            path = hf_hub_download(str(name_or_path), filename, **allowed)
        except EntryNotFoundError:
            return None
    with open(path) as file:
        return json.load(file)
