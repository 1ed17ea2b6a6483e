"""Data loaders of our train and test pipelines: BasicSR's, with the dataset's own ``collate_fn``."""

__all__ = ['build_dataloader']


def build_dataloader(dataset, dataset_opt, **kwargs):
    """``basicsr.data.build_dataloader``, batching with ``dataset.collate_fn`` when the dataset defines one.

    Preference sets pad instance tables and stack named fields (``PreferenceLMDBDataset.collate_fn``), which
    PyTorch's default collation cannot do; BasicSR 1.4.2's builder has no ``collate_fn`` argument.

    Args:
        dataset (torch.utils.data.Dataset): The dataset.
        dataset_opt (dict): Its options (``phase``, ``batch_size_per_gpu``, ``num_worker_per_gpu``, ...).
        **kwargs: ``num_gpu``, ``dist``, ``sampler``, ``seed``, as BasicSR's.

    Returns:
        torch.utils.data.DataLoader: BasicSR's loader (a ``PrefetchDataLoader`` with ``prefetch_mode: cpu``).
    """
    from basicsr.data import build_dataloader as basicsr_build_dataloader
    loader = basicsr_build_dataloader(dataset, dataset_opt, **kwargs)
    collate_fn = getattr(dataset, 'collate_fn', None)
    if collate_fn is not None:
        loader.collate_fn = collate_fn
    return loader
