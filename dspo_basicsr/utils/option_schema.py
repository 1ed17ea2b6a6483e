"""Option schemas: each model's and dataset's options declared once (key, type, range, default, one line of doc).

One declaration gives three things, so they cannot drift apart:

* the check at start (:func:`dspo_basicsr.option_check.check_options`): unknown keys, missing sections,
  types, ranges and choices, one line per finding naming the key, the value and what is allowed;
* the defaults the code reads (:meth:`OptionSchema.value`, :meth:`OptionSchema.section`);
* the option tables of ``docs/options.md`` (``scripts/option_tables.py`` rewrites them).

A model declares ``option_schema = BASICSR_MODEL_OPTIONS.extend(Option(...), ...)`` (keys dotted from the top
of the option file); a dataset declares ``option_schema = LOADER_OPTIONS.extend(...)`` (keys of its block
under ``datasets.<phase>``). Adding a key is one :class:`Option` line (see ``docs/extending.md``).
"""
import copy
import json
import math
import os
from dataclasses import dataclass

__all__ = ['REQUIRED', 'Option', 'OptionSchema', 'OptionValueError', 'BASICSR_MODEL_OPTIONS', 'LOADER_OPTIONS',
           'RENAMED_OPTIONS', 'renamed_option_findings', 'num_train_timesteps', 'timestep_range_in_schedule',
           'timesteps_in_schedule', 'multiple_of_scale']


class _Required:
    def __repr__(self):
        return 'required'


#: the default of an option the file must set
REQUIRED = _Required()

#: what each kind accepts, as said in an error
_KIND_WORDS = {'int': 'an integer', 'whole': 'a whole number (5000 or !!float 5e3)', 'number': 'a finite number',
               'bool': 'true or false', 'str': 'a string',
               'list': 'a list', 'dict': 'a mapping', 'path': 'a path', 'any': 'any value'}


class OptionValueError(ValueError):
    """A value the schema refuses (raised by :meth:`OptionSchema.value` when the code reads it)."""


@dataclass(frozen=True)
class Option:
    """One option: where it sits, what it may hold, what it defaults to, what it does.

    Args:
        key (str): Dotted place, from the top of the option file (models) or of the dataset block (datasets).
        kind (str): ``int``, ``whole`` (an int, or a float of integer value: BasicSR's iteration counts are
            often written ``!!float 5e3``), ``number`` (finite int or float), ``bool``, ``str``, ``list``,
            ``dict``, ``path`` (a string naming a file or folder that must exist) or ``any``.
        default: Its value when absent; :data:`REQUIRED` when the file must set it. ``~`` (None) is accepted
            only where the default is None or ``nullable`` is set.
        doc (str): One line for the docs table.
        ge, gt, le (float | None): Bounds of a number (``gt``: strictly above).
        choices (tuple | None): The values allowed (of kind ``str``, or of the items of a ``list``).
        also (tuple): Values accepted besides those of ``kind`` (``num_gpu: auto``).
        nullable (bool): Accept ``~`` although the default is not None.
        required_in (str | None): ``train``: required only when training (models) / in a ``train`` phase
            (datasets), and only when its parent section is present.
        typed (str | None): A ``{type: X, ...}`` block whose other keys are the arguments of the registered
            class X (``arch``, ``loss``, ``optimizer``): its keys are checked against that class, not here
            (options declared under it only add checks of their values).
        check (callable | None): ``check(value, opt, block) -> str | None``: a further condition (``opt`` the
            whole option dict, ``block`` the dataset block or None); returns what is allowed when refused.
        read_by (str | None): Who reads it when not the declaring class (``BasicSR``, a loss): for the docs
            and the test that every key is read.
    """

    key: str
    kind: str
    default: object = None
    doc: str = ''
    ge: float = None
    gt: float = None
    le: float = None
    choices: tuple = None
    also: tuple = ()
    nullable: bool = False
    required_in: str = None
    typed: str = None
    check: object = None
    read_by: str = None

    @property
    def required(self):
        return self.default is REQUIRED

    @property
    def parent(self):
        return self.key.rpartition('.')[0]

    @property
    def name(self):
        return self.key.rpartition('.')[2]

    def allowed(self):
        """What the option may hold, in words (for errors and the docs)."""
        words = _KIND_WORDS[self.kind]
        if self.kind in ('int', 'whole', 'number'):
            ge, gt = self.ge, self.gt
            article, noun = words.split(' ', 1)
            if gt == 0 or (ge == 1 and self.kind != 'number'):
                words, ge, gt = f'a positive {noun}', None, None
            elif ge == 0:
                words, ge = f'a non-negative {noun}', None
            bounds = [f'>= {ge:g}' if ge is not None else '', f'> {gt:g}' if gt is not None else '',
                      f'<= {self.le:g}' if self.le is not None else '']
            bounds = ' and '.join(b for b in bounds if b)
            words = f'{words} {bounds}' if bounds else words
        if self.choices is not None:
            listed = ', '.join(_yaml(c) if isinstance(c, bool) else str(c) for c in self.choices)
            words = f'a list of {listed}' if self.kind == 'list' else f'one of {listed}'
        extra = [_yaml(a) for a in self.also] + (['~'] if self.default is None or self.nullable else [])
        return words + (f' (or {", ".join(extra)})' if extra else '')

    def finding(self, value, opt=None, block=None):
        """None when ``value`` is allowed, else what is allowed (the check's own words for a further check)."""
        if value is None:
            return None if self.default is None or self.nullable else self.allowed()
        if any(value == a and type(value) is type(a) for a in self.also):
            return None
        if not _of_kind(value, self.kind):
            return self.allowed()
        if self.kind in ('int', 'whole', 'number') and not ((self.ge is None or value >= self.ge) and
                                                   (self.gt is None or value > self.gt) and
                                                   (self.le is None or value <= self.le)):
            return self.allowed()
        if self.choices is not None:
            items = value if self.kind == 'list' else [value]
            if any(item not in self.choices for item in items):
                return self.allowed()
        if self.check is not None:
            return self.check(value, opt or {}, block)
        return None


