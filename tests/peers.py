"""The reference implementations the parity tests compare against, and a tiny OpenAI CLIP built from them."""
import warnings

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # clip-anytorch imports the deprecated pkg_resources
    import clip as openai_clip


def tiny_openai_clip():
    """An fp32 OpenAI CLIP small enough for CPU tests. It matches denseclip_tiny's towers except the image grid
    (CLIP 64 px vs our 128 px crops). Vision heads = width * 32 // 64 and text heads = width // 64, as OpenAI's
    build_model infers them from the weights."""
    return openai_clip.model.CLIP(embed_dim=64, image_resolution=64, vision_layers=(1, 1, 1, 1), vision_width=16,
                                  vision_patch_size=None, context_length=77, vocab_size=49408,
                                  transformer_width=128, transformer_heads=2, transformer_layers=2).float().eval()
