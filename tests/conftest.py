"""Shared test set-up: one cache directory (teachers trained once, data, hub files) per checkout, so the
shapes teacher is trained once per machine and reused by every test file."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DISTILL_CACHE", os.path.join(ROOT, ".cache", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ROOT)


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