def _yaml(value):
    return json.dumps(value) if isinstance(value, bool) else repr(value)


def _of_kind(value, kind):
    if kind == 'int':
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == 'whole':
        return _of_kind(value, 'number') and float(value).is_integer()
    if kind == 'number':
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if kind == 'bool':
        return isinstance(value, bool)
    if kind in ('str', 'path'):
        return isinstance(value, str)
    if kind == 'list':
        return isinstance(value, (list, tuple))
    if kind == 'dict':
        return isinstance(value, dict)
    return True


def _lookup(opt, dotted):
    """(present, value) of a dotted key in nested dicts."""
    node = opt
    for part in dotted.split('.'):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _hint(value):
    if isinstance(value, str) and value[:1] in tuple('0123456789.'):
        return ' (YAML reads 1e-4 as a string: write 1.0e-4 or !!float 1e-4)'
    return ''


class OptionSchema:
    """The options of one model or dataset, by dotted key.

    Args:
        *options (Option): The declarations; a later one replaces an earlier one of the same key.
    """

    def __init__(self, *options):
        self.options = {}
        for option in options:
            self.options[option.key] = option

    def extend(self, *options, drop=()):
        """A new schema: these options added (or replacing those of the same key), the keys of ``drop`` removed."""
        kept = [o for k, o in self.options.items() if k not in drop and not any(k.startswith(d + '.') for d in drop)]
        return OptionSchema(*kept, *options)

    def __contains__(self, dotted):
        return dotted in self.options

    def __getitem__(self, dotted):
        return self.options[dotted]

    def __iter__(self):
        return iter(self.options.values())

    def children(self, section):
        """The options directly under ``section`` ('' for the top level)."""
        return {o.name: o for o in self.options.values() if o.parent == section}

    def closed(self, section):
        """Whether the keys of ``section`` are all declared (an undeclared one is unknown)."""
        if section == '':
            return True
        option = self.options.get(section)
        return option is not None and option.kind == 'dict' and option.typed is None and bool(self.children(section))

    def default(self, dotted):
        """The declared default of ``dotted`` (None for a required option)."""
        default = self.options[dotted].default
        return None if default is REQUIRED else default

    def value(self, opt, dotted, block=None):
        """The value the code uses: the one in ``opt`` when present, else the declared default.

        Raises:
            OptionValueError: The value is not allowed (one line naming key, value and what is allowed).
        """
        option = self.options[dotted]
        present, value = _lookup(opt, dotted)
        if not present:
            return copy.deepcopy(self.default(dotted))
        finding = option.finding(value, opt, block)
        if finding is not None:
            raise OptionValueError(f'{dotted} must be {finding}, got {value!r}{_hint(value)}')
        return value

    def section(self, opt, dotted):
        """The options directly under ``dotted``, the declared defaults filled in (e.g. ``train.dro``).

        Raises:
            OptionValueError: An unknown key or a value not allowed.
        """
        present, given = _lookup(opt, dotted)
        given = given if present and isinstance(given, dict) else {}
        children = self.children(dotted)
        unknown = sorted(set(given) - set(children))
        if unknown:
            raise OptionValueError(f"unknown option '{dotted}.{unknown[0]}'; {dotted} takes {', '.join(children)}")
        return {name: self.value(opt, f'{dotted}.{name}') for name in children}

    def findings(self, opt, training=True, where='', top=None):
        """Everything wrong with ``opt`` by this schema.

        Args:
            opt (dict): The options (the whole file for a model, the dataset block for a dataset).
            training (bool): Options with ``required_in='train'`` are required.
            where (str): Prefix of the keys in the messages (``datasets.train``).
            top (dict | None): The whole option dict when ``opt`` is a dataset block (for further checks).

        Returns:
            tuple[list[str], list[tuple[str, str, set]]]: The errors (missing, wrong values) and the unknown keys
            as (section, key, the known keys of that section), for the caller to report (errors for our
            classes, warnings for BasicSR's).
        """
        errors, unknown = [], []
        prefix = f'{where}.' if where else ''
        for option in self.options.values():
            parent_present, parent = _lookup(opt, option.parent) if option.parent else (True, opt)
            if not parent_present or not isinstance(parent, dict):
                continue
            if option.name not in parent:
                if option.required and (option.required_in is None or training):
                    what = 'section' if option.kind == 'dict' else 'option'
                    errors.append(f"missing {what} '{prefix}{option.key}': {option.doc or option.allowed()}")
                continue
            value = parent[option.name]
            finding = option.finding(value, opt, None) if top is None else option.finding(value, top, opt)
            if finding is not None:
                errors.append(f'{prefix}{option.key} must be {finding}, got {value!r}{_hint(value)}')
        sections = [''] + [k for k in self.options if self.closed(k)]
        for section in sections:
            present, node = _lookup(opt, section) if section else (True, opt)
            if not present or not isinstance(node, dict):
                continue
            known = set(self.children(section))
            unknown.extend((f'{prefix}{section}'.rstrip('.'), key, known) for key in node if key not in known)
        return errors, unknown

    def table(self, beyond=None):
        """Markdown table ``| key | type | default | allowed | what it does |`` of the options not in ``beyond``."""
        rows = ['| key | type | default | allowed | what it does |', '| --- | --- | --- | --- | --- |']
        for option in self.options.values():
            if beyond is not None and beyond.options.get(option.key) == option:
                continue
            default = 'required' if option.required else ('~' if option.default is None else
                                                          json.dumps(option.default))
            if option.required and option.required_in:
                default = f'required in {option.required_in}'
            doc = option.doc + (f' (read by {option.read_by})' if option.read_by else '')
            cells = [f'`{option.key}`', option.kind, f'`{default}`', option.allowed(), doc]
            rows.append('| ' + ' | '.join(c.replace('|', '\\|') for c in cells) + ' |')
        return '\n'.join(rows)


