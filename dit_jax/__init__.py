"""dit-jax: a minimal Diffusion Transformer framework in JAX/Flax, with SDTM token merging.

    from dit_jax import load, sample
    w = load()                                  # the model shipped in the package
    imgs = sample(w, "sneaker", sdtm=True)      # uint8 (1, H, W, 3)
"""

from dit_jax.weights import Weights, load, save

__all__ = ["Weights", "load", "save"]
