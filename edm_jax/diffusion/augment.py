"""Non-leaky geometric augmentation: EDM's `AugmentPipe` (NVlabs/edm `training/augment.py`).

EDM (Karras et al. 2022, Sec. 5 "augmentation regularization" and appendix) trains small-data models on augmented images and hands the network
a 9-dim description of each augmentation ("augment labels"). The network learns the augmented distribution
*conditioned on* those labels; sampling with all-zero labels (the identity augmentation) then yields clean,
non-augmented images, so the augmentations do not leak into the generated distribution. The transforms
and their execution come from ADA (Karras et al. 2020, "Training GANs with limited data"): each is gated by
an independent `u < multiplier * p` per image, and geometry is resampled through a sym6 wavelet 2x
up/down-sampling so that rotation and fractional shifts do not alias.

Two steps, both pure and jit-able:
  params = sample_augment_params(key, n, p=0.12)     # dict of per-image draws (the randomness)
  images, labels = apply_augment(images, params)     # deterministic given params

Images are NHWC float32 in [-1, 1]. Parameters (float32; the identity value when a gate is off):
  xflip, yflip [N] in {0, 1}; scale [N]: standard-normal draw w, isotropic scale 2^(scale_std * w);
  rotate [N]: angle in radians; aniso [N]: draw w, anisotropic scale 2^(aniso_std * w) along a frame rotated
  by aniso_angle [N] (radians; 0 = image axes); translate [N, 2]: draws (w_x, w_y), shift w * std * (W, H) px.
Labels [N, 9], the reference's column order:
  xflip, yflip, scale w, cos(rotate) - 1, sin(rotate), aniso w * cos(angle), aniso w * sin(angle), w_x, w_y.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

# sym6 ("symlet 6") wavelet low-pass decomposition filter: the standard published coefficients.
# Orthonormal: sum = sqrt(2), sum_k h[k] h[k + 2m] = delta(m), so a 2x down(up(x)) round trip is the identity.
SYM6 = np.array([
    0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
    0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
    -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148])
_BORDER = len(SYM6) // 4  # The reference's `Hz_pad`: extra output border (px) kept until the final crop.


@functools.partial(jax.jit, static_argnums=1)
def sample_augment_params(key, n, *, p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1,
                          aniso_rotate_prob=0.5, rotate_frac_max=1):
    """Draw the augmentation parameters of `n` images with the reference's distribution.

    `p` is the overall probability (EDM CIFAR-10 / FFHQ / AFHQ: 0.12 / 0.15 / 0.15); each keyword multiplier
    scales it per transform as in `AugmentPipe(p, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1,
    translate_frac=1)` (train.py's configuration). Each transform is gated by its own uniform `u < mult * p`:
    xflip (mult 1e8, so always gated for p > 0) then a fair coin, so half of all images are mirrored;
    yflip gated then a coin; scale and aniso draw w ~ N(0, 1); rotate draws U(-pi, pi) * rotate_frac_max;
    translate draws (w_x, w_y) ~ N(0, 1)^2 under one gate. The aniso frame angle is U(-pi, pi) with
    probability `aniso_rotate_prob`, independently of p (as in the reference; it has no effect when the aniso
    draw is gated to 0). A multiplier of 0 disables a transform but keeps its label columns (at zero), so the
    label width is always 9.

    `key`: one typed key, from which image i uses `fold_in(key, i)` (so its parameters do not depend on `n`),
    or an array of `n` keys, one per image (e.g. folded from global example indices), used as given.
    Returns a dict of float32 arrays: `xflip, yflip, scale, rotate, aniso, aniso_angle` [n], `translate` [n, 2].
    """
    def one(k):
        # One uniform draw per image (one threefry hash: much faster to compile than several draws).
        # u[:11]: gates, coins and angles; u[11:]: N(0, 1) by the inverse CDF, as jax.random.normal does,
        # for scale, aniso, translate x and translate y.
        u = jax.random.uniform(k, (15,))
        z = np.sqrt(2) * jax.lax.erf_inv(jnp.maximum(2 * u[11:] - 1, np.nextafter(np.float32(-1), np.float32(0))))
        gate = lambda i, mult: u[i] < mult * p
        coin = lambda i: (u[i] < 0.5).astype(jnp.float32)
        angle = lambda i, frac: (u[i] * 2 - 1) * (np.pi * frac)
        zero = jnp.zeros((), jnp.float32)
        return dict(
            xflip=jnp.where(gate(0, xflip), coin(1), zero),
            yflip=jnp.where(gate(2, yflip), coin(3), zero),
            scale=jnp.where(gate(4, scale), z[0], zero),
            rotate=jnp.where(gate(5, rotate_frac), angle(6, rotate_frac_max), zero),
            aniso=jnp.where(gate(7, aniso), z[1], zero),
            aniso_angle=jnp.where(u[8] < aniso_rotate_prob, angle(9, 1), zero),
            translate=jnp.where(gate(10, translate_frac), z[2:], zero))
    if key.shape == ():
        keys = jax.vmap(jax.random.fold_in, (None, 0))(key, jnp.arange(n, dtype=jnp.uint32))
    elif key.shape == (n,):
        keys = key
    else:
        raise ValueError(f"sample_augment_params: key must be one key or {n} keys (one per image), got {key.shape}")
    return {name: v.astype(jnp.float32) for name, v in jax.vmap(one)(keys).items()}


def augment_labels(params):
    """The [N, 9] float32 conditioning labels of `params`, in the reference's column order."""
    f = lambda name: jnp.asarray(params[name], jnp.float32)
    theta, r, a = f("rotate"), f("aniso_angle"), f("aniso")
    t = f("translate")
    return jnp.stack([f("xflip"), f("yflip"), f("scale"), jnp.cos(theta) - 1, jnp.sin(theta),
                      a * jnp.cos(r), a * jnp.sin(r), t[:, 0], t[:, 1]], axis=1)


def _inverse_matrix(params, h, w, scale_std, aniso_std, translate_frac_std):
    """[N, 3, 3] map from output to input pixel coordinates (origin at the image centre, x right, y down).

    The reference composes the inverses left to right in the order scale, rotate, aniso, translate:
    G_inv = S(1/s) R(theta) . R(-r) S(1/a, a) R(r) . T(-t), where R(phi) = [[cos, -sin], [sin, cos]].
    """
    f = lambda name: jnp.asarray(params[name], jnp.float32)
    one, zero = jnp.ones_like(f("scale")), jnp.zeros_like(f("scale"))
    mat = lambda *rows: jnp.stack([jnp.stack(row, -1) for row in rows], -2)
    rot = lambda phi: mat([jnp.cos(phi), -jnp.sin(phi), zero], [jnp.sin(phi), jnp.cos(phi), zero], [zero, zero, one])
    diag = lambda sx, sy: mat([sx, zero, zero], [zero, sy, zero], [zero, zero, one])
    s = jnp.exp2(f("scale") * scale_std)
    a = jnp.exp2(f("aniso") * aniso_std)
    r = f("aniso_angle")
    t = f("translate")
    shift = mat([one, zero, -t[:, 0] * (w * translate_frac_std)], [zero, one, -t[:, 1] * (h * translate_frac_std)],
                [zero, zero, one])
    g = jnp.broadcast_to(jnp.eye(3, dtype=jnp.float32), s.shape + (3, 3))
    for m in [diag(1 / s, 1 / s), rot(f("rotate")), rot(-r), diag(1 / a, a), rot(r), shift]:
        g = jnp.matmul(g, m, precision=jax.lax.Precision.HIGHEST)
    return g


def _reference_margins(g, h, w, per_image):
    """The reference's reflect-padding margins [N, 4] int32 (left, top, right, bottom), in input pixels.

    Where the four output corners land in the input, plus 2 * `_BORDER` px, clipped to [0, size - 1]
    (the most reflect padding allows). The reference takes the maximum over the whole batch.
    """
    cx, cy = (w - 1) / 2, (h - 1) / 2
    corners = jnp.array([[-cx, cx, cx, -cx], [-cy, -cy, cy, cy], [1, 1, 1, 1]], jnp.float32)
    pts = jnp.einsum("nij,jk->nik", g[:, :2, :], corners, precision=jax.lax.Precision.HIGHEST)  # [N, xy, 4]
    m = jnp.concatenate([-pts, pts], axis=1).max(axis=2)  # [N, (x0, y0, x1, y1)]
    if not per_image:
        m = jnp.broadcast_to(m.max(axis=0), m.shape)
    m = m + jnp.array([2 * _BORDER - cx, 2 * _BORDER - cy] * 2, jnp.float32)
    m = jnp.clip(m, 0, jnp.array([w - 1, h - 1] * 2, jnp.float32))
    return jnp.ceil(m).astype(jnp.int32)


def _fir(x, taps, axis, start, count, stride):
    """y[j] = sum_t taps[t] * x[start + stride * j + t] along `axis` (j < count), zeros outside x."""
    x = jnp.moveaxis(x, axis, -1)
    lo = max(0, -start)
    hi = max(0, start + stride * (count - 1) + len(taps) - x.shape[-1])
    x = jnp.pad(x, [(0, 0)] * (x.ndim - 1) + [(lo, hi)])
    begin = start + lo
    y = sum(float(c) * x[..., begin + t: begin + t + stride * (count - 1) + 1: stride] for t, c in enumerate(taps))
    return jnp.moveaxis(y, -1, axis)


def _upsample2(x, axis):
    """sym6 2x upsampling: zero insertion (x at even positions), then the flipped filter, 6 px zero padding."""
    n = x.shape[axis]
    z = jnp.stack([x, jnp.zeros_like(x)], axis=axis + 1)
    z = jax.lax.slice_in_dim(z.reshape(x.shape[:axis] + (2 * n,) + x.shape[axis + 1:]), 0, 2 * n - 1, axis=axis)
    return _fir(z, SYM6[::-1], axis, start=-(len(SYM6) // 2), count=2 * n, stride=1)


def _bilinear(img, ux, uy, ox, oy):
    """PyTorch `grid_sample(bilinear, padding_mode='zeros')` of one image [H, W, C] at pixel coords (ux + ox,
    uy + oy) [h, w], where the integer offsets ox, oy are kept apart so that the fractions keep their precision."""
    x0, y0 = jnp.floor(ux), jnp.floor(uy)
    fx, fy = ux - x0, uy - y0
    out = 0.0
    for dy, wy in [(0, 1 - fy), (1, fy)]:
        for dx, wx in [(0, 1 - fx), (1, fx)]:
            xi, yi = x0.astype(jnp.int32) + (ox + dx), y0.astype(jnp.int32) + (oy + dy)
            inside = (xi >= 0) & (xi < img.shape[1]) & (yi >= 0) & (yi < img.shape[0])
            v = img[jnp.clip(yi, 0, img.shape[0] - 1), jnp.clip(xi, 0, img.shape[1] - 1)]
            out = out + v * jnp.where(inside, wx * wy, 0.0)[..., None]
    return out


@functools.partial(jax.jit, static_argnames="margin")
def apply_augment(images, params, *, scale_std=0.2, aniso_std=0.2, translate_frac_std=0.125, rotate_frac_max=1,
                  margin="image"):
    """Apply augmentation `params` to NHWC float32 `images` [N, H, W, C]; returns `(images, labels [N, 9])`.

    Exactly the reference's execution: flips, then one resampling for the composed geometry: reflect-pad,
    sym6 2x upsample, bilinear sampling at 2x resolution (zeros outside, align_corners=False) of an output
    with a 3 px border, sym6 2x downsample, crop. `rotate_frac_max` is accepted so that the reference's
    keyword set can be passed unchanged; it has no effect here, as `params['rotate']` is already an angle
    (it belongs to `sample_augment_params`).

    Reflect-pad margin. The reference pads by a margin computed from the batch (the maximum over its images,
    at most size - 1), so its output depends on the batch and the padded shape on the data. Here the image is
    always padded by the static maximum (size - 1); the part outside the reference's padded window is zeroed
    before and after upsampling, which reproduces the reference's zero boundaries exactly, with static
    shapes. `margin="image"` (default): each image its own margin, i.e. identical to `AugmentPipe` run on
    that image alone, so image i never depends on the rest of the batch (batch size, devices, hosts).
    `margin="batch"`: the reference's batch-wide margin, identical to `AugmentPipe` on this very batch.
    The two differ only where sampling reaches the padded border (measured: < 4e-6 relative per image).
    """
    if margin not in ("batch", "image"):
        raise ValueError(f"apply_augment: margin must be 'batch' or 'image', got {margin!r}")
    if images.ndim != 4:
        raise ValueError(f"apply_augment: images must be NHWC [N, H, W, C], got shape {images.shape}")
    n, h, w, _ = images.shape
    for name in ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle", "translate"):
        want = (n, 2) if name == "translate" else (n,)
        if jnp.shape(params[name]) != want:
            raise ValueError(f"apply_augment: params['{name}'] must have shape {want} for {n} images, got "
                             f"{jnp.shape(params[name])} (translate is [N, 2]: transpose a [2, N] array)")
    images = images.astype(jnp.float32)
    del rotate_frac_max
    on = lambda name: (jnp.asarray(params[name]) == 1)[:, None, None, None]
    images = jnp.where(on("xflip"), images[:, :, ::-1], images)
    images = jnp.where(on("yflip"), images[:, ::-1], images)

    g = _inverse_matrix(params, h, w, scale_std, aniso_std, translate_frac_std)
    m = _reference_margins(g, h, w, per_image=(margin == "image"))
    mx0, my0, mx1, my1 = (m[:, i, None] for i in range(4))
    px, py = w - 1, h - 1  # Static padding: the largest margin the reference can choose.

    def window(x, factor, y0, y1, x0, x1):  # Zero outside the reference's (factor-scaled) padded image.
        iy = jnp.arange(x.shape[1])[None, :]
        ix = jnp.arange(x.shape[2])[None, :]
        keep_y = (iy >= factor * (py - y0)) & (iy < factor * (py + h + y1))
        keep_x = (ix >= factor * (px - x0)) & (ix < factor * (px + w + x1))
        return x * (keep_y[:, :, None, None] & keep_x[:, None, :, None])

    x = jnp.pad(images, [(0, 0), (py, py), (px, px), (0, 0)], mode="reflect")
    x = window(x, 1, my0, my1, mx0, mx1)
    x = _upsample2(_upsample2(x, axis=2), axis=1)
    x = window(x, 2, my0, my1, mx0, mx1)

    # Output pixel k (2x grid of (size + 2 * border) * 2 px) sits at (k - size - 2 * border + 1) / 2 px from the
    # image centre; G maps it to the input point p (from the centre), which is upsampled pixel
    # 2 * (p + centre + pad): 2 * p here, the integer 2 * (centre + pad) inside _bilinear.
    qx = (jnp.arange(2 * (w + 2 * _BORDER), dtype=jnp.float32) - (w + 2 * _BORDER - 1)) / 2
    qy = (jnp.arange(2 * (h + 2 * _BORDER), dtype=jnp.float32) - (h + 2 * _BORDER - 1)) / 2
    g = g[:, :, :, None, None]
    ux = 2 * (g[:, 0, 0] * qx[None, :] + g[:, 0, 1] * qy[:, None] + g[:, 0, 2])
    uy = 2 * (g[:, 1, 0] * qx[None, :] + g[:, 1, 1] * qy[:, None] + g[:, 1, 2])
    x = jax.vmap(_bilinear, (0, 0, 0, None, None))(x, ux, uy, w - 1 + 2 * px, h - 1 + 2 * py)

    # Downsample (filter unflipped, stride 2) keeping only the un-bordered output pixels.
    start = 2 * _BORDER - (len(SYM6) - 1) // 2
    x = _fir(x, SYM6, axis=2, start=start, count=w, stride=2)
    x = _fir(x, SYM6, axis=1, start=start, count=h, stride=2)
    return x, augment_labels(params)