#: Keys renamed so that each concept has one name (docs/frameworks.md, "One vocabulary"): where sampling starts is
#: ``start_point`` + ``start_timestep`` (AddSR: ``timesteps``), guidance is ``guidance_scale``. Old key -> what to
#: write instead; ``network_*`` is any network block, ``<type>`` its type. The framework archs load released files
#: only: tiny random builds are the demo's ``Tiny*Arch`` types. An old key is refused at start with one line naming
#: the new.
RENAMED_OPTIONS = {
    'network_*.tiny': 'network_*.type: Tiny<type> (the demo\'s tiny frameworks, dspo_basicsr/demo/tiny_arch.py; '
                      'tiny: {seed, unet, vae, ram} is seed, unet_config, vae_config, random_ram there)',
    'network_*.ram_tiny': 'network_*.type: Tiny<type> (it reads ram_path as a tiny RAM checkpoint)',
    'network_*.start_strength': 'network_*.start_point: lr with network_*.start_timestep (strength s of N sampler '
                                'steps starts at the round(s N)-th last timestep: 0.375 of 8 DDIM steps is 250)',
    'network_*.default_cfg': 'network_*.default_guidance_scale',
    'network_*.sampling_timesteps': 'network_*.timesteps',
    'network_*.timestep_mode': 'network_*.likelihood_point',
    'val.sample.cfg': 'val.sample.guidance_scale',
    'train.dro.cfg': 'train.dro.guidance_scale',
}


