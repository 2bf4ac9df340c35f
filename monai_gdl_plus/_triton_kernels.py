"""The Triton kernels of :mod:`monai_gdl_plus._triton` (see there for what they compute and how they are launched).

Imported on first use of the Triton path by :mod:`monai_gdl_plus._triton` (the package imports without
``triton``); compiled, or interpreted where ``TRITON_INTERPRET=1`` was set before ``triton`` was imported.

The per-voxel formulas mirror :mod:`monai_gdl_plus._ops` (``nll_from_lse``, ``sigmoid_focal(_grad)``,
``softmax_focal(_grad)``); the tests hold the two to each other.
"""

import triton
import triton.language as tl

__all__ = ["backward_kernel", "forward_kernel"]



@triton.jit
def _softplus(z):
    # max(z, 0) + log1p(exp(-|z|)); log1p(u) = log(1 + u) u / ((1 + u) - 1) keeps small u exact
    u = tl.exp(-tl.abs(z))
    v = 1.0 + u
    lg = tl.where(v == 1.0, u, tl.log(v) * (u / tl.where(v == 1.0, 1.0, v - 1.0)))
    return tl.maximum(z, 0.0) + lg

@triton.jit
def _sigmoid_focal(x, hit, gamma, alpha, HAS_ALPHA: tl.constexpr):
    # _ops.sigmoid_focal for t = hit: exp(gamma logsigmoid(z)) softplus(z), z = x (1 - 2t), times a_t
    z = tl.where(hit, -x, x)
    v = tl.exp(-gamma * _softplus(-z)) * _softplus(z)
    if HAS_ALPHA:
        v = v * tl.where(hit, alpha, 1.0 - alpha)
    return v

@triton.jit
def _sigmoid_focal_grad(x, hit, gamma, alpha, HAS_ALPHA: tl.constexpr):
    # _ops.sigmoid_focal_grad: (1 - 2t) a s**gamma (gamma (1 - s) softplus(z) + s), s = sigmoid(z)
    z = tl.where(hit, -x, x)
    s = tl.sigmoid(z)
    d = (_softplus(z) * (1.0 - s) * gamma + s) * tl.exp(-gamma * _softplus(-z))
    sign = tl.where(hit, -1.0, 1.0)
    if HAS_ALPHA:
        sign = sign * tl.where(hit, alpha, 1.0 - alpha)
    return d * sign

@triton.jit
def _softmax_focal(lp, lab, gamma, alpha, HAS_ALPHA: tl.constexpr, TINY: tl.constexpr):
    # _ops.softmax_focal: -a (1 - p)**gamma log p of the true class's log-probability
    omp = tl.maximum(1.0 - tl.exp(lp), TINY)
    v = -tl.exp(gamma * tl.log(omp)) * lp
    if HAS_ALPHA:
        v = v * tl.where(lab == 0, 1.0 - alpha, alpha)
    return v

@triton.jit
def _softmax_focal_grad(lp, lab, gamma, alpha, HAS_ALPHA: tl.constexpr, TINY: tl.constexpr):
    # _ops.softmax_focal_grad: a (gamma (1 - p)**(gamma - 1) p lp - (1 - p)**gamma)
    p = tl.exp(lp)
    lo = tl.log(tl.maximum(1.0 - p, TINY))
    v = gamma * tl.exp((gamma - 1.0) * lo) * p * lp - tl.exp(gamma * lo)
    if HAS_ALPHA:
        v = v * tl.where(lab == 0, 1.0 - alpha, alpha)
    return v

@triton.jit
def _load_tile(x_base, cls, offs, vm, C, N, ACC: tl.constexpr):
    cm = cls < C
    ptrs = x_base + cls[:, None].to(tl.int64) * N + offs[None, :]
    return tl.load(ptrs, mask=cm[:, None] & vm[None, :], other=0.0).to(ACC), cm

