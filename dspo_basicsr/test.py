"""The test pipeline the ``basicsr test`` command runs (the shape of Real-ESRGAN's and BasicSR's ``test.py``).

It follows ``basicsr.test.test_pipeline`` (1.4.2) step by step, with the same ``results/<name>`` folder, log file
and log lines, and uses our parts where BasicSR's would not do:

* the options come read with the safe YAML loader and ``--force_yml`` applied (:mod:`dspo_basicsr.cli`), and
  are prepared by :func:`dspo_basicsr.utils.options.parse_options` (the seed set after the overrides);
* ``--launcher pytorch|slurm`` starts the process group with gloo when there is no CUDA
  (:func:`dspo_basicsr.utils.distributed.init_dist`);
* a dataset that defines ``collate_fn`` batches with it (:func:`dspo_basicsr.utils.dataloader.build_dataloader`);
* the model is built by :func:`dspo_basicsr.train.build_model`: a ``model_type`` that is not registered is
  named with the closest registered ones, and BasicSR's own models get DDP without CUDA ``device_ids``.
"""
import logging
from os import path as osp

import torch


def test_pipeline(root_path, opt, args):
    """Test as ``basicsr.test.test_pipeline`` does: each ``datasets`` entry, in name order, through ``validation``.

    Args:
        root_path (str): Where ``results/<name>`` is written.
        opt (dict): The option file's content with ``--force_yml`` applied.
        args (argparse.Namespace): ``launcher``, ``auto_resume``, ``debug``.

    Returns:
        int: 0.
    """
    from dspo_basicsr.train import build_model, close_process_group
    from dspo_basicsr.utils.dataloader import build_dataloader
    from dspo_basicsr.utils.options import parse_options

    from basicsr.data import build_dataset
    from basicsr.utils import get_env_info, get_root_logger, get_time_str, make_exp_dirs
    from basicsr.utils.options import dict2str

    opt = parse_options(root_path, opt, args, is_train=False)
    torch.backends.cudnn.benchmark = True

    make_exp_dirs(opt)
    log_file = osp.join(opt['path']['log'], f"test_{opt['name']}_{get_time_str()}.log")
    logger = get_root_logger(logger_name='basicsr', log_level=logging.INFO, log_file=log_file)
    logger.info(get_env_info())
    logger.info(dict2str(opt))

    test_loaders = []
    for _, dataset_opt in sorted(opt['datasets'].items()):
        test_set = build_dataset(dataset_opt)
        test_loader = build_dataloader(test_set, dataset_opt, num_gpu=opt['num_gpu'], dist=opt['dist'], sampler=None,
                                       seed=opt['manual_seed'])
        logger.info(f"Number of test images in {dataset_opt['name']}: {len(test_set)}")
        test_loaders.append(test_loader)

    model = build_model(opt)
    for test_loader in test_loaders:
        test_set_name = test_loader.dataset.opt['name']
        logger.info(f'Testing {test_set_name}...')
        model.validation(test_loader, current_iter=opt['name'], tb_logger=None, save_img=opt['val']['save_img'])
    close_process_group()
    return 0