def renamed_option_findings(opt, networks=None):
    """One line per renamed key (:data:`RENAMED_OPTIONS`) that ``opt`` still uses: ``<old> was renamed to <new>``.

    Args:
        opt (dict): The options, from the top of the file.
        networks (dict[str, dict] | None): The network blocks by their dotted place; default: the top-level
            ``network_*`` blocks of ``opt``.
    """
    if networks is None:
        networks = {k: v for k, v in opt.items() if k.startswith('network_') and isinstance(v, dict)}
    lines = []
    for old, new in RENAMED_OPTIONS.items():
        if old.startswith('network_*.'):
            name = old.partition('.')[2]
            lines += [f"{place}.{name} was renamed to "
                      f"{new.replace('network_*', place).replace('<type>', str(block.get('type', 'Arch')))}"
                      for place, block in networks.items() if isinstance(block, dict) and name in block]
        elif _lookup(opt, old)[0]:
            lines.append(f'{old} was renamed to {new}')
    return lines


def num_train_timesteps(opt):
    """Training timesteps of ``network_g``'s noise schedule: its ``scheduler/scheduler_config.json``, else 1000.

    Every released SD2-based framework (SeeSR, AddSR, OSEDiff, SD2 + ControlNet) and the tiny builds use 1000.
    """
    network = opt.get('network_g') if isinstance(opt, dict) else None
    root = network.get('pretrained_model_path') if isinstance(network, dict) else None
    if isinstance(root, str):
        path = os.path.join(root, 'scheduler', 'scheduler_config.json')
        try:
            with open(path, encoding='utf-8') as f:
                return int(json.load(f).get('num_train_timesteps', 1000))
        except (OSError, ValueError, TypeError, AttributeError):
            pass
    return 1000


def timestep_range_in_schedule(value, opt, block):
    """Check of ``train.timestep_range``: [low, high) inside network_g's noise schedule."""
    total = num_train_timesteps(opt)
    if (len(value) == 2 and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            and 0 <= value[0] < value[1] <= total):
        return None
    return f'a list [low, high) of two integer timesteps with 0 <= low < high <= {total} (the noise schedule)'


def timesteps_in_schedule(value, opt, block):
    """Check of a list of timesteps: each inside network_g's noise schedule."""
    total = num_train_timesteps(opt)
    if value and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < total for t in value):
        return None
    return f'a non-empty list of integer timesteps in [0, {total})'


def multiple_of_scale(value, opt, block):
    """Check of a crop size: a multiple of the dataset's (else the top-level) scale."""
    scale = (block or {}).get('scale') or opt.get('scale') or 1
    if isinstance(scale, int) and value % scale:
        return f'a positive multiple of scale {scale} (the LQ crop must align with the SR crop)'
    return None


