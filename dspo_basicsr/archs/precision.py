"""Frozen networks in bf16 / fp16 while the trained parts stay float32 (SeeSR, AddSR and OSEDiff use it).

Not an arch file: nothing here is registered.
"""
import contextlib

import torch

__all__ = ['MIXED_PRECISION', 'LowPrecisionFrozenPartsMixin']

MIXED_PRECISION = {None: None, 'no': None, 'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class LowPrecisionFrozenPartsMixin:
    """Keep the frozen networks in bf16 / fp16 and run them (and the trained parts) under autocast.

    Trained parameters stay float32 (so do their gradients and optimiser state); inputs and outputs of
    every public method stay float32. This is what lets the real-size step fit one GPU (docs/frameworks.md).
    """

    compute_dtype = None

    def setup_mixed_precision(self, mixed_precision):
        """Call after ``setup_trainable``: cast every submodule not fine-tuned in full to the compute dtype."""
        if mixed_precision not in MIXED_PRECISION:
            raise ValueError(f"mixed_precision must be one of {sorted(k for k in MIXED_PRECISION if k)} or null, "
                             f'got {mixed_precision!r}.')
        self.compute_dtype = MIXED_PRECISION[mixed_precision]
        if self.compute_dtype is None:
            return
        for name, module in self.named_children():
            if name not in self.full_trainable_modules:
                module.to(self.compute_dtype)
        for param in self.parameters():
            if param.requires_grad:  # LoRA inside a cast network: back to float32
                param.data = param.data.float()

    def autocast(self):
        """Autocast to the compute dtype on this framework's device (a no-op context without one, and on
        ``meta``, which torch cannot autocast: the GPU planner emulates it, ``bench/gpu_plan.py``)."""
        if self.compute_dtype is None or self.device.type == 'meta':
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @torch.no_grad()
    def encode_posterior(self, images):
        with self.autocast():
            mean, std = super().encode_posterior(images)
        return mean.float(), std.float()

    @torch.no_grad()
    def decode_latents(self, latents):
        with self.autocast():
            return super().decode_latents(latents).float()

    @torch.no_grad()
    def encode_prompts(self, prompts):
        with self.autocast():
            return super().encode_prompts(prompts).float()
