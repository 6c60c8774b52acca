"""Test helpers for the text-to-image family: a T5-like tokenizer trained in the test, and a tiny
diffusers PixArt pipeline (tokenizer, T5 encoder, transformer, VAE, DPM-Solver++) with every
parameter random, saved in the diffusers layout."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import sentencepiece
import torch
import transformers

SENTENCES = [
    "A photo of a cat sitting on a red sofa.",
    "An astronaut riding a horse on the moon, digital art.",
    "Two dogs play in the snow near a wooden cabin.",
    "A bowl of ramen with eggs and green onions, studio lighting.",
    "Portrait of an old man with a beard, oil painting, 4k.",
    "The quick brown fox jumps over the lazy dog!",
    "City skyline at night, neon lights reflecting in the rain.",
]


def train_spiece(folder: Path, vocab_size: int = 70) -> Path:
    """A sentencepiece unigram model with T5's special ids (<pad> 0, </s> 1, <unk> 2, no BOS),
    written as folder/spiece.model."""
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(SENTENCES * 5), model_writer=model, vocab_size=vocab_size, model_type="unigram",
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, character_coverage=1.0, normalization_rule_name="nmt_nfkc",
        minloglevel=2,
    )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "spiece.model").write_bytes(model.getvalue())
    return folder


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Every parameter random (nothing left at an init's zeros or ones): norm scales around 1,
    matrices at 1/sqrt(fan-in), everything else around 0.3."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if "norm" in name and name.endswith("weight") and p.ndim == 1:
                p.copy_(1 + 0.2 * noise)
            elif p.ndim > 1 and "scale_shift_table" not in name and "embedding" not in name:
                p.copy_(noise / np.sqrt(p.shape[1] * int(np.prod(p.shape[2:]))))
            else:
                p.copy_(0.3 * noise)


def tiny_pixart_pipeline(folder: Path, *, micro_conditions: bool = False, seed: int = 0):
    """A diffusers PixArtAlphaPipeline with tiny random components, saved to `folder` (the layout
    `convert.pixart --pipeline` reads). Returns the pipeline object (float32, CPU).

    Without micro-conditions: 16x16 latents, patch 2 (64 tokens). With them: diffusers passes
    resolution and aspect ratio only to models with sample_size 128, so 128x128 latents with
    patch 8 (256 tokens) keep it small.
    """
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    tokenizer_dir = train_spiece(folder.parent / f"{folder.name}-spm")
    tokenizer = transformers.T5Tokenizer.from_pretrained(str(tokenizer_dir))
    torch.manual_seed(seed)
    text_encoder = transformers.T5EncoderModel(transformers.T5Config(
        vocab_size=len(tokenizer), d_model=24, d_kv=8, num_heads=3, d_ff=40, num_layers=2,
        feed_forward_proj="gated-gelu", relative_attention_num_buckets=8, relative_attention_max_distance=16,
    )).eval()
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=24, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=48, caption_channels=24, sample_size=128 if micro_conditions else 16,
        patch_size=8 if micro_conditions else 2, norm_type="ada_norm_single",
        use_additional_conditions=micro_conditions, interpolation_scale=1.0,
    ).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8), layers_per_block=1,
        norm_num_groups=4, down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    ).eval()
    for i, model in enumerate((text_encoder, transformer, vae)):
        randomise(model, seed + i)
    pipe = PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),  # its defaults: what PixArt's checkpoints ship
    )
    pipe.save_pretrained(str(folder))
    return pipe