#: BasicSR's own keys that its pipeline (basicsr/train.py, basicsr/test.py, basicsr/utils/options.py,
#: BaseModel, SRModel) reads, and so every model's schema starts from
BASICSR_MODEL_OPTIONS = OptionSchema(
    Option('name', 'str', REQUIRED, 'experiment name: experiments/<name> or results/<name>', read_by='BasicSR'),
    Option('model_type', 'str', REQUIRED, 'the registered model class', read_by='BasicSR'),
    Option('scale', 'int', None, 'SR scale; copied into every dataset block', ge=1, read_by='BasicSR'),
    Option('num_gpu', 'int', 'auto', 'GPUs; auto = every visible one, 0 = CPU', ge=0, also=('auto',),
           read_by='BasicSR'),
    Option('manual_seed', 'int', None, 'random seed (~: a random one)', read_by='BasicSR'),
    Option('find_unused_parameters', 'bool', False, "DDP's find_unused_parameters", read_by='BasicSR'),
    Option('dist_params', 'dict', None, 'arguments of init_dist (backend, port)', read_by='BasicSR'),
    Option('datasets', 'dict', REQUIRED, 'the dataset blocks, by phase (train*, val*, test*); see the dataset tables',
           read_by='BasicSR'),
    Option('network_g', 'dict', REQUIRED, 'the network: a registered arch (type) and its arguments', typed='arch'),
    Option('path', 'dict', {}, 'checkpoint paths', read_by='BasicSR'),
    Option('path.pretrain_network_g', 'path', None, 'weights to start from', read_by='BasicSR'),
    Option('path.strict_load_g', 'bool', True, 'refuse missing or unexpected keys when loading them',
           read_by='BasicSR'),
    Option('path.param_key_g', 'str', 'params', 'the key of the weights in the checkpoint', read_by='BasicSR'),
    Option('path.resume_state', 'path', None, 'a .state to resume from (or --auto_resume)', read_by='BasicSR'),
    Option('train', 'dict', REQUIRED, 'training settings', required_in='train', read_by='BasicSR'),
    Option('train.optim_g', 'dict', REQUIRED, 'the optimizer: type (Adam, AdamW, ...) and its arguments',
           typed='optimizer', read_by='BasicSR'),
    Option('train.optim_g.lr', 'number', REQUIRED, 'learning rate', gt=0, read_by='the optimizer'),
    Option('train.scheduler', 'dict', None, 'learning-rate schedule: type (MultiStepLR, CosineAnnealingRestartLR) '
           'and its arguments', read_by='BasicSR'),
    Option('train.total_iter', 'whole', REQUIRED, 'iterations to train', ge=1, read_by='BasicSR'),
    Option('train.warmup_iter', 'whole', -1, 'linear warm-up iterations (-1: none)', ge=-1, read_by='BasicSR'),
    Option('train.ema_decay', 'number', 0, 'EMA of the weights (0: none)', ge=0, le=1, read_by='BasicSR'),
    Option('val', 'dict', None, 'validation settings (~: no validation)', read_by='BasicSR'),
    Option('val.val_freq', 'whole', REQUIRED, 'validate every this many iterations', ge=1, required_in='train',
           read_by='BasicSR'),
    Option('val.save_img', 'bool', False, 'save the validation outputs', read_by='BasicSR'),
    Option('val.suffix', 'str', None, 'suffix of saved test images (~: the experiment name)', read_by='BasicSR'),
    Option('val.pbar', 'bool', False, 'progress bar', read_by='BasicSR'),
    Option('val.metrics', 'dict', None, 'metrics by name: type (calculate_psnr, ...) and its arguments',
           read_by='BasicSR'),
    Option('logger', 'dict', REQUIRED, 'logging and checkpoint settings', required_in='train', read_by='BasicSR'),
    Option('logger.print_freq', 'whole', REQUIRED, 'log every this many iterations', ge=1, read_by='BasicSR'),
    Option('logger.save_checkpoint_freq', 'whole', REQUIRED, 'save weights and state every this many iterations',
           ge=1, read_by='BasicSR'),
    Option('logger.use_tb_logger', 'bool', False, 'write tensorboard logs', read_by='BasicSR'),
    Option('logger.wandb', 'dict', None, 'wandb settings (project, resume_id)', read_by='BasicSR'),
    Option('logger.wandb.project', 'str', None, 'wandb project (~: no wandb)', read_by='BasicSR'),
    Option('logger.wandb.resume_id', 'str', None, 'wandb run to resume', read_by='BasicSR'),
)

#: BasicSR's data-loader keys of every dataset block (basicsr/data/__init__.py, basicsr/train.py)
LOADER_OPTIONS = OptionSchema(
    Option('name', 'str', REQUIRED, 'the dataset name in logs and result folders', read_by='BasicSR'),
    Option('type', 'str', REQUIRED, 'the registered dataset class', read_by='BasicSR'),
    Option('phase', 'str', None, 'set by BasicSR from the block name (train, val, test)', read_by='BasicSR'),
    Option('scale', 'int', None, 'SR scale (BasicSR copies the top-level scale here)', ge=1, read_by='BasicSR'),
    Option('batch_size_per_gpu', 'int', REQUIRED, 'batch size per GPU', ge=1, required_in='train',
           read_by='BasicSR'),
    Option('num_worker_per_gpu', 'int', REQUIRED, 'data-loading workers per GPU', ge=0, required_in='train',
           read_by='BasicSR'),
    Option('use_shuffle', 'bool', True, "accepted as true only: BasicSR 1.4.2's training sampler always shuffles",
           choices=(True,), read_by='nobody (ignored by BasicSR 1.4.2)'),
    Option('dataset_enlarge_ratio', 'int', 1, 'repeat the training set this many times per epoch', ge=1,
           read_by='BasicSR'),
    Option('prefetch_mode', 'str', None, 'prefetch batches (~: none)', choices=('cpu', 'cuda'), read_by='BasicSR'),
    Option('num_prefetch_queue', 'int', 1, 'batches prefetched by prefetch_mode cpu', ge=1, read_by='BasicSR'),
    Option('pin_memory', 'bool', False, 'pinned memory (prefetch_mode cuda needs it)', read_by='BasicSR'),
    Option('persistent_workers', 'bool', False, 'keep the workers between epochs', read_by='BasicSR'),
    Option('io_backend', 'dict', None, 'BasicSR file client (type: disk | lmdb)', read_by='BasicSR'),
)
