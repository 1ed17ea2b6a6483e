"""Each rank's share of a validation set: samples r, r + W, ... as batches of one, in sample order."""
from tqdm import tqdm

from basicsr.utils.dist_util import get_dist_info


def validation_share(dataloader, desc, show_progress=False):
    """Yield (sample index, collated batch of that one sample) for this rank's share of ``dataloader.dataset``.

    The results are put back in sample order on rank 0 with ``gather_in_sample_order``, so a validation gives
    the numbers of one process on any number of ranks.

    Args:
        dataloader: BasicSR's validation loader (its dataset and ``collate_fn`` are used; not its sampler).
        desc (str): Progress bar label.
        show_progress (bool): Show a progress bar (on rank 0 only).
    """
    rank, world = get_dist_info()
    dataset = dataloader.dataset
    for i in tqdm(range(rank, len(dataset), world), desc=desc, leave=False, disable=not (show_progress and rank == 0)):
        yield i, dataloader.collate_fn([dataset[i]])
