"""The optimizer lookup of our models: ``optim_g.type`` names a ``torch.optim`` optimizer or ``AdamW8bit``."""

#: Optimizers outside ``torch.optim``: name -> (module, class). bitsandbytes is imported only when one is asked for.
EIGHT_BIT_OPTIMIZERS = {'AdamW8bit': ('bitsandbytes.optim', 'AdamW8bit')}


def torch_optimizer_names():
    """Names of the optimizer classes of ``torch.optim``."""
    import torch
    return sorted(n for n, c in vars(torch.optim).items()
                  if isinstance(c, type) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer)


def _eight_bit_optimizer_class(optim_type):
    """The bitsandbytes class of ``optim_type``, or a one-line error saying why it cannot run here."""
    import importlib
    module_name, class_name = EIGHT_BIT_OPTIMIZERS[optim_type]
    try:
        module = importlib.import_module(module_name)
    except Exception as err:  # ImportError, or a bitsandbytes build without a backend for this machine
        raise RuntimeError(f"optimizer type '{optim_type}' needs bitsandbytes, which cannot be used here "
                           f'({type(err).__name__}: {str(err).splitlines()[0] if str(err) else "no message"}); '
                           "install a bitsandbytes build for this machine or use optim_g.type: AdamW.") from err
    return getattr(module, class_name)


def build_optimizer(optim_type, params, lr, **kwargs):
    """The optimizer named ``optim_type`` over ``params``.

    ``AdamW8bit`` (bitsandbytes) keeps both Adam moments in 8 bits with block-wise scales: 2 bytes of
    optimizer state per trained parameter instead of AdamW's 8 (tensors under 4096 elements stay float32,
    bitsandbytes' ``min_8bit_size``). Its arguments are AdamW's (``betas``, ``eps``, ``weight_decay``).

    Args:
        optim_type (str): a ``torch.optim`` class name (``Adam``, ``AdamW``, ...) or ``AdamW8bit``.
        params: parameters or parameter groups.
        lr (float): learning rate.
        **kwargs: the optimizer's other arguments.

    Raises:
        ValueError: ``optim_type`` names no known optimizer; the message lists the known ones.
        RuntimeError: ``AdamW8bit`` was asked for and bitsandbytes cannot be imported on this machine.
    """
    import torch
    if optim_type in EIGHT_BIT_OPTIMIZERS:
        return _eight_bit_optimizer_class(optim_type)(params, lr, **kwargs)
    optimizer_class = getattr(torch.optim, optim_type, None)
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise ValueError(f"optimizer type '{optim_type}' is not a torch.optim optimizer; "
                         f'choose one of {torch_optimizer_names() + sorted(EIGHT_BIT_OPTIMIZERS)}.')
    return optimizer_class(params, lr, **kwargs)
