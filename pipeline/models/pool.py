"""CycleGAN's image history buffer (Shrivastava et al.; CycleGAN paper section 4).

D is updated with a mix of the current fakes and fakes from earlier generator versions, which
damps oscillation. Randomness comes from the global torch RNG (torch.rand / torch.randint) so
the engine's RNG checkpoint makes a resumed run draw the same swaps.
"""

from __future__ import annotations

import torch


class ImagePool:
    """Buffer of up to `size` past fakes. size 0 disables it (query returns its input)."""

    def __init__(self, size: int = 50):
        self.size = size
        self.images: list[torch.Tensor] = []          # each (C, H, W), detached

    def __len__(self) -> int:
        return len(self.images)

    @torch.no_grad()
    def query(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) fakes -> (B, C, H, W) fakes for D.

        While the pool fills, each image is stored and returned as is. Once full, each image has
        a 50% chance to be returned as is, else it replaces a random stored image and the stored
        one is returned instead.
        """
        if self.size <= 0:
            return images
        out = []
        for image in images.detach():
            if len(self.images) < self.size:
                self.images.append(image.clone())
                out.append(image)
            elif torch.rand(()).item() > 0.5:
                idx = int(torch.randint(0, self.size, ()).item())
                old = self.images[idx].to(image.device)
                self.images[idx] = image.clone()
                out.append(old)
            else:
                out.append(image)
        return torch.stack(out, 0)

    def state_dict(self) -> dict:
        """{'size': int, 'images': (N, C, H, W) CPU tensor} (N = 0: an empty (0,) tensor)."""
        images = torch.stack([im.cpu() for im in self.images]) if self.images else torch.zeros(0)
        return {"size": self.size, "images": images}

    def load_state_dict(self, state: dict) -> None:
        self.size = int(state.get("size", self.size))
        images = state["images"]
        self.images = [im.clone() for im in images.unbind(0)] if images.numel() else []
