"""Data loaders (CIFAR-10 tarball in the official format, folders, shapes), per-seed noise, grids and
FID/IS through clean-fid's own API with a small stand-in feature network (no Inception offline)."""
import hashlib
import io
import os
import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

import common as C
import runtime as R

def _make_cifar_tarball(path, n_per_batch=20):
    """A tarball laid out like cifar-10-python.tar.gz: cifar-10-batches-py/data_batch_{1..5}, test_batch."""
    rng = np.random.default_rng(0)
    batches = {}
    with tarfile.open(path, "w:gz") as tar:
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta"]:
            data = rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8)
            labels = list(rng.integers(0, 10, n_per_batch))
            obj = {b"data": data, b"labels": labels} if name != "batches.meta" else {}
            batches[name] = data
            blob = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return batches

def test_cifar10_official_format(tmp_path, monkeypatch):
    batches = _make_cifar_tarball(tmp_path / "cifar-10-python.tar.gz")
    md5 = hashlib.md5((tmp_path / "cifar-10-python.tar.gz").read_bytes()).hexdigest()
    monkeypatch.setattr(R, "CIFAR10_MD5", md5)
    train = R.load_dataset("cifar10", data_dir=str(tmp_path))
    assert train.shape == (100, 3, 32, 32) and train.dtype == torch.uint8
    expected = np.concatenate([batches[f"data_batch_{i}"] for i in range(1, 6)]).reshape(-1, 3, 32, 32)
    assert np.array_equal(train.numpy(), expected)
    test, _ = R.load_cifar10(str(tmp_path), split="test")
    assert np.array_equal(test.numpy(), batches["test_batch"].reshape(-1, 3, 32, 32))