@triton.jit
def _softmax_tile(x, cm):
    # the whole class axis in one tile: probabilities and log-sum-exp per voxel (padding classes get 0)
    xm = tl.where(cm[:, None], x, float("-inf"))
    mx = tl.max(xm, 0)
    e = tl.exp(xm - mx[None, :])
    z = tl.sum(e, 0)
    return e / z[None, :], mx + tl.log(z)

@triton.jit
def _voxels(lab_ptr, m_ptr, w_ptr, v_base, offs, vm, HAS_MASK: tl.constexpr, HAS_W: tl.constexpr,
            ACC: tl.constexpr):  # fmt: skip
    lab = tl.load(lab_ptr + v_base + offs, mask=vm, other=0).to(tl.int32)
    if HAS_MASK:
        m = tl.load(m_ptr + v_base + offs, mask=vm, other=0.0).to(ACC)
    else:
        m = vm.to(ACC)
    if HAS_W:
        w = tl.load(w_ptr + lab, mask=vm, other=0.0).to(ACC)
    else:
        w = m * 0.0 + 1.0
    return lab, m, w

@triton.jit
def _terms(x, p, lse, cls, lab, m, w, gamma, alpha, SQUARED: tl.constexpr, WITH_CE: tl.constexpr,
           FOCAL: tl.constexpr, HAS_ALPHA: tl.constexpr, TINY: tl.constexpr):  # fmt: skip
    # one tile's contributions: per class (intersection, prediction sum, volume, focal, NLL by true class)
    hit = cls[:, None] == lab[None, :]
    pm = p * m[None, :]
    ci = tl.sum(tl.where(hit, pm, 0.0), 1)
    if SQUARED:
        cp = tl.sum(pm * p, 1)
    else:
        cp = tl.sum(pm, 1)
    mm = m[None, :] + p * 0.0
    ct = tl.sum(tl.where(hit, mm, 0.0), 1)
    cf = ci * 0.0
    cn = ci * 0.0
    if WITH_CE or FOCAL == 2:
        lp = tl.sum(tl.where(hit, x, 0.0), 0) - lse  # the true class's log-probability (its tile only)
        if WITH_CE:
            cn = tl.sum(tl.where(hit, (-lp * m * w)[None, :], 0.0), 1)  # _ops.nll_from_lse
        if FOCAL == 2:
            fv = _softmax_focal(lp, lab, gamma, alpha, HAS_ALPHA, TINY) * m
            cf = tl.sum(tl.where(hit, fv[None, :], 0.0), 1)
    if FOCAL == 1:
        cf = tl.sum(_sigmoid_focal(x, hit, gamma, alpha, HAS_ALPHA) * m[None, :], 1)
    return ci, cp, ct, cf, cn

@triton.jit
def _online_stats(x_base, rows, offs, vm, gp_base, C, N, SQUARED: tl.constexpr, BLOCK_C: tl.constexpr,
                  BLOCK_N: tl.constexpr, C_TILES: tl.constexpr, ACC: tl.constexpr, WITH_S: tl.constexpr):  # fmt: skip
    # one pass over the class tiles: log-sum-exp, and (WITH_S) s = sum_k p_k gP_k h(p_k), h = 1 or 2 p
    mx = tl.full([BLOCK_N], float("-inf"), ACC)
    z = tl.zeros([BLOCK_N], ACC)
    y = tl.zeros([BLOCK_N], ACC)
    for t in range(C_TILES):
        x, cm = _load_tile(x_base, t * BLOCK_C + rows, offs, vm, C, N, ACC)
        xm = tl.where(cm[:, None], x, float("-inf"))
        new = tl.maximum(mx, tl.max(xm, 0))
        scale = tl.exp(mx - new)
        e = tl.exp(xm - new[None, :])
        z = z * scale + tl.sum(e, 0)
        if WITH_S:
            gp = tl.load(gp_base + t * BLOCK_C + rows, mask=cm, other=0.0).to(ACC)
            if SQUARED:
                y = y * scale * scale + tl.sum(e * e * gp[:, None], 0)
            else:
                y = y * scale + tl.sum(e * gp[:, None], 0)
        mx = new
    if SQUARED:
        s = 2.0 * y / (z * z)
    else:
        s = y / z
    return mx + tl.log(z), s

