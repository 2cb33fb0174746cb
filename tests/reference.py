"""Naive references for the OT ops, written straight from the docstrings in tcfa/ops/__init__.py.

They loop over problems and build every cost matrix explicitly: slow and
obviously right, which is the point.
"""
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


def sinkhorn_loop(C_flat, xo, yo, log_a, log_b, f, g, eps, max_iter, tol, tau_a=1.0, tau_b=1.0):
    """The iterations of ops.sinkhorn_dense, problem by problem, on explicit costs."""
    f, g = f.clone(), g.clone()
    B = len(xo) - 1
    n_iter = torch.zeros(B, dtype=torch.int64)
    error = torch.zeros(B, dtype=f.dtype)
    start = 0
    for k, sx, sy in problems(xo, yo):
        n, m = sx.stop - sx.start, sy.stop - sy.start
        C = C_flat[start:start + n * m].reshape(n, m)
        start += n * m
        for t in range(1, max_iter + 1):
            g[sy] = -tau_b * eps * torch.logsumexp(log_a[sx, None] + (f[sx, None] - C) / eps, dim=0)
            f_new = -tau_a * eps * torch.logsumexp(log_b[None, sy] + (g[None, sy] - C) / eps, dim=1)
            error[k] = (log_a[sx].exp() * torch.expm1((f[sx] - f_new) / eps).abs()).sum()
            f[sx] = f_new
            n_iter[k] = t
            if error[k] < tol:
                break
    return f, g, n_iter, error
