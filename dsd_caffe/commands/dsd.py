"""Dense-Sparse-Dense from a dense caffemodel: prune -> sparse phase -> redense phase, --cycles N times, and with
--control the equal-length dense control beside it; --seeds N repeats the pair over seeds and says whether DSD
helped. --sparse-schedule gradual prunes inside each sparse phase (Zhu & Gupta's cubic schedule) instead of at
once.

Everything lands in --output: cycleK-sparse/ and cycleK-redense/ (each with its prototxts, snapshots, log and
final model + JSON), with --control also controlK-dense-as-sparse/ and -redense/ (the dense model trained on for
the same iterations, with the very solvers the DSD phases ran), dsd_state.json (settings, per-step results and
densities), accuracy.png (both arms' validation curves), and with --seeds N, seedK/ folders and verdict.json
(what the seeds varied, the standard deviation of the gains, the split; no interval when the seeds varied
nothing). --solver my_solver.prototxt: every phase's solver is yours but for DSD's base_lr and length.
Each phase shows a progress bar; the table (dense, sparse, DSD, control: top-1, top-5, density) is printed at
the end, on --holdout-source when given (an LMDB used for nothing else), else on the validation (TEST) LMDB.
Re-running the same command after an interruption (Ctrl-C, SIGTERM, even SIGKILL) resumes from the newest complete
snapshot of the current phase; with --seeds, every unfinished seed resumes and finished seeds are reused. A
finished single run is refused unless --force (start over). One run per --output: a second one is refused while
the first is alive, and so is any tool writing inside it.
A model whose loss or outputs are not finite (training diverged: try a lower learning rate) is marked "diverged"
in the table and recorded as null with the reason in dsd_state.json; the verdict refuses such a seed, and the
tool exits with status 3.
"""
from dsd_caffe import cli, evaluate
from dsd_caffe.commands import flags


def run(a):
    from dsd_caffe import pipeline, runreport, seedpool  # deferred: heavy (numpy, Caffe's messages); --help needs none

    config = pipeline.RunConfig(
        model=a.model, weights=a.weights, prune=flags.prune_config(a, a.seed),
        sparse=flags.schedule(a, "sparse"), redense=flags.schedule(a, "redense"),
        cycles=a.cycles, recipe=a.recipe, iterations=a.iterations, train_source=a.train_source,
        test_source=a.test_source, holdout_source=a.holdout_source, control=a.control, seed=a.seed, solver=a.solver,
        data_order=a.data_order, dense_per_seed=a.train_dense_per_seed)
    result = seedpool.run_seeds(config, a.output, a.seeds, a.jobs, a.engine, flags.device(a), a.force)
    for seed, state in result["runs"].items():
        if len(result["runs"]) > 1:
            print(f"seed {seed}:")
        print(runreport.results_text(state))
    if result["verdict"] is not None:
        print(result["verdict"].format())
    if result.get("refused"):
        print(result["refused"])
    diverged = [s for s in result["runs"].values() if any(r["diverged"] for r in runreport.results_table(s).values())]
    return cli.DIVERGED if diverged else 0


def main(argv=None):
    p = cli.parser(__doc__)
    p.add_argument("--model", required=True, help="dense trainval prototxt")
    p.add_argument("--weights", required=True, help="dense caffemodel")
    cli.add_output(p, "run folder")
    flags.add_pruning(p)
    flags.add_gradual(p, "--sparse-schedule")
    p.add_argument("--cycles", type=int, default=1, help="1 = DSD, 2 = DSDSD, ...")
    flags.add_schedule(p, "sparse", prefix="sparse")
    flags.add_schedule(p, "redense", prefix="redense")
    flags.add_run_settings(p)
    flags.add_recipe(p)
    flags.add_solver(p)
    p.add_argument("--iterations", type=int, default=evaluate.WHOLE_TEST_LMDB,
                   help="evaluation batches per model (default: the whole TEST LMDB)")
    flags.add_sources(p)
    p.add_argument("--holdout-source", help="an LMDB used for nothing else (e.g. the test split): every finished "
                   "model is evaluated on it once, and the table and verdict use it")
    p.add_argument("--control", action="store_true",
                   help="also train the equal-length dense control from the same model, and compare")
    flags.add_seeds(p)
    flags.add_device(p)
    p.add_argument("--seed", type=int, default=flags.seed_default(),
                   help="random_seed of every solver (dropout, crops, mirrors)")
    p.add_argument("--force", action="store_true", help="start a finished or different run over")
    for old, new, dest, kind in (("--sparse-iters", "--sparse-max-iter", "sparse_max_iter", int),
                                 ("--sparse-lr", "--sparse-base-lr", "sparse_base_lr", float),
                                 ("--dense-iters", "--redense-max-iter", "redense_max_iter", int),
                                 ("--dense-epochs", "--redense-epochs", "redense_epochs", float),
                                 ("--dense-lr", "--redense-base-lr", "redense_base_lr", float),
                                 ("--test-iterations", "--iterations", "iterations", int)):
        cli.add_deprecated(p, old, new, dest, kind)
    cli.main(p, run, argv)
