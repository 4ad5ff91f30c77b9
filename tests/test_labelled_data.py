"""Labels for class-conditional models (issue 30): each dataset's labels from small files in the real formats
(CIFAR-10's tarball, an ILSVRC2012 class tree, Chrabaszcz et al.'s downsampled-ImageNet batches, an LSUN
export), the official pipelines' crops and resizes, sample_batch's labels, one-line errors, and FID against a
--fid-stats .npz of mu/sigma or of images (arr_0) for any dataset."""
import hashlib
import os
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

import common as C
import runtime as R
import standins

@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A CACHE_DIR of this test's own (decoded datasets, FID statistics)."""
    monkeypatch.setattr(R, "CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"

def _save(path, hwc, fmt="PNG"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(hwc).save(path, format=fmt, quality=95)

def _decoded(path):
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float64)

def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)

def test_shapes_labels_are_the_top_shape_and_leave_the_images_as_they_were():
    images, labels = R.load_dataset("shapes", 16, n_shapes=200, labels=True)
    # sha256 of make_shapes(200, 16, 0) before labels existed (commit 4ab6ebb): cached teachers learnt them
    assert hashlib.sha256(images.numpy().tobytes()).hexdigest() == \
        "c5e6967a9ba96b08920495db1229a1b9317b0a257e189ee300db13bcc70e9538"
    assert torch.equal(images, R.load_dataset("shapes", 16, n_shapes=200))
    assert labels.dtype == torch.int64 and labels.bincount().tolist() == [75, 54, 71]   # 200 in 3 classes
    # the first twelve, checked by eye at 64x64: the kind (0 circle, 1 square, 2 triangle) of the shape on
    # top; the draws do not depend on the size
    assert labels[:12].tolist() == [2, 0, 0, 2, 2, 0, 0, 1, 2, 0, 2, 2]
    assert torch.equal(R.make_shapes(12, 64, labels=True)[1], labels[:12])
    assert R.dataset_classes("shapes") == 3

def test_cifar10_labels_from_the_official_tarball(tmp_path, monkeypatch):
    path = standins.cifar10_tarball(str(tmp_path / "cifar-10-python.tar.gz"), n_per_batch=8)
    monkeypatch.setattr(R, "CIFAR10_MD5", hashlib.md5(open(path, "rb").read()).hexdigest())
    images, labels = R.load_dataset("cifar10", data_dir=str(tmp_path), labels=True)
    assert torch.equal(images, R.make_shapes(48, 32)[:40])                  # data_batch_1..5, in order
    assert labels.tolist() == [i % 10 for i in range(8)] * 5 and labels.dtype == torch.int64
    assert torch.equal(R.load_cifar10(str(tmp_path), "test")[1], torch.arange(8))
    assert R.dataset_classes("cifar10") == 10

def test_folder_labels_from_class_subfolders(tmp_path):
    for name, seed in (("b/0.png", 0), ("a/1.png", 1), ("a/deeper/2.png", 2), ("c/3.png", 3)):
        _save(str(tmp_path / "tree" / name), _rgb(20, 30, seed))
    images, labels = R.load_dataset(f"folder:{tmp_path / 'tree'}", 16, labels=True)
    # sorted files: a/1, a/deeper/2, b/0, c/3; the class is the first-level folder, sorted: a 0, b 1, c 2
    assert labels.tolist() == [0, 0, 1, 2] and images.shape == (4, 3, 16, 16)
    assert R.dataset_classes(f"folder:{tmp_path / 'tree'}") == 3
    _save(str(tmp_path / "tree" / "loose.png"), _rgb(20, 30, 4))           # one image outside a class folder
    images, labels = R.load_dataset(f"folder:{tmp_path / 'tree'}", 16, labels=True)
    assert labels is None and len(images) == 5 and R.dataset_classes(f"folder:{tmp_path / 'tree'}") is None

