"""Library calls leave the process as they found it: Caffe's global RNG, OpenCV's thread count and log level,
os.environ, and the Caffe cache (a getter only reads)."""
import os

import numpy as np

from dsd_caffe import build, caffe_env, datums, info, netcheck, netgen, phases


def test_initial_weights_leave_caffes_random_stream_alone():
    caffe = caffe_env.import_caffe()
    net = netgen.small_squeezenet()
    deploy = netgen.deploy(net, input_shape=netcheck.input_shape(net))

    def draw():
        return caffe_env.make_net(deploy, "TEST").params["conv1"][0].data.copy()

    caffe.set_random_seed(7)
    draw()
    second = draw()
    caffe.set_random_seed(7)
    draw()
    weights = phases.initial_weights(net, 3)
    assert np.array_equal(draw(), second)  # the caller's stream goes on as if nothing had happened
    assert weights == phases.initial_weights(net, 3) != phases.initial_weights(net, 4)


def test_quiet_opencv_restores_threads_and_log_level():
    import cv2

    log = cv2.utils.logging
    before = (cv2.getNumThreads(), log.getLogLevel())
    try:
        cv2.setNumThreads(2)
        log.setLogLevel(log.LOG_LEVEL_INFO)
        with datums.quiet_opencv():
            assert (cv2.getNumThreads(), log.getLogLevel()) == (1, log.LOG_LEVEL_ERROR)
        assert (cv2.getNumThreads(), log.getLogLevel()) == (2, log.LOG_LEVEL_INFO)
    finally:
        cv2.setNumThreads(before[0])
        log.setLogLevel(before[1])


def test_info_collect_leaves_the_environment_as_it_found_it(monkeypatch):
    from dsd_caffe import blas

    for k in ("OPENBLAS_CORETYPE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT"):
        monkeypatch.delenv(k, raising=False)
    assert blas.runtime_env()  # something to set, so the test shows it is taken back
    before = dict(os.environ)
    report = info.collect()
    assert dict(os.environ) == before
    assert report["blas"]["env_applied_by_dsd_caffe"] == blas.runtime_env()


def test_the_cache_getter_only_reads(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_CAFFE_CACHE", str(tmp_path))
    half = tmp_path / "caffe-00000000deadbeef"
    (half / "bin").mkdir(parents=True)
    assert build.cached_build("00000000deadbeef") is None and half.exists()
    assert build.cached_prefix() is None and half.exists()
