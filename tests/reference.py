"""Naive references for the OT ops, written straight from the docstrings in tcfa/ops/__init__.py.

They loop over problems and build every cost matrix explicitly: slow and
obviously right, which is the point.
"""
import math
import torch


def cost(x, y, kind):
    if kind == "sqeuclidean":
        return ((x[:, None, :] - y[None, :, :]) ** 2).sum(-1)
    xn = x / x.norm(dim=1, keepdim=True)
    yn = y / y.norm(dim=1, keepdim=True)
    return 1 - xn @ yn.T


def problems(xo, yo):
    for k in range(len(xo) - 1):
        yield k, slice(int(xo[k]), int(xo[k + 1])), slice(int(yo[k]), int(yo[k + 1]))


def softmin(x, y, xo, yo, h, log_b, eps, kind="sqeuclidean"):
    out = torch.zeros(x.shape[0], dtype=x.dtype)
    for _, sx, sy in problems(xo, yo):
        C = cost(x[sx], y[sy], kind)
        out[sx] = -eps * torch.logsumexp(log_b[sy] + (h[sy] - C) / eps, dim=1)
    return out


def cost_flat(x, y, xo, yo, kind="sqeuclidean"):
    return torch.cat([cost(x[sx], y[sy], kind).reshape(-1) for _, sx, sy in problems(xo, yo)])


def barycentric(x, y, xo, yo, g, log_b, values, eps, kind="sqeuclidean"):
    out = torch.zeros(x.shape[0], values.shape[1], dtype=values.dtype)
    for _, sx, sy in problems(xo, yo):
        C = cost(x[sx], y[sy], kind)
        out[sx] = torch.softmax(log_b[sy] + (g[sy] - C) / eps, dim=1) @ values[sy]
    return out


def sinkhorn_plan(a, b, C, eps, iters=20000, tol=1e-14):
    """Plain log-domain Sinkhorn on one explicit cost; returns the plan."""
    f = torch.zeros_like(a)
    g = torch.zeros_like(b)
    for _ in range(iters):
        g = -eps * torch.logsumexp(a.log()[:, None] + (f[:, None] - C) / eps, dim=0)
        f_new = -eps * torch.logsumexp(b.log()[None, :] + (g[None, :] - C) / eps, dim=1)
        done = (f_new - f).abs().max() < tol
        f = f_new
        if done:
            break
    return (a.log()[:, None] + b.log()[None, :] + (f[:, None] + g[None, :] - C) / eps).exp()


def guarded(v, v_plain, eps, tau, rho, w):
    """v + w (v_T - v), v_T = tau v_plain, entry by entry where it does not lower the dual objective, else v_T.

    The dual objective as a function of one potential entry v (the others fixed, s = e^{(v - v_plain)/eps}
    its marginal ratio): phi(v) - eps s e^{(v' - v)/eps} up to constants, phi(v) = v for an exact
    marginal, rho (1 - e^{-v/rho}) for a KL-relaxed one.
    """
    v_T = tau * v_plain
    v_new = v + w * (v_T - v)
    # phi(v_new) - phi(v), for KL as rho e^{-v/rho} (1 - e^{-(v_new - v)/rho}): differences of phi
    # values cancel, both when v >> rho and when v_new is close to v (a flipped decision there
    # moved a potential by 6e-10 in fp64)
    dphi = v_new - v if math.isinf(rho) else -rho * torch.exp(-v / rho) * torch.expm1(-(v_new - v) / rho)
    s = torch.exp((v - v_plain) / eps)
    change = dphi - eps * s * torch.expm1((v_new - v) / eps)
    return torch.where(change >= 0, v_new, v_T)


def sinkhorn_loop(C_flat, xo, yo, log_a, log_b, f, g, eps, max_iter, tol, tau_a=1.0, tau_b=1.0, schedule=(),
                  omega=1.0, symmetric=None):
    """The iterations of ops.sinkhorn_dense, problem by problem, on explicit costs."""
    f, g = f.clone(), g.clone()
    B, S = len(xo) - 1, len(schedule)
    n_iter = torch.zeros(B, dtype=torch.int64)
    error = torch.zeros(B, dtype=f.dtype)
    rho = [math.inf if tau == 1 else eps * tau / (1 - tau) for tau in (tau_a, tau_b)]

    def stage(t, side):  # (eps, tau) of iteration t >= 0 on side 0 (f) or 1 (g)
        e = schedule[max(t, 1) - 1] if max(t, 1) <= S else eps
        return e, 1.0 if math.isinf(rho[side]) else rho[side] / (rho[side] + e)

    start = 0
    for k, sx, sy in problems(xo, yo):
        n, m = sx.stop - sx.start, sy.stop - sy.start
        C = C_flat[start:start + n * m].reshape(n, m)
        start += n * m
        if symmetric is not None and symmetric[k]:  # one potential, averaged, at eps from the start
            tau = 1.0 if math.isinf(rho[0]) else rho[0] / (rho[0] + eps)
            for t in range(1, max_iter + 1):
                p_T = -tau * eps * torch.logsumexp(log_b[None, sy] + (f[None, sx] - C) / eps, dim=1)
                error[k] = 2 * (log_a[sx].exp() * torch.expm1((f[sx] - p_T) / eps).abs()).sum()
                f[sx] = 0.5 * (f[sx] + p_T)
                n_iter[k] = t
                if error[k] < tol:
                    break
            g[sy] = f[sx]
            continue
        for t in range(1, max_iter + 1):
            w = omega if t > S + 1 else 1.0
            e, tau = stage(t - 1, 1)
            g_plain = -e * torch.logsumexp(log_a[sx, None] + (f[sx, None] - C) / e, dim=0)
            g_new = guarded(g[sy], g_plain, e, tau, rho[1], w)
            col = (log_b[sy].exp() * torch.expm1((g_new - tau * g_plain) / e).abs()).sum()
            g[sy] = g_new
            e, tau = stage(t, 0)
            f_plain = -e * torch.logsumexp(log_b[None, sy] + (g[None, sy] - C) / e, dim=1)
            error[k] = (log_a[sx].exp() * torch.expm1((f[sx] - tau * f_plain) / e).abs()).sum() + col
            f[sx] = guarded(f[sx], f_plain, e, tau, rho[0], w)
            n_iter[k] = t
            if t > S and error[k] < tol:
                break
    return f, g, n_iter, error
