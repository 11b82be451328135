"""One place for each fact: the Caffe facts (caffefacts), the value checks (checks) and the source rule
(sources.resolve) are the ones every module reads, and they agree."""
import numpy as np
import pytest

from helpers import write_tiny_lmdb
from dsd_caffe import (caffefacts, checks, classifier, deepcompression, evaluate, masks, netcheck, netgen, pruning,
                       solvers, sources)
from dsd_caffe.caffeproto import caffe_pb2
from dsd_caffe.errors import UserError


def test_every_module_reads_the_one_copy_of_each_fact():
    assert masks.WEIGHTED is caffefacts.WEIGHTED
    assert sources.SOURCE_PARAMS is caffefacts.SOURCE_PARAMS
    assert netgen.NAMINGS is caffefacts.NAMINGS
    assert netcheck.DATA_TYPES == caffefacts.DATA_TYPES + caffefacts.GENERATED_DATA_TYPES
    assert deepcompression.DATA_TYPES == set(caffefacts.DATA_TYPES) | set(caffefacts.V1_DATA_TYPES)
    assert set(deepcompression.NET_BITS) < set(caffefacts.WEIGHTED)
    assert pruning.han_name is caffefacts.han_name and pruning.deepscale_name is caffefacts.deepscale_name
    assert (solvers.count, solvers.positive, solvers.INT_MAX) == (checks.count, checks.positive, checks.INT_MAX)


def test_weighted_layers_and_the_mask_layer_agree_on_deconvolution():
    net = caffe_pb2().NetParameter()
    for name, kind in [("data", "Input"), ("conv", "Convolution"), ("up", "Deconvolution"), ("ip", "InnerProduct"),
                       ("relu", "ReLU")]:
        net.layer.add(name=name, type=kind)
    assert netgen.weighted_layers(net) == ["conv", "up", "ip"]
    assert [l.name for l in net.layer if l.type in masks.WEIGHTED] == ["conv", "up", "ip"]
    v1 = caffe_pb2().NetParameter()
    for name, kind in [("conv", 4), ("up", 39), ("ip", 14), ("relu", 18)]:
        v1.layers.add(name=name, type=kind)
    assert netgen.weighted_layers(v1) == ["conv", "up", "ip"]


def test_squeezenet_naming_is_one_table():
    for han, ds in [("fire2/conv1x1_1", "fire2/squeeze1x1"), ("fire9/conv3x3_2", "fire9/expand3x3"),
                    ("conv_final", "conv10")]:
        assert caffefacts.deepscale_name(han) == ds and caffefacts.han_name(ds) == han
    assert caffefacts.han_name("ip1") == caffefacts.deepscale_name("ip1") == "ip1"
    assert netcheck.guess_naming([l.name for l in netgen.squeezenet_v1_0("deepscale").layer]) == "deepscale"
    assert netcheck.guess_naming(["ip1", "ip2"]) is None


@pytest.mark.parametrize("bad, text", [(0, ">= 1, got 0"), (True, "got True"), (2.0, "got 2.0"),
                                       (2**31, "at most 2147483647")])
def test_counts_are_checked_by_one_rule(bad, text):
    for check in (lambda v: evaluate._check_iterations(v), lambda v: netgen.small_squeezenet(num_classes=v),
                  lambda v: solvers.count(v, "--iterations")):
        with pytest.raises(UserError, match=text):
            check(bad)
    assert evaluate._check_iterations(np.int64(7)) == 7 and type(evaluate._check_iterations(np.int64(7))) is int


def test_a_val_lmdb_in_the_current_folder_does_not_change_the_zoo_recipe(tmp_path, monkeypatch):
    """The zoo's in-memory ImageNet net names "val_lmdb"; a Fashion-MNIST import folder holds one. Before the one
    rule, the classifier read that one and believed the ImageNet net took 1x28x28 images."""
    expected = classifier.known_recipe("imagenet")
    write_tiny_lmdb(tmp_path / "val_lmdb", np.zeros((2, 1, 28, 28)), [0, 1])
    monkeypatch.chdir(tmp_path)
    assert classifier.known_recipe("imagenet") == expected
    assert expected[0].input_size == (3, 227, 227)


