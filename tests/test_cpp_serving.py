"""Export and C++ serving: a small saved CANet (calibrated, several routes in
use) is exported with `Recommender.export` (torch.export + AOTInductor); the
package served from Python (`CompiledRecommender`) and from C++
(examples/cpp_serving built with CMake: libtorch + libcanet.so, no Python)
must give the Python API's top-k, routes and scores.

The C++ build goes to build/cpp_serving (kept, so later runs only relink;
CANET_CPP_BUILD_DIR overrides it) or is skipped with CANET_SERVE_BIN=<a
built canet_serve>. Skipped, with the reason, without cmake or a C++
compiler. A first build compiles libcanet.so too (about a minute on 2 cores).
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import time

import pytest
import torch

from canet_kernels.data import pad_right
from canet_kernels import serving
from canet_kernels.serving import VARIANTS, CompiledRecommender, Recommender

from helpers import one_thread, run_threads  # noqa: F401  (autouse fixture)
from test_serving import close, histories, save_run, tiny_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
K = 8


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A Recommender loaded from a saved run of a calibrated tiny model."""
    tmp = tmp_path_factory.mktemp("serving")
    model = tiny_model(seed=2)
    hs = histories(40, seed=5)
    items, lengths = pad_right([h[-model.cfg.max_len:] for h in hs], model.cfg.max_len)
    bias = model.calibrate([(items, lengths)], target=0.3)
    assert bias > 0, "calibration should price the routes (exported cost bias)"
    run = save_run(model, tmp / "run")
    return Recommender.load(run), run, tmp


@pytest.fixture(scope="module", params=VARIANTS)
def served(request, saved):
    """(Recommender, path of its exported package) for each export variant,
    exported by `python -m canet_kernels.serving export`."""
    rec, run, tmp = saved
    path = str(tmp / f"model_{request.param}.pt2")
    t0 = time.perf_counter()
    assert serving.main(["export", "--ckpt", run, "--out", path, "-k", str(K),
                         "--variant", request.param]) == 0
    print(f"export ({request.param}) + AOTInductor compile: {time.perf_counter() - t0:.1f} s")
    return rec, path


def requests():
    hs = histories(10, seed=7) + [[4], [9, 9, 9], list(range(1, 31))]
    return hs


def test_compiled_package_matches_python(served):
    rec, path = served
    crec = CompiledRecommender(path)
    assert (crec.n_items, crec.max_len, crec.k_max) == (rec.n_items, rec.max_len, K)
    assert crec.variant in VARIANTS and path.endswith(f"model_{crec.variant}.pt2")
    hs = requests()
    routes = set()
    for h in hs:
        for route in [None] + list(range(rec.cfg.num_routes)):
            for exclude in (True, False):
                want = rec.recommend(h, k=K, exclude_seen=exclude, route=route)
                got = crec.recommend(h, k=K, exclude_seen=exclude, route=route)
                assert (got.items, got.route, got.emb, got.hidden, got.depth) == \
                    (want.items, want.route, want.emb, want.hidden, want.depth), (h, route)
                assert close(got.scores, want.scores)
                if route is None:
                    routes.add(got.route)
    assert len(routes) > 1, "the router should pick several routes"
    assert crec.recommend(hs[:3], k=3) == [crec.recommend(h, k=3) for h in hs[:3]]
    with pytest.raises(ValueError, match="k must be in 1..8"):
        crec.recommend([1, 2], k=K + 1)
    with pytest.raises(ValueError, match=r"history\[1\] = 0"):
        crec.recommend([1, 0])


