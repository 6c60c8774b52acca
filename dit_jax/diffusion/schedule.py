"""Noise schedules and timestep grids, computed once on the host in NumPy float64.

Two conventions live side by side:

- IDDPM / DiT respacing: keep a subset of the training timesteps (`space_timesteps`) and rebuild
  betas from consecutive ratios of alphas_cumprod (`respace_betas`). The model is still fed the
  original 0..N-1 timesteps through `timestep_map`.
- diffusers' `set_timesteps` grids (`diffusers_timesteps`): "leading", "trailing", "linspace".

Everything here returns NumPy arrays; the samplers turn them into small constant tables.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

DIFFUSERS_SPACINGS = ("leading", "trailing", "linspace")
# Which diffusers scheduler's `set_timesteps` a grid imitates: DDPM and DDIM share one recipe,
# DPMSolverMultistep builds its grid from steps + 1 points and drops the last.
_GRID_FAMILIES = ("ddpm", "ddim", "dpm++")


def _check_train_timesteps(num_train_timesteps: int) -> None:
    if not isinstance(num_train_timesteps, (int, np.integer)) or num_train_timesteps < 1:
        raise ValueError(
            f"num_train_timesteps must be a positive int, got {num_train_timesteps!r}."
        )


def linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02
) -> np.ndarray:
    """DiT's / IDDPM's linear beta schedule: `num_train_timesteps` betas evenly spaced.

    IDDPM rescales beta_start/beta_end by 1000 / num_train_timesteps when it builds this schedule
    for other lengths; we take the endpoints literally (as diffusers does), which is identical at
    the 1000 steps every DiT checkpoint uses.

    Returns:
        (num_train_timesteps,) float64 betas.
    """
    _check_train_timesteps(num_train_timesteps)
    return np.linspace(beta_start, beta_end, num_train_timesteps, dtype=np.float64)


def scaled_linear_betas(
    num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012
) -> np.ndarray:
    """Stable Diffusion / PixArt's "scaled_linear" schedule: linear in sqrt(beta), then squared.

    Returns:
        (num_train_timesteps,) float64 betas.
    """
    _check_train_timesteps(num_train_timesteps)
    sqrt_betas = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=np.float64)
    return sqrt_betas**2


def alphas_cumprod_from_betas(betas: np.ndarray) -> np.ndarray:
    """Cumulative product of (1 - beta): the signal fraction alpha_bar_t at every training step.

    Raises:
        ValueError: if betas is not a non-empty 1-D array with values in (0, 1).
    """
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0:
        raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}.")
    if not np.all((betas > 0) & (betas < 1)):
        raise ValueError("betas must lie strictly between 0 and 1 (check the schedule endpoints).")
    return np.cumprod(1.0 - betas)


def _strided_section(start: int, size: int, count: int) -> list[int]:
    """`count` timesteps spread evenly over [start, start + size - 1], both ends included."""
    if count <= 1:
        return [start] if count == 1 else []
    stride = (size - 1) / (count - 1)
    picked = []
    position = 0.0
    for _ in range(count):
        # Accumulating the float stride (instead of multiplying) and Python's round-half-even keep
        # the picks bit-identical to IDDPM's, which DiT checkpoints were evaluated with.
        picked.append(start + round(position))
        position += stride
    return picked


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> np.ndarray:
    """IDDPM / DiT respacing: which of the original timesteps a shorter sampler keeps.

    Args:
        num_timesteps: length of the training chain (1000 for DiT).
        section_counts: "250" (one section), "10,15,20" (the chain cut into equal sections, each
            strided to its own count), "ddim50" (a single integer stride giving exactly 50 steps,
            IDDPM's DDIM convention), or a list of ints (like the comma form).

    Returns:
        The kept timesteps, sorted ascending, int64.

    Raises:
        ValueError: a malformed spec, a section asked for more steps than it holds, or a "ddimN"
            count that no integer stride produces.
    """
    _check_train_timesteps(num_timesteps)
    if isinstance(section_counts, str):
        spec = section_counts.strip()
        if spec.startswith("ddim"):
            try:
                wanted = int(spec[len("ddim"):])
            except ValueError:
                raise ValueError(
                    f"section_counts {section_counts!r}: expected 'ddim<N>' with an integer N."
                ) from None
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == wanted:
                    return np.arange(0, num_timesteps, stride, dtype=np.int64)
            possible = sorted({len(range(0, num_timesteps, stride)) for stride in range(1, num_timesteps)})
            nearest = [n for n in possible if n < wanted][-1:] + [n for n in possible if n > wanted][:1]
            which = f"counts that can are {nearest[0]} and {nearest[1]}" if len(nearest) == 2 else \
                f"count that can is {nearest[0]}"
            raise ValueError(
                f"cannot keep exactly {wanted} of {num_timesteps} timesteps with an integer stride "
                f"({section_counts!r}); the nearest step {which}."
            )
        try:
            counts = [int(part) for part in spec.split(",")]
        except ValueError:
            raise ValueError(
                f"section_counts {section_counts!r}: expected '250', '10,15,20', 'ddim50' or a list "
                "of ints."
            ) from None
    else:
        counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"section_counts {section_counts!r}: every section needs at least 1 step.")
    if len(counts) > num_timesteps:
        raise ValueError(
            f"section_counts {section_counts!r}: {len(counts)} sections for {num_timesteps} timesteps."
        )

    base_size, extra = divmod(num_timesteps, len(counts))
    kept: list[int] = []
    start = 0
    for index, count in enumerate(counts):
        # The first `extra` sections absorb the remainder, one timestep each.
        size = base_size + (1 if index < extra else 0)
        if count > size:
            raise ValueError(
                f"section {index} of {section_counts!r} holds {size} timesteps but asks for {count}."
            )
        kept.extend(_strided_section(start, size, count))
        start += size
    return np.array(sorted(set(kept)), dtype=np.int64)


def respace_betas(betas: np.ndarray, kept_timesteps: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Betas of the shorter chain through `kept_timesteps`, the way IDDPM's SpacedDiffusion does.

    The respaced chain must have the same alphas_cumprod at every kept step, so each new beta is
    1 - alpha_bar[t_k] / alpha_bar[t_{k-1}] (with alpha_bar before the first kept step = 1).

    Args:
        betas: (N,) the training schedule.
        kept_timesteps: the timesteps to keep (any order, unique, each in [0, N)).

    Returns:
        (new_betas, timestep_map): both (K,), ascending; timestep_map[k] is the original timestep
        the model must be fed at respaced step k.
    """
    alphas_cumprod = alphas_cumprod_from_betas(betas)
    kept = np.asarray(kept_timesteps, dtype=np.int64).reshape(-1)
    if kept.size == 0:
        raise ValueError("kept_timesteps is empty: keep at least one timestep.")
    timestep_map = np.unique(kept)
    if timestep_map.size != kept.size:
        raise ValueError("kept_timesteps has duplicates; each timestep can be kept once.")
    if timestep_map[0] < 0 or timestep_map[-1] >= alphas_cumprod.size:
        raise ValueError(
            f"kept_timesteps must lie in [0, {alphas_cumprod.size}), got "
            f"[{timestep_map[0]}, {timestep_map[-1]}]."
        )
    kept_alphas_cumprod = alphas_cumprod[timestep_map]
    previous = np.concatenate([[1.0], kept_alphas_cumprod[:-1]])
    new_betas = 1.0 - kept_alphas_cumprod / previous
    return new_betas, timestep_map


def diffusers_timesteps(
    num_train_timesteps: int,
    steps: int,
    spacing: str = "leading",
    steps_offset: int = 0,
    *,
    sampler: str = "ddim",
) -> np.ndarray:
    """The timestep grid diffusers' `set_timesteps(steps)` builds, descending as diffusers returns it.

    Args:
        num_train_timesteps: length of the training chain.
        steps: number of sampling steps.
        spacing: "leading", "trailing" or "linspace" (Table 2 of arXiv:2305.08891).
        steps_offset: added to the "leading" grid only (as diffusers does).
        sampler: whose recipe: "ddpm"/"ddim" (DDPMScheduler, DDIMScheduler) or "dpm++"
            (DPMSolverMultistepScheduler, which spaces steps + 1 points and drops the last one
            for "leading" and "linspace").

    Returns:
        (steps,) int64 timesteps, descending.
    """
    _check_train_timesteps(num_train_timesteps)
    if spacing not in DIFFUSERS_SPACINGS:
        raise ValueError(
            f"unknown timestep spacing {spacing!r}; choose one of {', '.join(DIFFUSERS_SPACINGS)}."
        )
    if sampler not in _GRID_FAMILIES:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(_GRID_FAMILIES)}.")
    if not isinstance(steps, (int, np.integer)) or not 1 <= steps <= num_train_timesteps:
        raise ValueError(
            f"steps must be an int in [1, {num_train_timesteps}] (num_train_timesteps), got {steps!r}."
        )
    n = num_train_timesteps
    # DPMSolverMultistep lays out one point more than it uses (the dropped one would be t = 0).
    points = steps + 1 if sampler == "dpm++" else steps
    if spacing == "linspace":
        grid = np.linspace(0, n - 1, points).round()[::-1][:steps]
    elif spacing == "leading":
        stride = n // points
        grid = (np.arange(points) * stride).round()[::-1][:steps] + steps_offset
    else:  # trailing: count down from the end of the chain by a float stride.
        grid = np.round(np.arange(n, 0, -n / steps)) - 1
    return np.ascontiguousarray(grid).astype(np.int64)
