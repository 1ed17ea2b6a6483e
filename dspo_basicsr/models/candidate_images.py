"""Choosing images per LQ input from a (B, K, ...) stack: the candidates a step runs through the networks."""


def gather_images(images, index):
    """The chosen images of each LQ input.

    Args:
        images (Tensor): (B, K, ...) K images (or stored latents) per LQ input, e.g. candidates (B, K, 3, H, W).
        index (Tensor): (B, J) long indices into K.

    Returns:
        Tensor: (B, J, ...) ``images[b, index[b, j]]``.
    """
    b, _, *rest = images.shape
    return images.gather(1, index.view(b, -1, *[1] * len(rest)).expand(-1, -1, *rest))