def test_cifar10_offline_and_corrupt_errors_are_one_line(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError("network unreachable")
    monkeypatch.setattr(R.urllib.request, "urlopen", refuse)
    with pytest.raises(ValueError) as e:
        R.load_dataset("cifar10", data_dir=str(tmp_path))
    assert "cifar-10-python.tar.gz" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(b"not a tarball")  # placed by hand: read, refused
    with pytest.raises(ValueError, match="not the CIFAR-10 python tarball.*delete it to download it again"):
        R.load_dataset("cifar10", data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="32x32"):
        R.load_dataset("cifar10", image_size=64, data_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown dataset 'cifar100'"):
        R.load_dataset("cifar100")

def test_folder_dataset_crops_and_resizes(tmp_path):
    rng = np.random.default_rng(0)
    for i, size in enumerate([(40, 30), (64, 64), (20, 50)]):
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(tmp_path / f"{i}.png")
    (tmp_path / "notes.txt").write_text("ignored")
    data = R.load_dataset(f"folder:{tmp_path}", image_size=16)
    assert data.shape == (3, 3, 16, 16) and data.dtype == torch.uint8
    with pytest.raises(ValueError, match="no such folder"):
        R.load_dataset(f"folder:{tmp_path / 'missing'}", image_size=16)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        R.load_dataset(f"folder:{tmp_path / 'empty'}", image_size=16)
    (tmp_path / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="broken.png is not a readable image"):
        R.load_dataset(f"folder:{tmp_path / 'empty'}", image_size=16)

def test_shapes_is_deterministic_per_image():
    a, b = R.make_shapes(6, 16, seed=3), R.make_shapes(6, 16, seed=3)
    assert torch.equal(a, b)
    assert torch.equal(R.make_shapes(2, 16, seed=3), a[:2])           # image i depends only on (seed, i)
    assert not torch.equal(R.make_shapes(6, 16, seed=4), a)
    assert R.make_shapes(3, 32).shape == (3, 3, 32, 32)
    assert a.float().std() > 20                                       # not blank

def test_sample_batch_is_in_range_and_flips():
    data = R.make_shapes(8, 8)
    g = torch.Generator().manual_seed(0)
    x, y = R.sample_batch(data, 64, g)
    assert x.shape == (64, 3, 8, 8) and x.min() >= -1 and x.max() <= 1 and y is None
    originals = C.to_float(data)
    flipped = sum(any(torch.equal(xi, o.flip(2)) and not torch.equal(xi, o) for o in originals) for xi in x)
    assert 10 < flipped < 54

def test_uint8_round_trip():
    u = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16).expand(1, 3, 16, 16)
    assert torch.equal(C.to_uint8(C.to_float(u)), u)

def test_seeded_noise_is_independent_of_batching():
    fn = lambda z, seeds: z.tanh()
    a = R.generate(fn, list(range(10)), (3, 4, 4), batch_size=3, device="cpu")
    b = R.generate(fn, list(range(10)), (3, 4, 4), batch_size=7, device="cpu")
    assert torch.equal(a, b)
    assert torch.equal(C.seeded_noise([5], (3, 4, 4))[0], C.seeded_noise([1, 5], (3, 4, 4))[1])

def test_sample_to_folder_resumes_and_writes_atomically(tmp_path, monkeypatch):
    calls = []
    fn = lambda z, seeds: (calls.append(list(seeds)), z.clamp(-1, 1))[1]
    real_save = R.save_png

    def crash_on_third(image, path, count=[0]):
        count[0] += 1
        if count[0] == 3:
            raise KeyboardInterrupt
        real_save(image, path)
    monkeypatch.setattr(R, "save_png", crash_on_third)
    with pytest.raises(KeyboardInterrupt):
        R.sample_to_folder(fn, 6, str(tmp_path), (3, 8, 8), 4, "cpu")
    monkeypatch.setattr(R, "save_png", real_save)
    assert sorted(os.listdir(tmp_path)) == ["000000.png", "000001.png"]       # no half-written third file
    R.sample_to_folder(fn, 6, str(tmp_path), (3, 8, 8), 4, "cpu")            # only 2..5 are new
    assert len(os.listdir(tmp_path)) == 6 and calls[1:] == [[2, 3, 4, 5]]
    img = np.asarray(Image.open(tmp_path / "000003.png"))
    want = C.to_uint8(C.seeded_noise([3], (3, 8, 8)).clamp(-1, 1))[0].permute(1, 2, 0).numpy()
    assert np.array_equal(img, want)

def test_write_pngs_once(tmp_path):
    images = R.make_shapes(3, 8)
    folder = R.write_pngs(images, str(tmp_path / "ref"))
    assert sorted(os.listdir(folder)) == ["000000.png", "000001.png", "000002.png"]
    png = np.asarray(Image.open(os.path.join(folder, "000002.png")))
    assert np.array_equal(png, images[2].permute(1, 2, 0).numpy())
    R.write_pngs(R.make_shapes(5, 8), folder)                       # already complete: left alone
    assert len(os.listdir(folder)) == 3

def test_save_grid(tmp_path):
    R.save_grid(torch.zeros(10, 3, 8, 8), str(tmp_path / "g.png"), nrow=4)
    assert Image.open(tmp_path / "g.png").size == (4 * 9 + 1, 3 * 9 + 1)

class StandIn:
    """A small fixed feature network with Inception's interface: 64-d features of images in [0, 255]
    (clean-fid resizes to 299 first in 'clean' mode), and 10-way softmax 'class' probabilities."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(64, 3 * 8 * 8, generator=g) / 50
        self.c = torch.randn(10, 3 * 8 * 8, generator=g) / 50

    def _flat(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x / 255, 8).flatten(1)

    def features(self, x, mode):
        return self._flat(x) @ self.w.T

    def probs(self, x):
        return torch.softmax(self._flat(x) @ self.c.T * 20, 1)

def _write_pngs(folder, images):
    os.makedirs(folder, exist_ok=True)
    for i, im in enumerate(images):
        Image.fromarray(im.permute(1, 2, 0).numpy()).save(os.path.join(folder, f"{i:06d}.png"))

def test_fid_is_through_clean_fid_with_stand_in(tmp_path):
    shapes = R.make_shapes(200, 16, seed=0)
    _write_pngs(tmp_path / "ref", shapes[:100])
    _write_pngs(tmp_path / "same", shapes[100:])
    noise = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (100, 3, 16, 16), dtype=np.uint8))
    _write_pngs(tmp_path / "noise", noise)
    det = StandIn()
    same, far = (R.fid_is(str(tmp_path / name), "shapes", inception=det, ref_folder=str(tmp_path / "ref"),
                          batch_size=50) for name in ("same", "noise"))
    assert set(same) == {"fid", "fid_clean", "is", "is_std"}
    assert far["fid"] > 5 * same["fid"] and far["fid_clean"] > 5 * same["fid_clean"]
    assert 1.0 <= same["is"] <= 10.0
    _write_pngs(tmp_path / "first40", shapes[100:140])
    first40 = R.fid_is(str(tmp_path / "first40"), "shapes", inception=det, ref_folder=str(tmp_path / "ref"))
    assert R.fid_is(str(tmp_path / "same"), "shapes", inception=det, ref_folder=str(tmp_path / "ref"),
                    is_samples=40)["is"] == pytest.approx(first40["is"], rel=1e-9)
    with pytest.raises(ValueError, match="reference images"):
        R.fid_is(str(tmp_path / "same"), "shapes", inception=det, modes=("clean",))

def test_inception_score_limits():
    uniform = np.full((100, 10), 0.1)
    assert R.inception_score(uniform)[0] == pytest.approx(1.0)
    onehot = np.eye(10)[np.arange(100) % 10]
    assert R.inception_score(onehot, splits=1)[0] == pytest.approx(10.0, rel=1e-6)

def test_inception_score_of_the_first_n_images_over_shares():
    """DSD's IS on the first 5k of its 30k FID samples: ranks' shares of all the images, each summing only its
    images below n, give the IS of images 0 .. n-1 exactly (float64 sums in another order: 1e-12)."""
    probs = np.random.default_rng(0).dirichlet(np.full(10, 0.3), 100)
    shares = [(0, probs[:37]), (37, probs[37:74]), (74, probs[74:])]  # 3 ranks; the last has none below 50
    sums = [sum(parts) for parts in zip(*(R._is_sums(p, first, 50, 5) for first, p in shares))]
    assert R._is_from_sums(*sums) == pytest.approx(R.inception_score(probs[:50], splits=5), rel=1e-12)
    assert R._is_from_sums(*sums)[0] != pytest.approx(R.inception_score(probs, splits=5)[0], rel=1e-3)

def test_frechet_distance_closed_form_and_newest_scipy(monkeypatch):
    """Diagonal covariances: ||mu1 - mu2||^2 + sum (sqrt(a) - sqrt(b))^2. scipy 1.18's sqrtm has no `disp`
    (clean-fid 0.1.35 passes it): ours must not pass it either."""
    import scipy.linalg
    real = scipy.linalg.sqrtm
    monkeypatch.setattr(scipy.linalg, "sqrtm", lambda A: real(A))
    a, b = np.array([1.0, 4.0, 0.25]), np.array([9.0, 1.0, 0.25])
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    want = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert R.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-9)

def test_fid_of_cifar10_against_a_statistics_file_offline(tmp_path):
    shapes = R.make_shapes(60, 16, seed=1)
    _write_pngs(tmp_path / "gen", shapes)
    det = StandIn()
    feats = torch.cat([det.features(s[None].float(), "legacy_tensorflow") for s in shapes]).double().numpy()
    np.savez(tmp_path / "stats.npz", mu=feats.mean(0), sigma=np.cov(feats, rowvar=False))
    out = R.fid_is(str(tmp_path / "gen"), "cifar10", inception=det, stats=str(tmp_path / "stats.npz"),
                   batch_size=20)
    assert abs(out["fid"]) < 1e-6 and "fid_clean" not in out

def test_missing_inception_weights_error_is_one_line(tmp_path, monkeypatch):
    def refuse(*a, **k):
        raise OSError("no network")
    monkeypatch.setattr(R.urllib.request, "urlopen", refuse)
    with pytest.raises(ValueError) as e:
        R.Inception(str(tmp_path / "inception-2015-12-05.pt"))
    assert "--inception" in str(e.value) and "\n" not in str(e.value)