def test_imagenet64_class_tree_central_square_and_area_resize(tmp_path, cache, monkeypatch):
    tree = tmp_path / "train"
    _save(str(tree / "n03000000" / "a.JPEG"), _rgb(192, 128, 0), "JPEG")   # portrait: rows 32..160, 2x2 means
    _save(str(tree / "n01000000" / "b.JPEG"), _rgb(127, 192, 1), "JPEG")   # landscape, odd: columns 33..160
    _save(str(tree / "n02000000" / "c.JPEG"), _rgb(64, 64, 2), "JPEG")
    _save(str(tree / "n01000000" / "d.JPEG"), _rgb(70, 80, 3), "JPEG")
    images, labels = R.load_dataset(f"imagenet64:{tree}", labels=True)         # n01/b, n01/d, n02/c, n03/a
    assert images.shape == (4, 3, 64, 64) and images.dtype == torch.uint8
    assert labels.tolist() == [0, 0, 1, 2] and R.dataset_classes(f"imagenet64:{tree}") == 3  # sorted wnids
    # the square (offset h // 2 - w // 2, GR-PD's central_square_crop) and TF's area resize: integer factor
    a = _decoded(tree / "n01000000" / "b.JPEG")
    square = _decoded(tree / "n03000000" / "a.JPEG")[32:160]
    want = np.rint(square.reshape(64, 2, 64, 2, 3).mean((1, 3))).transpose(2, 0, 1)
    assert np.abs(images[3].numpy() - want).max() <= 1                     # float32 sums vs float64 means
    w = R.tf_resize_weights(127, 64, "area")
    area = lambda sq: np.rint(np.einsum("ih,hwc,jw->cij", w, sq, w))
    assert np.abs(images[0].numpy() - area(a[:, 33:160])).max() <= 1
    assert np.abs(images[0].numpy() - area(a[:, 32:159])).max() > 5       # (w - h) // 2 would be another crop
    assert torch.equal(images[2], torch.from_numpy(_decoded(tree / "n02000000" / "c.JPEG")).permute(2, 0, 1)
                       .to(torch.uint8))                                   # already 64x64: unchanged
    # decoded once: the next load reads the cached array, memory-mapped
    monkeypatch.setattr(R, "read_images", lambda *a: pytest.fail("decoded again"))
    again, labels_again = R.load_dataset(f"imagenet64:{tree}", labels=True)
    assert torch.equal(again, images) and torch.equal(labels_again, labels)
    assert len(list((cache / "data").glob("imagenet64_*.npy"))) == 1

def test_tf_area_weights_count_partly_covered_pixels_by_their_share():
    """TF's ResizeArea of 3 pixels to 2: (p0 + p1 / 2) / 1.5 and (p1 / 2 + p2) / 1.5. PIL's BOX gives
    (p0 + p1) / 2 and p2 (it counts a pixel by its centre), hence the weights of our own."""
    assert np.allclose(R.tf_resize_weights(3, 2, "area"), [[2 / 3, 1 / 3, 0], [0, 1 / 3, 2 / 3]])
    box = np.asarray(Image.fromarray(np.array([[0, 90, 180]], np.uint8)).resize((2, 1), Image.BOX))
    assert box.tolist() == [[45, 180]] and (R.tf_resize_weights(3, 2, "area") @ [0, 90, 180]).tolist() == \
        pytest.approx([30, 150])

def _chrabaszcz(path, hwc, labels):
    """A downsampled-ImageNet file: data rows planar (R, G, B planes of 64x64), labels 1..1000."""
    data = hwc.transpose(0, 3, 1, 2).reshape(len(hwc), -1)
    if path.endswith(".npz"):
        np.savez(path, data=data, labels=np.array(labels), mean=data.mean(0))
    else:
        with open(path, "wb") as f:
            pickle.dump({"data": data, "labels": list(labels), "mean": data.mean(0)}, f)

def test_imagenet64_chrabaszcz_batches_pickled_and_npz(tmp_path, cache):
    hwc = np.zeros((5, 64, 64, 3), dtype=np.uint8)
    hwc[0, 1, 2] = (255, 0, 0)                                             # image 0, row 1, column 2: red
    hwc[4, 3, 5] = (0, 0, 200)                                             # image 4, row 3, column 5: blue
    folder = tmp_path / "imagenet64"
    folder.mkdir()
    _chrabaszcz(str(folder / "train_data_batch_1"), hwc[:2], [1, 1000])
    _chrabaszcz(str(folder / "train_data_batch_2.npz"), hwc[2:4], [7, 8])
    _chrabaszcz(str(folder / "train_data_batch_10"), hwc[4:], [500])      # after 2, not after 1
    (folder / "val_data").write_bytes(b"not read")
    images, labels = R.load_dataset(f"imagenet64:{folder}", 64, labels=True)
    assert labels.tolist() == [0, 999, 6, 7, 499]
    assert images[0, :, 1, 2].tolist() == [255, 0, 0] and images[4, :, 3, 5].tolist() == [0, 0, 200]
    assert torch.equal(images, torch.from_numpy(hwc).permute(0, 3, 1, 2))
    assert R.dataset_classes(f"imagenet64:{folder}") == 1000