def test_compiled_package_serves_the_rungs(tmp_path):
    """A model consolidated into rungs, saved, exported and compiled: the
    package serves every user on its rung, as the Python API does, with
    rungs set apart from the router's own argmax."""
    model = tiny_model(seed=2, rungs=2)
    hs = histories(40, seed=5)
    items, lengths = pad_right([h[-model.cfg.max_len:] for h in hs], model.cfg.max_len)
    model.consolidate([(items, lengths)])
    model.rung_routes.copy_(torch.tensor([3, 0]))     # the costly route for the cheap group
    rec = Recommender.load(save_run(model, tmp_path / "run"))
    path = str(tmp_path / "model.pt2")
    assert serving.main(["export", "--ckpt", str(tmp_path / "run"), "--out", path,
                         "-k", str(K), "--variant", "plain"]) == 0
    crec = CompiledRecommender(path)
    routes = []
    for h in requests():
        want, got = rec.recommend(h, k=K), crec.recommend(h, k=K)
        assert (got.items, got.route) == (want.items, want.route), h
        assert close(got.scores, want.scores)
        routes.append(got.route)
    assert set(routes) == {0, 3}


def test_compiled_package_serves_threads(served):
    _, path = served
    crec = CompiledRecommender(path)
    hs = requests()
    want = [crec.recommend(h, k=5) for h in hs]
    got = {}

    def client(i):
        for rep in range(4):
            for j, h in enumerate(hs):
                got[(i, rep, j)] = crec.recommend(h, k=5)

    assert not run_threads(4, client)
    assert all(r == want[j] for (_, _, j), r in got.items())


def test_serving_command(served, capsys):
    rec, path = served
    hs = requests()[:2]
    args = ["recommend", "--package", path, "-k", "4", "--json"]
    for h in hs:
        args += ["--seq", " ".join(map(str, h))]
    assert serving.main(args) == 0
    out = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [o["items"] for o in out] == [rec.recommend(h, k=4).items for h in hs]
    assert serving.main(["recommend", "--package", path, "--seq", "1 99"]) == 2
    assert "item ids must be in 1..60" in capsys.readouterr().err


# ------------------------------------------------------------------ C++ --

