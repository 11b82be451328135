"""Flag groups shared by several tools, so a flag means the same thing everywhere: a phase's schedule
(``--max-iter``, ``--epochs``, ``--base-lr``, ...; prefixed with the phase where a tool drives several), how much
to prune, and where the data comes from. Defaults come from ``solvers.DEFAULTS``: a flag left out takes the
table's value, which its help names."""
from dsd_caffe import cli, devices, gradual, solvers
from dsd_caffe.gradual import Gradual
from dsd_caffe.solvers import Schedule


def add_schedule(p, phase, prefix="", default=None):
    """The schedule flags of ``phase`` (``--base-lr``...; ``--<prefix>-base-lr`` with a prefix); ``default`` says
    where a left-out flag's value comes from when it is not the table (whose imagenet values the help names)."""
    d = solvers.DEFAULTS["imagenet"][phase]
    flag = (lambda name: f"--{prefix + '-' if prefix else ''}{name}")
    length = f"{d.epochs:g} epochs" if d.epochs else f"{d.max_iter} iterations"
    g = p.add_argument_group(f"{phase} phase")
    lr_default = default or f"the recipe's; imagenet: {d.base_lr:g}"
    length_default = default or f"the recipe's; imagenet: {length}"
    g.add_argument(flag("base-lr"), type=float, metavar="LR", help=f"{phase} base_lr (default: {lr_default})")
    g.add_argument(flag("epochs"), type=float, metavar="N",
                   help=f"{phase} training epochs (default: {length_default})")
    g.add_argument(flag("max-iter"), type=int, metavar="N", help=f"{phase} iterations, instead of epochs")
    return g


def schedule(args, prefix=""):
    """The Schedule the flags of :func:`add_schedule` and :func:`add_run_settings` give."""
    get = (lambda name: getattr(args, f"{prefix + '_' if prefix else ''}{name}"))
    common = {k: getattr(args, k) for k in ("snapshot", "iter_size") if getattr(args, k) is not None}
    return Schedule(base_lr=get("base_lr"), epochs=get("epochs"), max_iter=get("max_iter"), flag=prefix, **common)


def add_run_settings(p):
    """--snapshot and --iter-size (every phase the tool trains)."""
    p.add_argument("--snapshot", type=int, metavar="N",
                   help="snapshot every N iterations (default: a tenth of each phase, solvers.DEFAULTS)")
    p.add_argument("--iter-size", type=int, metavar="N", help="solver iter_size: batches per iteration (default: "
                   "1, the net's batch; solvers.DEFAULTS)")


def add_pruning(p):
    """How much to prune and where."""
    g = p.add_argument_group("how much to keep (give one)")
    g.add_argument("--ratio", help='keep 1/N of the weights, e.g. "3x" keeps 1/3')
    g.add_argument("--density", help="fraction kept, e.g. 0.33")
    g.add_argument("--sparsity", help="fraction removed, e.g. 0.67")
    p.add_argument("--profile", default="uniform",
                   help="per-layer densities: uniform, global (one threshold), squeezenet-3x (the released sparse "
                        "SqueezeNet's) or a JSON file {layer or pattern: density}")
    cli.add_list(p, "--skip", help="layers (names or patterns) kept dense", default=[])


def seed_default():
    """The one seed default, ``solvers.SEED``."""
    return solvers.SEED


def add_gradual(p, flag="--schedule"):
    """One-shot or gradual pruning (``flag``: ``--schedule``, or ``--sparse-schedule`` where a tool drives several
    phases) and the gradual schedule's settings; defaults in solvers.DEFAULTS (the sparse row)."""
    d = solvers.DEFAULTS["imagenet"]["sparse"]
    g = p.add_argument_group("when to prune (gradual: Zhu & Gupta's cubic schedule, inside the sparse phase)")
    g.add_argument(flag, dest="pruning_schedule", choices=gradual.SCHEDULES, default="oneshot",
                   help="oneshot: prune now, as the DSD release; gradual: start the sparse phase from the dense "
                        "weights and let the mask layer prune toward the final densities in steps")
    g.add_argument("--gradual-begin", type=int, metavar="ITER",
                   help=f"iteration t0 of the first pruning step (default: {d.gradual_begin:g} x the sparse phase's "
                        "length, solvers.DEFAULTS)")
    g.add_argument("--gradual-steps", type=int, metavar="N",
                   help=f"pruning steps n after the first (default: {d.gradual_steps}, fewer in a short phase)")
    g.add_argument("--gradual-interval", type=int, metavar="DT",
                   help=f"iterations dt between steps (default: the last step at {d.gradual_end:.3g} x the phase's "
                        "length)")
    g.add_argument("--gradual-initial-density", type=float, metavar="D",
                   help="density s_i of the first step (default: 1, the dense model)")
    cli.name_fields(p, {"schedule": flag, "gradual.initial": "--gradual-initial-density"})


