"""Shared test set-up: one cache directory (teachers trained once, data, hub files) per checkout, so the
shapes teacher is trained once per machine and reused by every test file."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DISTILL_CACHE", os.path.join(ROOT, ".cache", "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, ROOT)
