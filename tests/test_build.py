"""Issue 2: real Caffe built by the set-up: pycaffe works, the binary runs Python layers, the cache is sound."""
import json
import os
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from dsd_caffe import build
from dsd_caffe.caffe_env import caffe_binary, caffe_prefix, has_gpu_support, import_caffe

TINY_NET = """
name: "tiny"
layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 4 dim: 1 dim: 6 dim: 6 } } }
layer { name: "label" type: "Input" top: "label" input_param { shape { dim: 4 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "gaussian" std: 0.1 } } }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        inner_product_param { num_output: 5 weight_filler { type: "xavier" } } }
layer { name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }
"""


def test_layer_types_include_python_data_imagedata_hdf5():
    caffe = import_caffe()
    types = set(caffe.layer_type_list())
    assert {"Python", "Data", "ImageData", "HDF5Data"} <= types


def test_tiny_net_forward_backward_save_reload(tmp_path):
    caffe = import_caffe()
    proto = tmp_path / "tiny.prototxt"
    proto.write_text(TINY_NET)
    net = caffe.Net(str(proto), caffe.TRAIN)
    rng = np.random.default_rng(0)
    net.blobs["data"].data[...] = rng.standard_normal(net.blobs["data"].data.shape)
    net.blobs["label"].data[...] = [0, 1, 2, 3]
    loss = float(net.forward()["loss"])
    assert np.isfinite(loss) and loss > 0
    net.backward()
    assert np.abs(net.params["conv"][0].diff).sum() > 0
    model = tmp_path / "tiny.caffemodel"
    net.save(str(model))
    again = caffe.Net(str(proto), str(model), caffe.TEST)
    for name in ("conv", "ip"):
        for a, b in zip(net.params[name], again.params[name]):
            np.testing.assert_array_equal(a.data, b.data)


LAYER_MODULE = '''
import json, os, sys
import caffe
import numpy
import dsd_caffe

class Probe(caffe.Layer):
    """Identity that records which Python, numpy and dsd_caffe the caffe binary embeds."""
    def setup(self, bottom, top):
        with open(json.loads(self.param_str)["out"], "w") as f:
            json.dump({"executable": sys.executable, "numpy": numpy.__file__,
                       "dsd_caffe": dsd_caffe.__file__}, f)
    def reshape(self, bottom, top):
        top[0].reshape(*bottom[0].data.shape)
    def forward(self, bottom, top):
        top[0].data[...] = bottom[0].data
    def backward(self, top, propagate_down, bottom):
        bottom[0].diff[...] = top[0].diff
'''


def _probe_net(tmp_path, lmdb):
    out = tmp_path / "probe.json"
    return out, textwrap.dedent(f"""
        name: "probe"
        layer {{ name: "data" type: "Data" top: "data" top: "label"
                transform_param {{ scale: 0.00390625 }}
                data_param {{ source: "{lmdb}" batch_size: 4 backend: LMDB }} }}
        layer {{ name: "probe" type: "Python" bottom: "data" top: "probed"
                python_param {{ module: "probe_layer" layer: "Probe" param_str: '{{"out": "{out}"}}' }} }}
        layer {{ name: "ip" type: "InnerProduct" bottom: "probed" top: "ip"
                inner_product_param {{ num_output: 10 weight_filler {{ type: "xavier" }} }} }}
        layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
        layer {{ name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "accuracy" }}
    """)