def test_one_seed_default(tmp_path):
    """solvers.SEED is every default seed: the solvers build() writes (and so the committed ones), the run and
    phase configs, and every tool's --seed."""
    import dataclasses
    import glob
    import os

    from helpers import ROOT, tool_parser
    from dsd_caffe import fileio, phases, pipeline
    from dsd_caffe.commands import flags

    sizes = solvers.DataSizes(train=100, test=10, batch=10, test_batch=10)
    assert solvers.build("sparse", "net.prototxt", sizes).random_seed == solvers.SEED
    committed = glob.glob(os.path.join(ROOT, "solvers", "*", "*_solver.prototxt"))
    assert committed and {fileio.read_solver_prototxt(p).random_seed for p in committed} == {solvers.SEED}
    assert phases.PruneConfig(ratio="3x").seed == solvers.SEED == flags.seed_default()
    assert {f.name: f.default for f in dataclasses.fields(pipeline.RunConfig)}["seed"] == solvers.SEED
    for tool in ("demo", "dsd", "prune", "retrain_dense"):
        assert tool_parser(f"dsd_caffe.commands.{tool}").get_default("seed") == solvers.SEED, tool


def test_one_iterations_default_per_meaning():
    """--iterations means three things, each with one named default: caffe test's forward passes (50, as
    tools/caffe.cpp's FLAGS_iterations), a run's evaluation of each model (the whole TEST LMDB) and the sensitivity
    scan's batches per evaluation (10); every flag and config reads its own."""
    import dataclasses
    import inspect

    from helpers import tool_parser
    from dsd_caffe import pipeline, sensitivity

    assert evaluate.CAFFE_TEST_ITERATIONS == 50 and evaluate.WHOLE_TEST_LMDB is None
    assert sensitivity.DEFAULT_ITERATIONS == 10
    default = (lambda fn: inspect.signature(fn).parameters["iterations"].default)
    flag = (lambda tool: next(a.default for a in tool_parser(f"dsd_caffe.commands.{tool}")._actions
                              if "--iterations" in a.option_strings))
    assert default(evaluate.evaluate) == default(evaluate.run) == evaluate.CAFFE_TEST_ITERATIONS
    assert flag("evaluate") == evaluate.CAFFE_TEST_ITERATIONS
    assert default(evaluate.evaluate_param) is evaluate.WHOLE_TEST_LMDB
    assert {f.name: f.default for f in dataclasses.fields(pipeline.RunConfig)}["iterations"] is evaluate.WHOLE_TEST_LMDB
    assert flag("dsd") is evaluate.WHOLE_TEST_LMDB
    assert sensitivity.ScanConfig().iterations == sensitivity.DEFAULT_ITERATIONS
    assert flag("sensitivity") == sensitivity.DEFAULT_ITERATIONS


def test_file_names_are_written_once():
    """Each file name with a constant is spelled once in the code (dsd_caffe/ and bench/): where the constant is
    defined; everything else reads the constant."""
    import glob
    import os

    from helpers import ROOT
    from dsd_caffe import build, demo, phases, pipeline, runreport, sensitivity, training

    names = [pipeline.STATE, pipeline.PLOT, runreport.VERDICT, training.RECORD, training.LOG, training.SNAPSHOT_DIR,
             phases.PRUNED, phases.MASKS, phases.HISTOGRAM, phases.RELEASED, phases.INIT, demo.CONFIG, demo.RESULTS,
             build.STAMP, *sensitivity.FILES, *evaluate.CONFUSION_FILES]
    code = [open(p).read() for p in glob.glob(os.path.join(ROOT, "dsd_caffe", "**", "*.py"), recursive=True)
            + glob.glob(os.path.join(ROOT, "bench", "*.py"))]
    spelled = {name: sum(text.count(f'"{name}"') + text.count(f"'{name}'") for text in code) for name in names}
    assert spelled == {name: 1 for name in names}
