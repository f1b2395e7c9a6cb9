"""Experiment (not part of run_all): BatchNorm forward+backward of one layer -- normlab's eager Function vs
the same math as two torch.compile'd kernels (inductor, dynamic=False, one compile per shape) vs native
nn.BatchNorm2d. 1 thread; 20 interleaved rounds; median ms per forward+backward. Prints compile time per shape.

    python bench/exp_fused_bn.py
"""
import torch, time, statistics
torch.set_num_threads(1)
import torch.nn as nn
import normlab.norms._functional as F_

def bn_fwd(x, w, b, eps: float):
    xf = x.float()
    n = x.numel() // x.shape[1]
    s1 = xf.sum((0, 2, 3)); s2 = (xf * xf).sum((0, 2, 3))
    m64 = s1.double() / n
    v64 = (s2.double() / n - m64 * m64).clamp_min(0)
    mean, var = m64.float(), v64.float()
    rstd = torch.rsqrt(var + eps)
    scale = rstd * w; shift = b - mean * scale
    y = xf * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
    return y.to(x.dtype), mean, var, rstd

def bn_bwd(dy, x, w, mean, rstd):
    n = x.numel() // x.shape[1]
    dyf, xf = dy.float(), x.float()
    sdy = dyf.sum((0, 2, 3)); sdyx = (dyf * xf).sum((0, 2, 3))
    sxc = (sdyx.double() - mean.double() * sdy.double()).float()
    gw = sxc * rstd; gb = sdy
    a = rstd * w; bb = -a * rstd * rstd * sxc / n; c = -a * sdy / n
    gx = a.view(1,-1,1,1) * dyf + bb.view(1,-1,1,1) * xf + (c - bb * mean).view(1,-1,1,1)
    return gx.to(x.dtype), gw, gb

mode = "static"
kw = {"dynamic": True} if mode == "dyn" else {"dynamic": False}
cf, cb = torch.compile(bn_fwd, **kw), torch.compile(bn_bwd, **kw)
class Fused(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w, b):
        y, mean, var, rstd = cf(x, w, b, 1e-5)
        ctx.save_for_backward(x, w, mean, rstd); return y
    @staticmethod
    def backward(ctx, dy):
        x, w, mean, rstd = ctx.saved_tensors
        return cb(dy, x, w, mean, rstd)
for fm in ("nchw", "cl"):
  for shape in [(128,16,32,32),(128,32,16,16),(128,64,8,8)]:
    x0 = torch.randn(shape)
    if fm == "cl": x0 = x0.contiguous(memory_format=torch.channels_last)
    x = x0.requires_grad_(); dy = torch.randn_like(x0)
    c = shape[1]; w = torch.ones(c, requires_grad=True); b = torch.zeros(c, requires_grad=True)
    nat = nn.BatchNorm2d(c)
    fs = {"eager": lambda: F_.BatchNormFunction.apply(x, w, b, None, None, 0.1, 1e-5, False),
          "fused": lambda: Fused.apply(x, w, b), "native": lambda: nat(x)}
    t = time.perf_counter(); fs["fused"]().backward(dy); tc = time.perf_counter() - t
    ts = {k: [] for k in fs}
    for r in range(20):
        for k in fs:
            t = time.perf_counter(); fs[k]().backward(dy); ts[k].append(time.perf_counter() - t)
    print(fm, shape, "compile %.1fs" % tc, " ms:", "  ".join("%s %.2f" % (k, statistics.median(v) * 1e3) for k, v in ts.items()), flush=True)
