"""Shared test set-up: one cache directory (teachers trained once, data, hub files) per checkout, so the
shapes teacher is trained once per machine and reused by every test file."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DISTILL_CACHE", os.path.join(ROOT, ".cache", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
WORKER = os.environ.get("PYTEST_XDIST_WORKER")  # pytest -n 2 (pytest.ini): one thread per worker process
if WORKER:
    os.environ["OMP_NUM_THREADS"] = "1"  # and in the subprocesses it starts
sys.path.insert(0, ROOT)

import torch  # noqa: E402 (after the cache and thread settings)

import runtime as R  # noqa: E402

if WORKER:
    torch.set_num_threads(1)

@pytest.fixture(scope="session", autouse=True)
def teachers_side_by_side(worker_id):
    """The cached teachers take a third of a fresh clone's suite. Under pytest -n 2 worker gw0 trains the shared
    eps teacher, gw1 the class-conditional eps teacher and then progressive's --quick base model, side by side;
    a test of the other worker that needs one before it is done waits on the cache's lock
    (runtime.cached_teacher). The order follows --dist worksteal's split into two contiguous halves:
    test_conditional comes early in the first, test_progressive's --quick run (the base model's one user) in
    the second. With the base model first, a worker waited for the conditional teacher: a fresh clone's suite
    took 1038 s, in this order 868 s and 824 s (2 cores)."""
    if worker_id == "gw0":
        R.cached_teacher()
    elif worker_id == "gw1":
        import progressive as P
        R.cached_teacher(R.TeacherConfig(class_cond=True))
        R.cached_teacher(P.base_config(R.parse_config(P.Config, ["--quick"], quick=P.QUICK)))

@pytest.fixture
def kill_on_call(monkeypatch):
    """kill_on_call(module, name, n): module.name raises KeyboardInterrupt on its n-th call, a run killed
    mid-way; returns the function that puts the real one back (for the resumed run)."""
    def arm(module, name, n):
        real, calls = getattr(module, name), [0]

        def killed(*args, **kwargs):
            calls[0] += 1
            if calls[0] == n:
                raise KeyboardInterrupt("killed")
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, killed)
        return lambda: monkeypatch.setattr(module, name, real)
    return arm