def _cmake_args(build):
    args = ["-S", os.path.join(ROOT, "examples", "cpp_serving"), "-B", build,
            "-DCMAKE_BUILD_TYPE=Release",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if shutil.which("ninja"):
        args += ["-G", "Ninja"]
    if torch.version.cuda is not None:
        # as .ci/cmake_check.sh: torch's CMake config wants a CUDA toolkit and
        # an nvrtc (the one of torch's nvidia wheels when the toolkit has none)
        cuda = os.environ.get("CUDA_HOME", "/usr/local/cuda")
        if not os.path.exists(os.path.join(cuda, "bin", "nvcc")):
            pytest.skip(f"torch is a CUDA build and its CMake config needs a CUDA "
                        f"toolkit; no nvcc under {cuda} (set CUDA_HOME)")
        args += [f"-DCUDA_TOOLKIT_ROOT_DIR={cuda}",
                 f"-DCMAKE_CUDA_COMPILER={os.path.join(cuda, 'bin', 'nvcc')}"]
        site = os.path.dirname(os.path.dirname(torch.__file__))
        hits = sorted(h for pat in ("nvidia/*/lib/libnvrtc.so*", "nvidia/*/*/lib/libnvrtc.so*")
                      for h in glob.glob(os.path.join(site, pat))
                      if "builtins" not in h and ".alt." not in h)
        if not hits and os.path.exists(os.path.join(cuda, "lib64", "libnvrtc.so")):
            hits = [os.path.join(cuda, "lib64", "libnvrtc.so")]
        if hits:
            args.append(f"-DCUDA_nvrtc_LIBRARY={hits[0]}")
    return args


@pytest.fixture(scope="module")
def canet_serve():
    """Path of the built example (configured and built here when needed)."""
    given = os.environ.get("CANET_SERVE_BIN")
    if given:
        return given
    missing = [t for t in ("cmake",) if not shutil.which(t)]
    if not (shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")):
        missing.append("a C++ compiler")
    if missing:
        pytest.skip(f"the C++ serving example needs {' and '.join(missing)}")
    env = dict(os.environ, CUDA_HOME=os.environ.get("CUDA_HOME", "/usr/local/cuda"))
    build, binary = _kept_cmake_check_build()
    if build is None:
        build = os.environ.get("CANET_CPP_BUILD_DIR",
                               os.path.join(ROOT, "build", "cpp_serving"))
        binary = os.path.join(build, "canet_serve")
    t0 = time.perf_counter()
    if not os.path.exists(os.path.join(build, "CMakeCache.txt")):
        res = subprocess.run(["cmake"] + _cmake_args(build), capture_output=True,
                             text=True, env=env)
        assert res.returncode == 0, f"cmake configure failed:\n{res.stdout}\n{res.stderr}"
    jobs = os.environ.get("MAX_JOBS", "2")
    res = subprocess.run(["cmake", "--build", build, "-j", jobs, "--target", "canet_serve"],
                         capture_output=True, text=True, env=env)
    assert res.returncode == 0, f"cmake build failed:\n{res.stdout[-4000:]}\n{res.stderr}"
    print(f"canet_serve built in {time.perf_counter() - t0:.1f} s ({build})")
    return binary


def _kept_cmake_check_build():
    """(build dir, binary) of a build `.ci/cmake_check.sh` kept with
    CANET_CMAKE_BUILD_DIR and CANET_BUILD_EXAMPLES=ON, else (None, None)."""
    build = os.environ.get("CANET_CMAKE_BUILD_DIR")
    if not build:
        return None, None
    try:
        with open(os.path.join(build, "CMakeCache.txt")) as f:
            on = any(line.strip() == "CANET_BUILD_EXAMPLES:BOOL=ON" for line in f)
    except OSError:
        return None, None
    return (build, os.path.join(build, "examples", "cpp_serving", "canet_serve")) if on \
        else (None, None)


def _serve(binary, package, lines, *flags):
    res = subprocess.run([binary, package, "--json", "--threads", "1", *flags],
                         input="".join(line + "\n" for line in lines),
                         capture_output=True, text=True, timeout=300)
    return res.returncode, [json.loads(x) for x in res.stdout.splitlines()], res.stderr


def test_cpp_example_matches_python(served, canet_serve):
    rec, path = served
    hs = requests()
    for flags, kw in [((), {}), (("-k", "3"), {"k": 3}),
                      (("--route", "2", "--keep-seen"), {"route": 2, "exclude_seen": False})]:
        rc, out, err = _serve(canet_serve, path, [" ".join(map(str, h)) for h in hs], *flags)
        assert rc == 0, err
        assert len(out) == len(hs)
        for h, o in zip(hs, out):
            want = rec.recommend(h, **dict({"k": K}, **kw))
            assert (o["items"], o["route"], o["emb"], o["hidden"], o["depth"]) == \
                (want.items, want.route, want.emb, want.hidden, want.depth), (h, flags)
            assert close(o["scores"], want.scores)
    # one history from argv
    res = subprocess.run([canet_serve, path, "--json", *map(str, hs[0])],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0
    assert json.loads(res.stdout)["items"] == rec.recommend(hs[0], k=K).items


def test_cpp_example_rejects_bad_histories(served, canet_serve):
    _, path = served
    rc, out, err = _serve(canet_serve, path, ["3 4", "", "5 0", "2 x", "7 61"])
    assert rc == 2
    assert [("error" in o) for o in out] == [False, True, True, True, True]
    assert "line 2: the history is empty" in err
    assert "line 3: history[1] = 0: item ids must be in 1..60" in err
    assert "line 4: history[1] = 'x' is not an integer item id" in err
    assert "line 5: history[1] = 61" in err
    res = subprocess.run([canet_serve, path, "--route", "99", "1"], capture_output=True,
                         text=True, timeout=300)
    assert res.returncode == 2 and "--route must be a route id in 0..7" in res.stderr
