"""Which training state a run resumes from: ``path.resume_state``, or with ``--auto_resume`` the newest usable one.

A state is usable when its own file and the network files of its iteration load (``weights_only=True``);
newer ones that do not are skipped and named in one line. An experiment whose states all fail is an error
(:class:`ResumeStateError`), never a silent restart from iteration 0.
"""
import os

__all__ = ['ResumeStateError', 'newest_usable_state', 'load_resume_state']


class ResumeStateError(RuntimeError):
    """No training state of an experiment can be resumed from; the message names every file and why."""


def _network_files(opt, resume_iter):
    """The network files ``check_resume`` will load for a state of iteration ``resume_iter``."""
    ignored = opt['path'].get('ignore_resume_networks') or []
    return [os.path.join(opt['path']['models'], f"net_{key[len('network_'):]}_{resume_iter}.pth")
            for key in opt if key.startswith('network_') and key not in ignored]


def _why_unloadable(path):
    import torch
    if not os.path.isfile(path):
        return 'missing'
    if os.path.getsize(path) == 0:
        return 'empty'
    try:
        torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # a truncated zip, a bare EOFError, a refused pickle: all mean "cannot resume"
        return f'unreadable ({type(err).__name__}: {str(err).splitlines()[0][:80] if str(err) else "truncated"})'
    return None


def newest_usable_state(opt, state_dir):
    """The newest ``<iter>.state`` in ``state_dir`` whose file and network files load.

    Returns:
        tuple[str | None, list[str]]: The state path (None when the folder has no states), and one
        ``'file: why'`` entry for each newer file skipped.

    Raises:
        ResumeStateError: There are states, but none can be resumed from.
    """
    import torch
    names = [n for n in os.listdir(state_dir) if n.endswith('.state')] if os.path.isdir(state_dir) else []
    iters = sorted((int(float(n[:-len('.state')])) for n in names if n[:-len('.state')].isdigit()), reverse=True)
    skipped = []
    for it in iters:
        path = os.path.join(state_dir, f'{it}.state')
        why = _why_unloadable(path)
        if why is None:
            state = torch.load(path, map_location='cpu', weights_only=True)
            if not isinstance(state, dict) or 'iter' not in state:
                why = 'not a training state'
        if why is not None:
            skipped.append(f'{os.path.basename(path)}: {why}')
            continue
        bad = [(f, _why_unloadable(f)) for f in _network_files(opt, it)]
        bad = [f'{os.path.basename(f)}: {w}' for f, w in bad if w is not None]
        if bad:
            skipped.extend(bad)
            continue
        return path, skipped
    if iters:
        raise ResumeStateError(
            f"--auto_resume: no training state in {state_dir} can be resumed from ({'; '.join(skipped[:6])}"
            f"{f'; and {len(skipped) - 6} more' if len(skipped) > 6 else ''}). Move the folder away to start "
            'afresh, or set path.resume_state to a state you trust.')
    return None, skipped


def load_resume_state(opt):
    """``basicsr.train.load_resume_state``, device-aware and weights-only, with a fallback (our train pipeline's).

    With ``--auto_resume`` the newest state that loads, together with its network files, is taken; newer
    ones that do not are named in one printed line.

    Returns:
        dict | None: The state, loaded onto this process's device; None when there is none to resume from.

    Raises:
        ResumeStateError: ``path.resume_state`` does not load, or no state of the experiment does.
    """
    import torch

    from dspo_basicsr.utils.distributed import training_device

    from basicsr.utils import check_resume

    resume_state_path = None
    if opt['auto_resume']:
        state_dir = os.path.join('experiments', opt['name'], 'training_states')
        resume_state_path, skipped = newest_usable_state(opt, state_dir)
        if resume_state_path is not None:
            opt['path']['resume_state'] = resume_state_path
            if skipped and opt.get('rank', 0) == 0:
                print(f'auto_resume: skipped {", ".join(skipped)}; resuming from {resume_state_path}.', flush=True)
    elif opt['path'].get('resume_state'):
        resume_state_path = opt['path']['resume_state']
        why = _why_unloadable(resume_state_path)
        if why is not None:
            raise ResumeStateError(f"path.resume_state '{resume_state_path}' is {why}; point it to a complete "
                                   'state, or use --auto_resume to take the newest one that loads.')

    if resume_state_path is None:
        return None
    resume_state = torch.load(resume_state_path, map_location=training_device(), weights_only=True)
    check_resume(opt, resume_state['iter'])
    return resume_state
