"""Tiny random diffusers models shaped like SD1.5's (4 latent channels, text context of width 8), small enough
for tests that run real diffusers code offline in a second."""

from diffusers import AutoencoderKL, UNet2DConditionModel

# Two levels of 4 and 8 channels, one layer each, 2 norm groups: the sizes both models share.
TINY_LEVELS = dict(block_out_channels=(4, 8), layers_per_block=1, norm_num_groups=2)
# A Stable Diffusion pipeline's text and safety models, left out: the tests pass prompt embeddings.
NO_TEXT_MODELS = dict(text_encoder=None, tokenizer=None, safety_checker=None, feature_extractor=None)


def tiny_sd_unet(sample_size: int = 16) -> UNet2DConditionModel:
    """The conditional UNet, cross-attention (head width 2, context width 8) at the upper level, in eval mode."""
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=4,
        out_channels=4,
        cross_attention_dim=8,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        **TINY_LEVELS,
    ).eval()


def tiny_vae() -> AutoencoderKL:
    """An RGB VAE with 4 latent channels (scale factor 2), in eval mode."""
    blocks = dict(down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, **blocks, **TINY_LEVELS).eval()
