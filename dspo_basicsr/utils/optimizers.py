"""The optimizer lookup of our models: ``optim_g.type`` names a ``torch.optim`` optimizer."""


def torch_optimizer_names():
    """Names of the optimizer classes of ``torch.optim``."""
    import torch
    return sorted(n for n, c in vars(torch.optim).items()
                  if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)


def build_optimizer(optim_type, params, lr, **kwargs):
    """The optimizer named ``optim_type`` over ``params``.

    Args:
        optim_type (str): a ``torch.optim`` class name (``Adam``, ``AdamW``, ...).
        params: parameters or parameter groups.
        lr (float): learning rate.
        **kwargs: the optimizer's other arguments.

    Raises:
        ValueError: ``optim_type`` names no known optimizer; the message lists the known ones.
    """
    import torch
    optimizer_class = getattr(torch.optim, optim_type, None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"optimizer type '{optim_type}' is not a torch.optim optimizer; "
                         f'choose one of {torch_optimizer_names()}.')
    return optimizer_class(params, lr, **kwargs)