@triton.jit
def forward_kernel(x_ptr, lab_ptr, m_ptr, w_ptr, part_ptr, C, N, term_stride, gamma, gamma_lo, alpha, alpha_lo,
            SOFTMAX: tl.constexpr, SQUARED: tl.constexpr, WITH_CE: tl.constexpr, FOCAL: tl.constexpr,
            HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_ALPHA: tl.constexpr, BLOCK_C: tl.constexpr,
            BLOCK_N: tl.constexpr, C_TILES: tl.constexpr, ITERS: tl.constexpr, TINY: tl.constexpr,
            ACC: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1)
    # float arguments arrive in float32: each as a float32 pair (value, remainder), exact in float64 kernels
    gamma = tl.cast(gamma, ACC) + tl.cast(gamma_lo, ACC)
    alpha = tl.cast(alpha, ACC) + tl.cast(alpha_lo, ACC)
    rows = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_N)
    x_base = x_ptr + b.to(tl.int64) * C * N
    v_base = b.to(tl.int64) * N
    row = part_ptr + (b.to(tl.int64) * tl.num_programs(0) + pid) * C  # this program's partial sums
    if FOCAL > 0:
        nll_row = row + 4 * term_stride
    else:
        nll_row = row + 3 * term_stride
    acc_i = tl.zeros([BLOCK_C], ACC)
    acc_p = tl.zeros([BLOCK_C], ACC)
    acc_t = tl.zeros([BLOCK_C], ACC)
    acc_f = tl.zeros([BLOCK_C], ACC)
    acc_n = tl.zeros([BLOCK_C], ACC)
    for it in range(ITERS):
        offs = (pid * ITERS + it) * BLOCK_N + cols
        vm = offs < N
        lab, m, w = _voxels(lab_ptr, m_ptr, w_ptr, v_base, offs, vm, HAS_MASK, HAS_W, ACC)
        if C_TILES == 1:
            x, cm = _load_tile(x_base, rows, offs, vm, C, N, ACC)
            if SOFTMAX:
                p, lse = _softmax_tile(x, cm)
            else:
                p = tl.sigmoid(x)
                lse = m * 0.0
            ci, cp, ct, cf, cn = _terms(x, p, lse, rows, lab, m, w, gamma, alpha, SQUARED, WITH_CE, FOCAL,
                                        HAS_ALPHA, TINY)  # fmt: skip
            acc_i += ci
            acc_p += cp
            acc_t += ct
            acc_f += cf
            acc_n += cn
        else:
            if SOFTMAX:
                lse, _s = _online_stats(x_base, rows, offs, vm, x_base, C, N, SQUARED, BLOCK_C, BLOCK_N, C_TILES,
                                        ACC, False)  # fmt: skip
            else:
                lse = m * 0.0
            for t in range(C_TILES):
                cls = t * BLOCK_C + rows
                x, cm = _load_tile(x_base, cls, offs, vm, C, N, ACC)
                if SOFTMAX:
                    p = tl.where(cm[:, None], tl.exp(x - lse[None, :]), 0.0)
                else:
                    p = tl.sigmoid(x)
                ci, cp, ct, cf, cn = _terms(x, p, lse, cls, lab, m, w, gamma, alpha, SQUARED, WITH_CE, FOCAL,
                                            HAS_ALPHA, TINY)  # fmt: skip
                # this program's own row, read back and rewritten (no other program touches it); the rows
                # are uninitialised before the first voxel block
                first = it == 0
                old = tl.load(row + cls, mask=cm, other=0.0)
                tl.store(row + cls, tl.where(first, 0.0, old) + ci, mask=cm)
                old = tl.load(row + term_stride + cls, mask=cm, other=0.0)
                tl.store(row + term_stride + cls, tl.where(first, 0.0, old) + cp, mask=cm)
                old = tl.load(row + 2 * term_stride + cls, mask=cm, other=0.0)
                tl.store(row + 2 * term_stride + cls, tl.where(first, 0.0, old) + ct, mask=cm)
                if FOCAL > 0:
                    old = tl.load(row + 3 * term_stride + cls, mask=cm, other=0.0)
                    tl.store(row + 3 * term_stride + cls, tl.where(first, 0.0, old) + cf, mask=cm)
                if WITH_CE:
                    old = tl.load(nll_row + cls, mask=cm, other=0.0)
                    tl.store(nll_row + cls, tl.where(first, 0.0, old) + cn, mask=cm)
                tl.debug_barrier()  # the next block's loads see this block's stores (other threads' too)
    if C_TILES == 1:
        cm = rows < C
        tl.store(row + rows, acc_i, mask=cm)
        tl.store(row + term_stride + rows, acc_p, mask=cm)
        tl.store(row + 2 * term_stride + rows, acc_t, mask=cm)
        if FOCAL > 0:
            tl.store(row + 3 * term_stride + rows, acc_f, mask=cm)
        if WITH_CE:
            tl.store(nll_row + rows, acc_n, mask=cm)