def prune_config(args, seed=None):
    from dsd_caffe.phases import PruneConfig  # deferred: heavy (numpy); --help needs none

    schedule = getattr(args, "pruning_schedule", "oneshot")
    settings = Gradual(begin=getattr(args, "gradual_begin", None), steps=getattr(args, "gradual_steps", None),
                       interval=getattr(args, "gradual_interval", None),
                       initial=getattr(args, "gradual_initial_density", None))
    return PruneConfig(ratio=args.ratio, density=args.density, sparsity=args.sparsity, profile=args.profile,
                       skip=tuple(args.skip), seed=seed_default() if seed is None else seed, schedule=schedule,
                       gradual=settings)


def add_file_output(p, help):
    """--output FILE (``help``: what it is) and --force, for the tools that write one file with its JSON record
    beside it (compress, decode_compressed, export_onnx): an existing output is refused unless --force."""
    cli.add_output(p, help)
    p.add_argument("--force", action="store_true", help="overwrite an existing output")


def add_sources(p):
    p.add_argument("--train-source", help="TRAIN LMDB instead of the trainval's (default: the trainval's)")
    p.add_argument("--test-source", help="TEST (validation) LMDB instead of the trainval's (default: the "
                   "trainval's)")


def add_engine(p):
    from dsd_caffe.training import ENGINES  # deferred: heavy (numpy); --help needs none

    p.add_argument("--engine", choices=ENGINES, default="binary",
                   help="train with the `caffe train` binary or pycaffe's Solver in this process")


def add_device(p, engine=True, several=True):
    """--gpu (and --engine): the devices a tool runs on; ``several`` for the tools that train (several devices
    train each phase data-parallel). Read back with :func:`device`."""
    if engine:
        add_engine(p)
    more = (": 0, or 0,1,... to train each phase data-parallel on several GPUs (--seeds: one GPU per seed, round "
            "robin)" if several else "")
    p.add_argument("--gpu", metavar="N,..." if several else "N",
                   help=f"GPU device number{'s' if several else ''}{more} (CUDA builds only; default: the CPU)")


def device(a):
    """The tool's choice of device: the --gpu devices (a tuple), each checked to exist before Caffe is asked (one
    line naming a missing one: dsd_caffe.devices), or None: without --gpu, Caffe runs on the CPU."""
    gpus = devices.check(a.gpu)
    if gpus is None:
        devices.use_cpu()
    return gpus


def add_seeds(p):
    """dsd.py's seed flags: how many paired runs, how many at once, and what a seed varies beyond the solver's."""
    p.add_argument("--seeds", type=int, default=1, help="paired runs (with --control) over seeds --seed, +1, ...")
    p.add_argument("--jobs", type=int, default=1, help="seeds run at the same time, in separate processes")
    p.add_argument("--data-order", choices=("fixed", "shuffled"),
                   help="the order each seed reads the TRAIN data in: shuffled writes a copy of the TRAIN LMDB per "
                        "seed in the seed's order (costs its disk space per seed); fixed reads the LMDB's own order "
                        "(default: shuffled with --seeds 2 or more, else fixed)")
    p.add_argument("--train-dense-per-seed", action="store_true",
                   help="each seed first trains its own dense model from the net's fillers (seeded), with --solver's "
                        "base_lr and max_iter (else the recipe's dense row), and prunes that: the seeds then vary the "
                        "dense model too; costs one whole dense training per seed (--weights only checks the net)")


def add_solver(p):
    p.add_argument("--solver", metavar="PROTOTXT",
                   help="your solver prototxt: every phase's solver takes its settings (momentum, weight decay, lr "
                        "policy, test_iter, test_interval, iter_size, type, ...) but for DSD's own: the phase's "
                        "base_lr and length (the recipe's or the flags'), snapshots and seed; the device is --gpu's "
                        "(solver_mode and device_id are not taken)")


def add_recipe(p):
    p.add_argument("--recipe", choices=solvers.RECIPES,
                   help="which defaults of solvers.DEFAULTS the phases take (default: the recipe recorded in the "
                        "JSON beside --weights, for a model this toolkit made; else imagenet)")
