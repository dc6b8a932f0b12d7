"""The stereo example's patch network Cp in PyTorch, its dense form CI, and its training through CI.

Cp (18x18 grey patches, normalised as in stereo_matching.normalise) -> unit 32-vector:

    conv 3x3 1->32, ReLU, conv 3x3 32->32, ReLU, max-pool 2x2 (stride 2),
    conv 3x3 32->32, ReLU, conv 3x3 32->32, ReLU, conv 3x3 32->32, L2 normalisation

All convolutions are valid (no padding), so FDFE.convert makes it dense exactly; the pooling layer is
why FDFE matters (CI computes it as multipooling: the four shifted poolings, unwarped at the end).
"""

import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.append(HERE)  # stereo_matching (appended: never ahead of site-packages)
sys.path.append(os.path.join(HERE, "..", "shared_tests"))  # backends: loads pytorch/FDFE.py by its path

import stereo_matching as sm  # noqa: E402
from backends import load_backend  # noqa: E402

FDFE = load_backend("pytorch", "torch").FDFE


class StereoPatchNet(nn.Module):
    """Cp: (B, 1, 18, 18) -> (B, 32) unit descriptors."""

    def __init__(self, weights=None):
        super().__init__()
        for name, (out, inp, kh, kw) in sm.CONV_SHAPES.items():
            setattr(self, name, nn.Conv2d(inp, out, (kh, kw)))
        self.pool = nn.MaxPool2d(2)
        if weights is not None:
            self.load_arrays(weights)

    def forward(self, x):
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = self.pool(x)
        x = F.relu(self.conv3(x))
        x = F.relu(self.conv4(x))
        x = self.conv5(x)
        return F.normalize(x.flatten(1), dim=1)

    def load_arrays(self, arrays):
        """Copy the kernels and biases of a weights dict (stereo_matching.load_weights) into the net."""
        with torch.no_grad():
            for name in sm.CONV_SHAPES:
                conv = getattr(self, name)
                conv.weight.copy_(torch.from_numpy(arrays[f"{name}.weight"]))
                conv.bias.copy_(torch.from_numpy(arrays[f"{name}.bias"]))
        return self

    def arrays(self):
        """The kernels (OIHW) and biases as float32 numpy arrays, named as in the weights file."""
        return {name: t.detach().cpu().numpy().astype(np.float32) for name, t in self.state_dict().items()}


def load(path=sm.WEIGHTS_FILE):
    """(Cp with the weights of ``path``, the weights dict)."""
    weights = sm.load_weights(path)
    return StereoPatchNet(weights).eval(), weights


def dense(ci, images):
    """CI on a list of normalised grey (H, W) arrays: a list of (K, H, W) float32 numpy descriptors."""
    batch = torch.from_numpy(np.stack(images))[:, None]
    with torch.inference_mode():
        return list(ci(batch).numpy())


def train(pair, steps=200, crop_rows=64, pixels=4096, lr=2e-3, temperature=0.05, seed=0, log=print):
    """Train Cp through CI on the top half of the rows (sm.TRAIN_ROWS) only; deterministic for a given
    machine and thread count.

    Each step takes a band of ``crop_rows`` rows of the training half of both images, computes CI's
    descriptors at every pixel of both bands, picks ``pixels`` random pixels with a ground truth, and
    scores each against its 64 candidates in the right image (x - d, d = 0..63, where inside) by
    cosine similarity.  The loss is the cross-entropy of the softmax over the candidates (similarity /
    ``temperature``) against the ground truth, split between the two integer disparities around it:
    it raises the true match above every other disparity the matcher will consider.

    Returns the weights dict (stereo_matching.WEIGHT_SHAPES) and the training time in seconds.
    """
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    rows = sm.TRAIN_ROWS
    left, right, gt = pair.left[rows], pair.right[rows], pair.gt[rows]  # the held-out rows never enter
    mean = np.float32(np.concatenate([left.ravel(), right.ravel()]).mean())
    std = np.float32(np.concatenate([left.ravel(), right.ravel()]).std())
    norm = {"input.mean": mean, "input.std": std}
    images = torch.from_numpy(np.stack([sm.normalise(left, norm), sm.normalise(right, norm)]))[:, None]
    gt = torch.from_numpy(gt)
    height, width = gt.shape
    n_disp = sm.MAX_DISPARITY + 1
    disparities = torch.arange(n_disp)
    columns = torch.arange(width).expand(height, width)
    # pixels whose ground truth lies strictly inside the searched range and inside the right image
    usable = torch.isfinite(gt) & (gt < sm.MAX_DISPARITY) & (columns - torch.nan_to_num(gt, nan=0.0) >= 1)

    net = StereoPatchNet()
    ci = FDFE.convert(net, sm.PATCH)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    start = time.perf_counter()
    for step in range(steps):
        top = int(torch.randint(0, height - crop_rows + 1, (1,), generator=generator))
        band = usable[top:top + crop_rows].flatten().nonzero()[:, 0]
        chosen = band[torch.randperm(len(band), generator=generator)[:pixels]]
        d_true = gt[top:top + crop_rows].flatten()[chosen]
        x = chosen % width

        features = ci(images[:, :, top:top + crop_rows])           # (2, K, rows, W): every pixel's patch
        k = features.shape[1]
        left_f = features[0].permute(1, 2, 0).reshape(-1, k)       # (rows * W, K)
        right_f = features[1].permute(1, 2, 0).reshape(-1, k)
        candidates = chosen[:, None] - disparities[None, :]        # flat index of (y, x - d)
        inside = disparities[None, :] <= x[:, None]
        similarity = (left_f[chosen][:, None, :] * F.embedding(candidates.clamp(min=0), right_f)).sum(-1)
        log_p = F.log_softmax((similarity / temperature).masked_fill(~inside, -1e4), dim=1)
        low = d_true.floor().long()
        share = d_true - low
        loss = -((1 - share) * log_p.gather(1, low[:, None])[:, 0]
                 + share * log_p.gather(1, (low + 1)[:, None])[:, 0]).mean()

        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        if log and (step % 25 == 0 or step == steps - 1):
            log(f"  step {step:4d}/{steps}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f} s")
    seconds = time.perf_counter() - start
    return {**net.arrays(), **norm}, seconds
