"""The files a user would have in their default places, made small and offline, for the rehearsals of the
README's commands: an Inception TorchScript file with the real one's interface, clean-fid's CIFAR-10
statistics, CIFAR-10 as a tarball in the official format, a diffusers teacher in the hub cache's layout.
user_cache(folder) lays them all out under one DISTILL_CACHE (the cached shapes teachers linked in)."""
import io
import json
import os
import pickle
import tarfile

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import runtime as R

class _Layers(nn.Module):
    """Inception's `layers`: (B, 3, 299, 299) in [-1, 1] -> pooled features (B, 64, 1, 1)."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w, requires_grad=False)

    def forward(self, x):
        return (F.adaptive_avg_pool2d(x, 8).flatten(1) @ self.w.T)[:, :, None, None]

class InceptionStandIn(nn.Module):
    """inception-2015-12-05.pt's interface: forward(x uint8 values as float, return_features, no_output_bias):
    64-d features (the real: 2048) or 10-way probabilities (the real: 1008), resized inside like the real."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.layers = _Layers(torch.randn(64, 3 * 8 * 8, generator=g) / 8)
        self.c = nn.Parameter(torch.randn(10, 64, generator=g), requires_grad=False)

    def forward(self, x, return_features: bool = False, no_output_bias: bool = False):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        f = self.layers((x - 128) / 128).flatten(1)
        return f if return_features else torch.softmax(f @ self.c.T, 1)

def inception(path):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    torch.jit.save(torch.jit.script(InceptionStandIn().eval()), path)
    return path

def cifar10_tarball(path, n_per_batch=64, seed=0):
    """cifar-10-python.tar.gz's layout (cifar-10-batches-py/data_batch_1..5, test_batch; planar uint8 rows)
    filled with shapes images upscaled to 32x32."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    images = R.make_shapes(n_per_batch * len(names), 32, seed).reshape(len(names), n_per_batch, 3072).numpy()
    with tarfile.open(path, "w:gz") as tar:
        for name, data in zip(names, images):
            blob = pickle.dumps({b"data": data, b"labels": [i % 10 for i in range(n_per_batch)]})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    return path

def cifar10_statistics(folder, inception_path):
    """Statistics where cifar10_statistics keeps clean-fid's, in both modes, of the stand-in's features of
    shapes images (any mu, sigma of the right width serve)."""
    det = R.Inception(inception_path)
    x = R.make_shapes(256, 32, seed=1).float()
    os.makedirs(folder, exist_ok=True)
    for mode in R.FID_MODES:
        big = x if mode == "legacy_tensorflow" else F.interpolate(x, size=(299, 299), mode="bilinear")
        f = det.features(big, mode).double().numpy()
        np.savez(os.path.join(folder, f"cifar10_{mode}_train_32.npz"), mu=f.mean(0),
                 sigma=np.cov(f, rowvar=False))

def hub_teacher(cache, repo_id="google/ddpm-cifar10-32", sample_size=32):
    """A small DDPM-style diffusers UNet2DModel (eps, linear betas) in hub_download's cache layout."""
    from diffusers import UNet2DModel
    folder = os.path.join(cache, "hub", repo_id.replace("/", "--"), "main")
    torch.manual_seed(0)
    UNet2DModel(sample_size=sample_size, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                down_block_types=("DownBlock2D", "AttnDownBlock2D"), attention_head_dim=None,
                up_block_types=("AttnUpBlock2D", "UpBlock2D"), flip_sin_to_cos=False, freq_shift=1,
                downsample_padding=0, norm_eps=1e-6).save_pretrained(folder)
    with open(os.path.join(folder, "scheduler_config.json"), "w") as f:
        json.dump({"_class_name": "DDPMScheduler", "beta_schedule": "linear", "beta_start": 1e-4,
                   "beta_end": 0.02, "num_train_timesteps": 1000, "variance_type": "fixed_large"}, f)
    return folder

def user_cache(folder):
    """One DISTILL_CACHE as a user's would be after a first online run: Inception weights, CIFAR-10,
    clean-fid's statistics, google/ddpm-cifar10-32; the test cache's trained shapes teachers linked in."""
    os.makedirs(folder, exist_ok=True)
    path = inception(os.path.join(folder, "inception-2015-12-05.pt"))
    cifar10_statistics(os.path.join(folder, "fid_stats"), path)
    cifar10_tarball(os.path.join(folder, "data", "cifar-10-python.tar.gz"))
    hub_teacher(folder)
    os.makedirs(os.path.join(R.CACHE_DIR, "teachers"), exist_ok=True)
    os.symlink(os.path.join(R.CACHE_DIR, "teachers"), os.path.join(folder, "teachers"))
    return folder

@torch.no_grad()
def perturb(net, seed, scale=0.01):
    """Every tensor of net moved by scale * N(0, 1) (seeded), so that zero inits hide no wrong mapping."""
    g = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return net

def one_line(excinfo):
    """The message of a raised error, checked to be one line (and not empty)."""
    text = str(excinfo.value)
    assert "\n" not in text and len(text) > 20, text
    return text
