"""dit-jax: a minimal Diffusion Transformer framework in JAX/Flax, with SDTM token merging.

    from dit_jax import load, sample
    w = load()                                  # the model shipped in the package
    imgs = sample(w, "sneaker", sdtm=True)      # uint8 (1, H, W, C)
"""

# The CLI module dit_jax/sample.py shares its name with the function below: import it first so
# that a later `import dit_jax.sample` finds it loaded and does not rebind `dit_jax.sample`.
from dit_jax import sample as _sample_cli  # noqa: F401
from dit_jax.pipeline import denoise, sample
from dit_jax.weights import Weights, load, save
from sdtm import SDTMConfig, ToMeConfig

__all__ = ["SDTMConfig", "ToMeConfig", "Weights", "denoise", "load", "sample", "save"]