@triton.jit
def _softmax_grad(x, p, hit, gp, gf, m, s, kv, gamma, alpha, SQUARED: tl.constexpr, FOCAL: tl.constexpr,
                  HAS_ALPHA: tl.constexpr):  # fmt: skip
    # p_c (m gP_c h(p_c) - m s - k) + [c == t] k (+ the sigmoid-form focal term, element-wise in x)
    if SQUARED:
        q = (2.0 * gp[:, None]) * p
    else:
        q = gp[:, None] + p * 0.0
    dx = p * (q * m[None, :] - (m * s + kv)[None, :]) + tl.where(hit, kv[None, :], 0.0)
    if FOCAL == 1:
        dx += _sigmoid_focal_grad(x, hit, gamma, alpha, HAS_ALPHA) * gf[:, None] * m[None, :]
    return dx

@triton.jit
def backward_kernel(x_ptr, lab_ptr, m_ptr, w_ptr, gi_ptr, gp_ptr, gf_ptr, gn_ptr, dx_ptr, C, N, gamma, gamma_lo,
                    alpha, alpha_lo,
             SOFTMAX: tl.constexpr, SQUARED: tl.constexpr, WITH_CE: tl.constexpr, FOCAL: tl.constexpr,
             HAS_MASK: tl.constexpr, HAS_W: tl.constexpr, HAS_ALPHA: tl.constexpr, BLOCK_C: tl.constexpr,
             BLOCK_N: tl.constexpr, C_TILES: tl.constexpr, ITERS: tl.constexpr, TINY: tl.constexpr,
            ACC: tl.constexpr):  # fmt: skip
    pid = tl.program_id(0)
    b = tl.program_id(1)
    # float arguments arrive in float32: each as a float32 pair (value, remainder), exact in float64 kernels
    gamma = tl.cast(gamma, ACC) + tl.cast(gamma_lo, ACC)
    alpha = tl.cast(alpha, ACC) + tl.cast(alpha_lo, ACC)
    rows = tl.arange(0, BLOCK_C)
    cols = tl.arange(0, BLOCK_N)
    x_base = x_ptr + b.to(tl.int64) * C * N
    dx_base = dx_ptr + b.to(tl.int64) * C * N
    v_base = b.to(tl.int64) * N
    g_base = b * C  # (B, C) upstream gradient tables
    if WITH_CE:
        gn = tl.load(gn_ptr).to(ACC)
    else:
        gn = 0.0
    for it in range(ITERS):
        offs = (pid * ITERS + it) * BLOCK_N + cols
        vm = offs < N
        lab, m, w = _voxels(lab_ptr, m_ptr, w_ptr, v_base, offs, vm, HAS_MASK, HAS_W, ACC)
        gi_t = tl.load(gi_ptr + g_base + lab, mask=vm, other=0.0).to(ACC)
        if SOFTMAX:
            if C_TILES == 1:
                x, cm = _load_tile(x_base, rows, offs, vm, C, N, ACC)
                p, lse = _softmax_tile(x, cm)
                gp = tl.load(gp_ptr + g_base + rows, mask=cm, other=0.0).to(ACC)
                if SQUARED:
                    s = tl.sum(2.0 * gp[:, None] * p * p, 0)
                else:
                    s = tl.sum(gp[:, None] * p, 0)
                hit = rows[:, None] == lab[None, :]
                p_t = tl.sum(tl.where(hit, p, 0.0), 0)
                lp = tl.sum(tl.where(hit, x, 0.0), 0) - lse
            else:
                lse, s = _online_stats(x_base, rows, offs, vm, gp_ptr + g_base, C, N, SQUARED, BLOCK_C, BLOCK_N,
                                       C_TILES, ACC, True)  # fmt: skip
                # the true class's logit, a gather (the tile holding it is not known in advance)
                x_t = tl.load(x_base + lab.to(tl.int64) * N + offs, mask=vm, other=0.0).to(ACC)
                lp = x_t - lse
                p_t = tl.exp(lp)
            # the per-voxel true-class correction k = m (gI_t p_t - gN w_t + gF_t dv/dlp)
            kv = gi_t * p_t
            if WITH_CE:
                kv -= gn * w
            if FOCAL == 2:
                gf_t = tl.load(gf_ptr + g_base + lab, mask=vm, other=0.0).to(ACC)
                kv += gf_t * _softmax_focal_grad(lp, lab, gamma, alpha, HAS_ALPHA, TINY)
            kv = kv * m
            if C_TILES == 1:
                gf = gp
                if FOCAL == 1:
                    gf = tl.load(gf_ptr + g_base + rows, mask=cm, other=0.0).to(ACC)
                dx = _softmax_grad(x, p, hit, gp, gf, m, s, kv, gamma, alpha, SQUARED, FOCAL, HAS_ALPHA)
                ptrs = dx_base + rows[:, None].to(tl.int64) * N + offs[None, :]
                tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=cm[:, None] & vm[None, :])
            else:
                for t in range(C_TILES):
                    cls = t * BLOCK_C + rows
                    x, cm = _load_tile(x_base, cls, offs, vm, C, N, ACC)
                    p = tl.where(cm[:, None], tl.exp(x - lse[None, :]), 0.0)
                    gp = tl.load(gp_ptr + g_base + cls, mask=cm, other=0.0).to(ACC)
                    gf = gp
                    if FOCAL == 1:
                        gf = tl.load(gf_ptr + g_base + cls, mask=cm, other=0.0).to(ACC)
                    hit = cls[:, None] == lab[None, :]
                    dx = _softmax_grad(x, p, hit, gp, gf, m, s, kv, gamma, alpha, SQUARED, FOCAL, HAS_ALPHA)
                    ptrs = dx_base + cls[:, None].to(tl.int64) * N + offs[None, :]
                    tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=cm[:, None] & vm[None, :])
        else:
            for t in range(C_TILES):
                cls = t * BLOCK_C + rows
                x, cm = _load_tile(x_base, cls, offs, vm, C, N, ACC)
                p = tl.sigmoid(x)
                gp = tl.load(gp_ptr + g_base + cls, mask=cm, other=0.0).to(ACC)
                hit = cls[:, None] == lab[None, :]
                # dL/dp = m (gP_c h(p_c) + gI_t [c == t]), times dp/dx = p (1 - p)
                if SQUARED:
                    q = (2.0 * gp[:, None]) * p
                else:
                    q = gp[:, None] + p * 0.0
                q = (q + tl.where(hit, gi_t[None, :], 0.0)) * m[None, :]
                dx = p * (1.0 - p) * q
                if FOCAL == 1:
                    gf = tl.load(gf_ptr + g_base + cls, mask=cm, other=0.0).to(ACC)
                    dx += _sigmoid_focal_grad(x, hit, gamma, alpha, HAS_ALPHA) * gf[:, None] * m[None, :]
                ptrs = dx_base + cls[:, None].to(tl.int64) * N + offs[None, :]
                tl.store(ptrs, dx.to(dx_ptr.dtype.element_ty), mask=cm[:, None] & vm[None, :])