def test_lsun_central_square_and_antialiased_bilinear(tmp_path, cache):
    rgb = _rgb(256, 320, 0)
    _save(str(tmp_path / "bedroom" / "0001.webp"), rgb, "WEBP")            # the official export's format
    _save(str(tmp_path / "bedroom" / "sub" / "0002.png"), _rgb(300, 200, 1))
    images, labels = R.load_dataset(f"lsun:{tmp_path / 'bedroom'}", labels=True)
    assert images.shape == (2, 3, 128, 128) and labels is None      # 128x128 by default, unlabelled
    assert R.dataset_classes(f"lsun:{tmp_path / 'bedroom'}") is None
    # TF's antialiased bilinear halving: the kernel (1, 3, 3, 1) / 8; PIL's BILINEAR the same in fixed point
    assert np.allclose(R.tf_resize_weights(256, 128, "bilinear")[5, 9:13], [1 / 8, 3 / 8, 3 / 8, 1 / 8])
    square = Image.open(tmp_path / "bedroom" / "0001.webp").convert("RGB").crop((32, 0, 288, 256))
    pil = np.asarray(square.resize((128, 128), Image.BILINEAR)).transpose(2, 0, 1).astype(int)
    assert np.abs(images[0].numpy() - pil).max() <= 1

def test_sample_batch_labels_belong_to_the_images_drawn():
    data = R.make_shapes(16, 8)
    labels = torch.arange(16) * 7                                           # a label that names its image
    x, y = R.sample_batch(data, 64, torch.Generator().manual_seed(0), labels)
    assert y.dtype == torch.int64 and y.shape == (64,) and y.device == x.device
    for xi, yi in zip(x, y.tolist()):
        original = C.to_float(data[yi // 7])
        assert torch.equal(xi, original) or torch.equal(xi, original.flip(2))
    x_alone, y_alone = R.sample_batch(data, 64, torch.Generator().manual_seed(0))
    assert torch.equal(x_alone, x) and y_alone is None                     # labels change no draw

@pytest.mark.parametrize("name, size, match", [
    ("imagenet64:{batches}", 32, r"imagenet64 images are 64x64, not 32: pass --image-size 64"),
    ("imagenet64:{empty}", None, r"no images .* found below"),
    ("lsun:{empty}", None, r"no images .* found below"),
    ("imagenet64:{loose}", None, r"expected class subfolders .* found images directly in it"),
    ("imagenet64:{labels0}", None, r"train_data_batch_1: labels 0..3 outside 1..1000 .*1-indexed"),
    ("imagenet64:{labels1001}", None, r"labels 1..1001 outside 1..1000"),
    ("imagenet64:{small}", None, r"expected uint8 \(N, 12288\)"),
    ("imagenet64:{tmp}/missing", None, r"no such folder"),
    ("imagenet64", None, r"unknown dataset 'imagenet64': expected cifar10, shapes, folder:PATH"),
    ("lsun:", None, r"unknown dataset"),
])
def test_data_errors_are_one_line(tmp_path, cache, name, size, match):
    for folder in ("batches", "empty", "loose", "labels0", "labels1001", "small"):
        (tmp_path / folder).mkdir()
    blank = np.zeros((2, 64, 64, 3), dtype=np.uint8)
    _chrabaszcz(str(tmp_path / "batches" / "train_data_batch_1"), blank, [1, 2])
    _chrabaszcz(str(tmp_path / "labels0" / "train_data_batch_1"), blank, [0, 3])
    _chrabaszcz(str(tmp_path / "labels1001" / "train_data_batch_1.npz"), blank, [1, 1001])
    np.savez(tmp_path / "small" / "train_data_batch_1.npz", data=np.zeros((2, 3072), np.uint8), labels=[1, 2])
    _save(str(tmp_path / "loose" / "x.JPEG"), _rgb(8, 8, 0), "JPEG")
    name = name.format(tmp=tmp_path, **{f: tmp_path / f for f in ("batches", "empty", "loose", "labels0",
                                                                     "labels1001", "small")})
    with pytest.raises(ValueError, match=match) as e:
        R.load_dataset(name, size, labels=True)
    assert "\n" not in str(e.value)
    assert not list(cache.glob("data/*"))                                  # nothing half-made in the cache

def _fid_files(tmp_path):
    """Generated images as PNGs, the stand-in Inception's file, and its features of those images."""
    images = R.make_shapes(60, 16, seed=1)
    R.write_pngs(images, str(tmp_path / "gen"))
    inception = standins.inception(str(tmp_path / "inception.pt"))
    f = R.Inception(inception).features(images.float(), "legacy_tensorflow").double().numpy()
    return images, inception, f

def test_fid_against_stats_with_mu_sigma_for_any_dataset(tmp_path, cache):
    images, inception, f = _fid_files(tmp_path)
    np.savez(tmp_path / "stats.npz", mu=f.mean(0), sigma=np.cov(f, rowvar=False))
    R.prepare_fid("lsun:anything", inception, str(tmp_path / "stats.npz"))
    out = R.fid_is(str(tmp_path / "gen"), "lsun:anything", inception=inception,
                   stats=str(tmp_path / "stats.npz"), batch_size=20)
    assert abs(out["fid"]) < 1e-6 and "fid_clean" not in out               # TF-Inception statistics: one mode
    # ADM's batches hold both: mu and sigma serve the TF mode, the images (arr_0) the clean one
    np.savez(tmp_path / "adm.npz", arr_0=images.permute(0, 2, 3, 1).numpy(), mu=f.mean(0) + 1,
             sigma=np.cov(f, rowvar=False))
    out = R.fid_is(str(tmp_path / "gen"), "imagenet64:x", inception=inception,
                   stats=str(tmp_path / "adm.npz"), batch_size=20)
    assert out["fid"] == pytest.approx(64.0, abs=1e-5) and abs(out["fid_clean"]) < 1e-6   # ||1||^2 in 64-d
    with pytest.raises(ValueError, match="needs a folder of reference images or --fid-stats"):
        R.fid_is(str(tmp_path / "gen"), "lsun:x", inception=inception)

def test_fid_against_images_only_stats_computes_and_caches_them(tmp_path, cache, monkeypatch):
    images, inception, _ = _fid_files(tmp_path)
    np.savez(tmp_path / "ref.npz", arr_0=images.permute(0, 2, 3, 1).numpy())  # an ADM batch without stats
    R.prepare_fid("imagenet64:x", inception, str(tmp_path / "ref.npz"))
    fid = lambda: R.fid_is(str(tmp_path / "gen"), "imagenet64:x", inception=inception,
                           stats=str(tmp_path / "ref.npz"), batch_size=20)
    out = fid()
    assert abs(out["fid"]) < 1e-6 and abs(out["fid_clean"]) < 1e-6          # the same images: both modes
    assert len(list(cache.glob("fid_stats/ref_*_legacy_tensorflow_*.npz"))) == 1
    scored, real = [], R._scored
    monkeypatch.setattr(R, "_scored", lambda files, *a: scored.append(len(files)) or real(files, *a))
    R._REFERENCE.clear()                                                    # as a new run: statistics on disk
    assert fid() == out and scored == [60, 60]                              # the generated ones, per mode

@pytest.mark.parametrize("content, match", [
    (None, r"no such file"),
    (b"not a zip", r"not an \.npz"),
    ({"features": np.zeros(3)}, r"holds features; expected mu and sigma .* or arr_0"),
])
def test_fid_stats_errors_are_one_line(tmp_path, content, match):
    path = tmp_path / "stats.npz"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        np.savez(path, **content)
    with pytest.raises(ValueError, match=match) as e:
        R.stats_modes(str(path))
    assert "\n" not in str(e.value)