def _run_caffe(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(tmp_path), GLOG_minloglevel="0")
    proc = subprocess.run([caffe_binary(), *args], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stderr


def _check_probe(out):
    probe = json.loads(out.read_text())
    venv_bin = os.path.dirname(sys.executable)
    assert os.path.dirname(probe["executable"]) == venv_bin
    import dsd_caffe

    assert probe["numpy"] == np.__file__
    assert probe["dsd_caffe"] == dsd_caffe.__file__


def test_python_layer_under_caffe_train_and_test(tmp_path, tiny_lmdb):
    lmdb = tiny_lmdb(n=16)
    (tmp_path / "probe_layer.py").write_text(LAYER_MODULE)
    out, net = _probe_net(tmp_path, lmdb)
    (tmp_path / "net.prototxt").write_text(net)
    (tmp_path / "solver.prototxt").write_text(textwrap.dedent("""
        net: "net.prototxt"
        base_lr: 0.01
        momentum: 0.9
        lr_policy: "fixed"
        max_iter: 5
        display: 1
        snapshot: 5
        snapshot_prefix: "snap"
        solver_mode: CPU
    """))
    log = _run_caffe(["train", "--solver=solver.prototxt"], tmp_path)
    assert "Optimization Done" in log
    _check_probe(out)
    out.unlink()
    log = _run_caffe(["test", "--model=net.prototxt", "--weights=snap_iter_5.caffemodel", "--iterations=2"],
                     tmp_path)
    assert "accuracy = " in log
    _check_probe(out)


def test_pycaffe_io_patch(tmp_path):
    """patches/0002: `import caffe` does not import skimage or scipy; caffe.io.load_image works with today's skimage."""
    code = textwrap.dedent(f"""
        import sys, numpy as np, caffe, cv2
        assert "skimage" not in sys.modules and "scipy" not in sys.modules
        img = np.zeros((5, 7, 3), np.uint8)
        img[1, 2] = (0, 0, 255)  # BGR red for OpenCV
        cv2.imwrite({str(tmp_path / "x.png")!r}, img)
        rgb = caffe.io.load_image({str(tmp_path / "x.png")!r})
        grey = caffe.io.load_image({str(tmp_path / "x.png")!r}, color=False)
        assert rgb.shape == (5, 7, 3) and rgb[1, 2].tolist() == [1.0, 0.0, 0.0], rgb[1, 2]
        assert grey.shape == (5, 7, 1) and 0 < grey[1, 2, 0] < 1
        assert caffe.io.resize_image(rgb, (10, 14)).shape == (10, 14, 3)
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]


def test_build_record_describes_the_build_in_use():
    """The CPU build, or the GPU one where the suite runs under DSD_CAFFE_BUILD=gpu (docs/gpu.md)."""
    record = json.loads(open(os.path.join(caffe_prefix(), build.STAMP)).read())
    gpu = has_gpu_support()
    assert record["cpu_only"] is not gpu
    assert record["options"] == build.build_options(gpu, record["cuda"]["archs"] if gpu else None)
    assert record["source"].startswith("caffe 1.0.0+git20180821.99bd997-8")
    assert list(record["patches"]) == [os.path.basename(p) for p in build.our_patches(gpu=gpu)]
    if not gpu:
        assert record.get("cuda") is None


def test_a_second_setup_finds_the_cached_build():
    """The key the set-up computes for this checkout names the build in use, so a second `make setup` reuses it
    (its record untouched) instead of compiling. Checked without running the set-up against this venv: the suite
    must not change the environment that runs it (a set-up from another checkout would re-point its editable
    install)."""
    stamp = os.path.join(caffe_prefix(), build.STAMP)
    before = os.stat(stamp).st_mtime_ns
    assert build.cached_prefix(gpu=has_gpu_support()) == os.path.realpath(caffe_prefix())
    assert os.stat(stamp).st_mtime_ns == before


def test_half_written_cache_is_detected(tmp_path, monkeypatch):
    """The getter only reads (tests and tools call it on the real cache, where a build may be under way); the
    builder removes a half-written folder before building."""
    monkeypatch.setenv("DSD_CAFFE_CACHE", str(tmp_path))
    half = tmp_path / "caffe-0123456789abcdef"
    (half / "bin").mkdir(parents=True)
    (half / "bin" / "caffe").write_text("")
    assert build.cached_build("0123456789abcdef") is None
    assert (half / "bin" / "caffe").exists()
    build.drop_incomplete_build("0123456789abcdef")
    assert not half.exists()
    (half).mkdir()
    (half / build.STAMP).write_text("{}")
    assert build.cached_build("0123456789abcdef") == str(half)


def test_checksum_mismatch_is_refused(tmp_path):
    for name in build.SOURCE_SHA256:
        (tmp_path / name).write_bytes(b"not the real file")
    with pytest.raises(build.SetupError, match="step 'checksum'.*sha256"):
        build.verify_sources(str(tmp_path))


def test_failed_step_names_the_step_and_its_log(tmp_path):
    logfile = tmp_path / "build.log"
    with pytest.raises(build.SetupError) as e:
        build._run("compile", ["sh", "-c", "echo boom; exit 3"], logfile=str(logfile))
    assert "step 'compile'" in str(e.value) and str(logfile) in str(e.value)
    assert "boom" in logfile.read_text()


def test_cache_key_follows_options_and_patches():
    linkage = build.python_linkage()
    patches = build.our_patches()
    cpu = build.cache_key(build.build_options(False), linkage, patches)
    assert cpu == build.cache_key(build.build_options(False), linkage, patches)
    assert cpu != build.cache_key(build.build_options(True), linkage, patches)
    assert cpu != build.cache_key(build.build_options(False), linkage, patches[:-1])


def test_our_patches_carry_a_reason():
    for p in build.our_patches(gpu=True):
        first = open(p).readline().strip()
        assert first and not first.startswith(("---", "diff")), f"{p} lacks its one-line reason"


def test_existing_caffe_root_is_used_or_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("CAFFE_ROOT", str(tmp_path))
    with pytest.raises(build.SetupError, match="CAFFE_ROOT=.*has no python/caffe"):
        build.find_existing_caffe()
    (tmp_path / "python" / "caffe").mkdir(parents=True)
    tool = tmp_path / "build" / "tools" / "caffe"
    tool.parent.mkdir(parents=True)
    tool.write_text("#!/bin/sh\n")
    tool.chmod(0o755)
    assert build.find_existing_caffe() == (str(tmp_path / "python"), str(tool))
    monkeypatch.delenv("CAFFE_ROOT")
    assert build.find_existing_caffe() is None  # inside our venv: use our own build


# ------------------------------------------------------------------------------------- the GPU build (issue 26)


def test_cuda_targets_default_override_and_bad_words(monkeypatch):
    monkeypatch.delenv("DSD_CUDA_ARCH", raising=False)
    assert build.CUDA_ARCH == "sm_80 sm_90 compute_90"
    assert build.cuda_targets() == {"CUDA_ARCH_NAME": "Manual", "CUDA_ARCH_BIN": "80 90", "CUDA_ARCH_PTX": "90"}
    assert build.cuda_targets("sm_90") == {"CUDA_ARCH_NAME": "Manual", "CUDA_ARCH_BIN": "90", "CUDA_ARCH_PTX": ""}
    monkeypatch.setenv("DSD_CUDA_ARCH", "sm_86,compute_86")
    assert build.cuda_targets() == {"CUDA_ARCH_NAME": "Manual", "CUDA_ARCH_BIN": "86", "CUDA_ARCH_PTX": "86"}
    assert build.cuda_targets("sm_120") == {"CUDA_ARCH_NAME": "Manual", "CUDA_ARCH_BIN": "120", "CUDA_ARCH_PTX": ""}
    for bad in ("sm90", "sm_9x", "80", "lto_90", " , "):
        with pytest.raises(build.SetupError, match="step 'configure'"):
            build.cuda_targets(bad)


def test_gpu_options_are_the_cpu_ones_plus_cuda_and_nccl(monkeypatch):
    monkeypatch.delenv("DSD_CUDA_ARCH", raising=False)
    cpu = build.build_options()
    assert cpu["CPU_ONLY"] == "ON" and not any(k.startswith(("CUDA", "USE_NCCL")) for k in cpu)
    assert build.build_options(True) == {**cpu, "CPU_ONLY": "OFF", "USE_NCCL": "ON", "CUDA_ARCH_NAME": "Manual",
                                         "CUDA_ARCH_BIN": "80 90", "CUDA_ARCH_PTX": "90"}
    assert cpu["USE_CUDNN"] == build.build_options(True)["USE_CUDNN"] == "OFF"


def test_cuda_patches_only_in_the_gpu_build():
    names = lambda ps: [os.path.basename(p) for p in ps]  # noqa: E731
    cpu, gpu = names(build.our_patches()), names(build.our_patches(gpu=True))
    cuda = [n for n in gpu if build.CUDA_MARK in n]
    assert cuda == ["0101-cuda-13-device-query.patch", "0102-cuda-13-archs-cxx17.patch",
                    "0103-cuda-cpu-mode-threads.patch", "0104-cuda-no-gpu-is-a-warning.patch"]
    assert not any(build.CUDA_MARK in n for n in cpu)
    assert gpu == sorted(cpu + cuda)
    assert names(build.our_patches(perf=False, gpu=True)) == sorted(
        [n for n in cpu if build.PERF_MARK not in n] + cuda)


def test_gpu_key_is_its_own_and_the_cpu_key_ignores_cuda():
    linkage = build.python_linkage()
    cuda = {"version": "13.0.88", "archs": "sm_80 sm_90 compute_90", "wheels": dict(build.CUDA_WHEELS)}
    cpu = build.cache_key(build.build_options(), linkage, build.our_patches())
    gpu = build.cache_key(build.build_options(True), linkage, build.our_patches(gpu=True), cuda)
    assert cpu != gpu
    # the CUDA patches are not part of the CPU key: it is what it was before they existed
    assert cpu == build.cache_key(build.build_options(), linkage, [p for p in build.our_patches(gpu=True)
                                                                   if build.CUDA_MARK not in p])
    for change in ({"version": "13.1.80"}, {"wheels": {**build.CUDA_WHEELS, "nvidia-cublas": "13.1.0.3"}}):
        assert gpu != build.cache_key(build.build_options(True), linkage, build.our_patches(gpu=True),
                                      {**cuda, **change})
    assert gpu != build.cache_key(build.build_options(True, "sm_90"), linkage, build.our_patches(gpu=True), cuda)


def _fake_cuda(tmp_path):
    lib, nccl = tmp_path / "nvidia" / "cu13" / "lib", tmp_path / "nvidia" / "nccl"
    return {"nvcc": "/usr/local/bin/nvcc", "toolkit": None, "version": "13.0.88", "archs": "sm_80 sm_90 compute_90",
            "wheels": dict(build.CUDA_WHEELS), "wheel_dir": str(tmp_path),
            "include_dirs": [str(tmp_path / "nvidia" / "cu13" / "include"), str(nccl / "include")],
            "library_dirs": [str(lib), str(nccl / "lib")],
            "libraries": {"cublas": f"{lib}/libcublas.so.13", "curand": f"{lib}/libcurand.so.10",
                          "nccl": f"{nccl}/lib/libnccl.so.2"}}


def test_cuda_cmake_args_point_at_the_wheels(tmp_path):
    t = str(tmp_path)
    assert build.cuda_cmake_args(_fake_cuda(tmp_path)) == [
        f"-DCUDA_cublas_LIBRARY={t}/nvidia/cu13/lib/libcublas.so.13",
        f"-DCUDA_curand_LIBRARY={t}/nvidia/cu13/lib/libcurand.so.10",
        f"-DNCCL_INCLUDE_DIR={t}/nvidia/nccl/include",
        f"-DNCCL_LIBRARIES={t}/nvidia/nccl/lib/libnccl.so.2",
        f"-DCUDA_NVCC_FLAGS=-I{t}/nvidia/cu13/include;-I{t}/nvidia/nccl/include",
        f"-DCMAKE_CXX_FLAGS=-I{t}/nvidia/cu13/include -I{t}/nvidia/nccl/include",
        f"-DCMAKE_EXE_LINKER_FLAGS=-Wl,-rpath-link,{t}/nvidia/cu13/lib -Wl,-rpath-link,{t}/nvidia/nccl/lib",
        f"-DCMAKE_SHARED_LINKER_FLAGS=-Wl,-rpath-link,{t}/nvidia/cu13/lib -Wl,-rpath-link,{t}/nvidia/nccl/lib",
    ]
    cudart = tmp_path / "nvidia" / "cu13" / "lib" / "libcudart.so.13"
    cudart.parent.mkdir(parents=True)
    cudart.write_text("")
    wheel_nvcc = {**_fake_cuda(tmp_path), "toolkit": f"{t}/nvidia/cu13"}
    assert build.cuda_cmake_args(wheel_nvcc)[-2:] == [f"-DCUDA_TOOLKIT_ROOT_DIR={t}/nvidia/cu13",
                                                      f"-DCUDA_CUDART_LIBRARY={cudart}"]


def test_cuda_record_lists_version_targets_and_libraries(tmp_path):
    cuda = _fake_cuda(tmp_path)
    w = build.CUDA_WHEELS
    assert build.cuda_record(cuda) == {
        "version": "13.0.88", "nvcc": "/usr/local/bin/nvcc", "archs": "sm_80 sm_90 compute_90", "cudnn": False,
        "libraries": {
            "cublas": {"wheel": "nvidia-cublas", "version": w["nvidia-cublas"], "file": cuda["libraries"]["cublas"]},
            "curand": {"wheel": "nvidia-curand", "version": w["nvidia-curand"], "file": cuda["libraries"]["curand"]},
            "nccl": {"wheel": "nvidia-nccl-cu13", "version": w["nvidia-nccl-cu13"], "file": cuda["libraries"]["nccl"]},
        }}


def test_cuda_wheels_go_into_the_cache_once(tmp_path, monkeypatch):
    monkeypatch.setenv("DSD_CAFFE_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(build, "_run", lambda step, cmd, **kw: calls.append((step, cmd)) or "")
    pins = {"nvidia-curand": "10.4.0.35", "nvidia-cublas": "13.0.2.14"}
    folder = build.install_wheels("cuda", pins)
    assert os.path.dirname(folder) == str(tmp_path) and os.path.basename(folder).startswith("cuda-")
    assert json.loads(open(os.path.join(folder, build.CUDA_STAMP)).read()) == {"wheels": pins}
    [(step, cmd)] = calls
    target = cmd[cmd.index("--target") + 1]
    assert step == "cuda" and cmd[1:4] == ["-m", "pip", "install"] and "--no-deps" in cmd
    assert os.path.dirname(target) == str(tmp_path) and target != folder  # installed aside, renamed when complete
    assert cmd[-2:] == ["nvidia-cublas==13.0.2.14", "nvidia-curand==10.4.0.35"]
    assert build.install_wheels("cuda", pins) == folder and len(calls) == 1  # cached: no second pip
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(folder)]  # nothing half-written beside it


def test_nvcc_from_path_else_from_pypi(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "_run", lambda step, cmd, **kw:
                        "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.88\n")
    assert build.nvcc_version("nvcc") == "13.0.88"
    monkeypatch.setattr(build.shutil, "which", lambda name: "/opt/cuda/bin/nvcc")
    assert build.find_nvcc() == ("/opt/cuda/bin/nvcc", None)
    monkeypatch.setattr(build.shutil, "which", lambda name: None)
    nvcc = tmp_path / "nvidia" / "cu13" / "bin" / "nvcc"
    nvcc.parent.mkdir(parents=True)
    nvcc.write_text("")
    asked = []
    monkeypatch.setattr(build, "install_wheels", lambda step, pins: asked.append(pins) or str(tmp_path))
    assert build.find_nvcc() == (str(nvcc), str(tmp_path / "nvidia" / "cu13"))
    assert asked == [build.NVCC_WHEELS]


def test_make_spells_the_gpu_build():
    """`make setup-gpu` and `DSD_CAFFE_BUILD=gpu make test` use the GPU build in .venv-gpu; plain make the CPU one."""
    def dry(*args, **env):
        e = {k: v for k, v in os.environ.items() if k not in ("DSD_CAFFE_BUILD", "VENV", "MAKEFLAGS", "MAKELEVEL")}
        r = subprocess.run(["make", "-n", "-s", *args], capture_output=True, text=True, cwd=build.REPO,
                           env={**e, **env})
        return r.returncode, r.stdout + r.stderr

    assert dry("test") == (0, "python3 -m dsd_caffe.build  --venv .venv\n.venv/bin/python -m pytest -q tests\n")
    assert dry("test", DSD_CAFFE_BUILD="gpu") == (
        0, "python3 -m dsd_caffe.build --gpu --venv .venv-gpu\n.venv-gpu/bin/python -m pytest -q tests\n")
    assert "python3 -m dsd_caffe.build --gpu --venv .venv-gpu\n" in dry("setup-gpu")[1]
    rc, out = dry("test", DSD_CAFFE_BUILD="cuda")
    assert rc == 2 and "DSD_CAFFE_BUILD must be cpu or gpu, not 'cuda'" in out


def _gpu_build():
    prefixes = build.cached_gpu_prefixes()
    if not prefixes:
        pytest.skip("no GPU build in the cache (make setup-gpu, docs/gpu.md)")
    return prefixes[0]


def test_gpu_build_runs_in_cpu_mode_without_a_device(tmp_path):
    """A GPU build from the cache, used from this venv's Python: its record names CUDA, the targets and the wheels;
    its libraries find the wheels' cuBLAS, cuRAND and NCCL through their RUNPATH; pycaffe imports (with
    ``caffe.NCCL``) and trains the tiny net in CPU mode; and `caffe device_query` becomes one line where no GPU is."""
    prefix = _gpu_build()
    record = json.loads(open(os.path.join(prefix, build.STAMP)).read())
    cuda = record["cuda"]
    assert record["cpu_only"] is False and record["options"] == build.build_options(True, cuda["archs"])
    assert cuda["cudnn"] is False and cuda["version"].startswith("13.")
    assert set(cuda["libraries"]) == {"cublas", "curand", "nccl"}
    lib = os.path.join(prefix, "lib", "libcaffe.so")
    resolved = dict(line.split(" => ") for line in subprocess.run(["ldd", lib], capture_output=True, text=True,
                                                                   check=True).stdout.replace("\t", "").splitlines()
                    if " => " in line)
    for name, entry in cuda["libraries"].items():
        soname = os.path.basename(entry["file"])
        assert resolved[soname].split(" (")[0] == entry["file"], (soname, resolved[soname])
        assert entry["file"].startswith(build.cache_root() + os.sep)
    pydir = os.path.join(prefix, "lib", "python3", "dist-packages")
    (tmp_path / "tiny.prototxt").write_text(TINY_NET)
    code = textwrap.dedent(f"""
        import json, numpy as np, caffe
        caffe.set_mode_cpu()
        net = caffe.Net({str(tmp_path / "tiny.prototxt")!r}, caffe.TRAIN)
        net.blobs["data"].data[...] = np.random.default_rng(0).standard_normal(net.blobs["data"].data.shape)
        net.blobs["label"].data[...] = [0, 1, 2, 3]
        loss = float(net.forward()["loss"])
        net.backward()
        print(json.dumps({{"file": caffe.__file__, "loss": loss, "nccl": hasattr(caffe, "NCCL"),
                          "diff": float(np.abs(net.params["conv"][0].diff).sum())}}))
    """)
    env = dict(os.environ, PYTHONPATH=pydir, GLOG_minloglevel="2")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["file"].startswith(pydir) and out["nccl"] is True
    assert np.isfinite(out["loss"]) and out["loss"] > 0 and out["diff"] > 0
    from dsd_caffe import info
    from dsd_caffe.errors import UserError

    try:
        devices = info.device_query(0, binary=os.path.join(prefix, "bin", "caffe"))
    except UserError as e:
        assert str(e).startswith("GPU 0 cannot be used: ") and "\n" not in str(e)
    else:  # a machine with a GPU
        assert devices[0]["Device id"] == "0" and devices[0]["Name"]


def test_gpu_gtest_cases_are_the_gpu_instances_of_squeezenets_layers():
    """Caffe's typed layer tests run CPUDevice<float>, CPUDevice<double>, GPUDevice<float>, GPUDevice<double> as
    /0../3: the GPU check runs /2 and /3 of every layer type SqueezeNet has (Accuracy included)."""
    suites = set()
    for filt in build.GTEST_GPU_CASES.values():
        for pattern in filt.split(":"):
            suite, _, rest = pattern.partition("/")
            assert rest[:2] in ("2.", "3."), pattern
            suites.add(suite)
    assert suites == {"ConvolutionLayerTest", "Im2colLayerTest", "PoolingLayerTest", "ConcatLayerTest",
                      "NeuronLayerTest", "SoftmaxLayerTest", "SoftmaxWithLossLayerTest", "AccuracyLayerTest"}
    types = set()
    for name in ("trainval_han.prototxt", "trainval_deepscale.prototxt"):
        types |= set(re.findall(r'^  type: "(\w+)"', open(os.path.join(build.REPO, "models", "squeezenet_v1.0",
                                                                           name)).read(), re.M))
    tested = {"Convolution", "Pooling", "Concat", "ReLU", "Dropout", "Softmax", "SoftmaxWithLoss", "Accuracy"}
    assert types - {"Data"} <= tested, types - tested


def test_gpu_check_script_parses():
    r = subprocess.run(["bash", "-n", os.path.join(build.REPO, "bench", "gpu_check.sh")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr


def test_a_stopped_build_resumes_its_compile(tmp_path, monkeypatch):
    """A build that fails (or is stopped) after configuring keeps its folder; the next one compiles on there without
    unpacking or configuring again, and removes it when done. Any other leftover is removed."""
    monkeypatch.setenv("DSD_CAFFE_CACHE", str(tmp_path))
    monkeypatch.setattr(build, "fetch_sources", lambda: str(tmp_path / "sources"))
    steps, fail = [], {"compile"}
    monkeypatch.setattr(build, "unpack_source", lambda sources, src, patches, logfile: steps.append("unpack"))

    def run(step, cmd, logfile=None, env=None, cwd=None):
        steps.append(step)
        if step in fail:
            raise build.SetupError(step, "boom")
        if step == "install":
            os.makedirs(cmd[-1].split("=", 1)[1] + str(tmp_path / "caffe-k"))

    monkeypatch.setattr(build, "_run", run)
    stale = tmp_path / ".build-k-stale"
    stale.mkdir()
    args = ("k", build.build_options(), build.python_linkage(), [], 2)
    with pytest.raises(build.SetupError, match="step 'compile'"):
        build.build_caffe(*args)
    assert steps == ["unpack", "configure", "compile"] and not stale.exists()
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith(".build-k-")]
    assert (kept / "build" / build.CONFIGURED).exists()
    steps.clear()
    fail.clear()
    assert build.build_caffe(*args) == str(tmp_path / "caffe-k")
    assert steps == ["compile", "install"] and not kept.exists()
    record = json.loads((tmp_path / "caffe-k" / build.STAMP).read_text())
    assert record["resumed"] is True and record["key"] == "k"


def test_one_build_of_a_key_at_a_time(tmp_path, monkeypatch):
    import fcntl

    monkeypatch.setenv("DSD_CAFFE_CACHE", str(tmp_path))
    with open(tmp_path / ".build-k.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(build.SetupError, match="another set-up is building this Caffe now"):
            with build._build_lock(str(tmp_path), "k"):
                pass
    with build._build_lock(str(tmp_path), "k"):
        pass
