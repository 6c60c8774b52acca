"""dit-jax: a minimal Diffusion Transformer framework in JAX/Flax, with SDTM token merging.

    from dit_jax import load, sample
    w = load()                                  # the model shipped in the package
    imgs = sample(w, "sneaker", sdtm=True)      # uint8 (1, H, W, C)
"""

import warnings

# The CLI module dit_jax/sample.py shares its name with the function below: import it first so
# that a later `import dit_jax.sample` finds it loaded and does not rebind `dit_jax.sample`.
# (`python -m dit_jax.sample` then finds the module already imported; runpy's warning about that
# is harmless here.)
warnings.filterwarnings("ignore", message="'dit_jax.sample' found in sys.modules", category=RuntimeWarning)
from dit_jax import sample as _sample_cli  # noqa: E402, F401
from dit_jax.pipeline import denoise, sample  # noqa: E402
from dit_jax.weights import Weights, load, save  # noqa: E402
from sdtm import SDTMConfig, ToMeConfig  # noqa: E402

__all__ = ["SDTMConfig", "ToMeConfig", "Weights", "denoise", "load", "sample", "save"]
