"""All-pairs similarity between two stacks of layer representations: the numerics of tcfa.layer_map.

Inputs are per-layer features of the same n samples: ``xs[l]`` (n, d_l) for model A's layers,
``ys[m]`` (n, e_m) for model B's. Each function returns an (L_A, L_B) map and computes all pairs
of its metric together -- one GEMM over the concatenated layers, or batched decompositions of
blocks of equal shape -- instead of L_A x L_B separate calls. X_c denotes column-centred features.

  linear CKA       HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)),  HSIC(X, Y) = |X_c^T Y_c|_F^2 = <K_c, L_c>
                   (Kornblith et al. 2019; K = X X^T), or with the unbiased HSIC_u of Song et al. 2012
                   (``debiased``; formula in tcfa.linear_cka)
  CCA              mean of the k largest canonical correlations: singular values of
                   S_xx^-1/2 S_xy S_yy^-1/2, S = covariances + reg * (tr S / d) I (the tcfa.cca
                   convention); SVCCA-style when the layers are first reduced to principal directions
  Procrustes       |X_c^T Y_c|_* / (|X_c|_F |Y_c|_F): 1 - d^2 / 2, d the orthogonal Procrustes distance
                   of the Frobenius-normalised representations (Ding et al. 2021); 1 iff Y_c = s X_c Q

Which units and layers correspond (unit intersection, entropic GW, the monotone path):
tcfa/correspondence.py.
"""
from __future__ import annotations

import torch

from .ops import _validate
from .grams import _centred, _gram_products, _triangles_only, _use_gram
from .stats import _ratio

__all__ = ["rsa", "rdm", "pairwise_cka", "MinibatchCKA", "pairwise_cca", "pairwise_procrustes", "PairedLayers", "cka_of", "cca_of",
           "procrustes_of"]


# ------------------------------------------------------------------ inputs
def layer_features(name: str, feats, n: int | None = None, finite: bool = True) -> list[torch.Tensor]:
    """Checks a non-empty list of (n, d_l) features sharing rows, dtype and device (and finite unless
    ``finite=False``); returns it as a list."""
    if isinstance(feats, torch.Tensor) or not isinstance(feats, (list, tuple)) or not feats:
        raise TypeError(f"{name} must be a non-empty list of (n, d) feature tensors, one per layer")
    out = [_validate.tensor(f"{name}[{i}]", f, dim=2, finite=finite) for i, f in enumerate(feats)]
    n = out[0].shape[0] if n is None else n
    for i, f in enumerate(out):
        if f.shape[0] != n:
            raise ValueError(f"{name}[{i}] has {f.shape[0]} rows, expected {n} (one per sample)")
    _validate.same_dtype(**{f"{name}[{i}]": f for i, f in enumerate(out)})
    _validate.same_device(**{f"{name}[{i}]": f for i, f in enumerate(out)})
    return out


def check_layer_pair(xs, ys, least: int, finite: bool = True):
    xs = layer_features("xs", xs, finite=finite)
    ys = layer_features("ys", ys, xs[0].shape[0], finite)
    _validate.same_dtype(xs=xs[0], ys=ys[0])
    _validate.same_device(xs=xs[0], ys=ys[0])
    if xs[0].shape[0] < least:
        raise ValueError(f"xs and ys need at least {least} rows (samples), got {xs[0].shape[0]}")
    return xs, ys


# sum d * sum e beyond which the cross-covariance of all pairs is not formed (fp64: 512 MiB); flattened
# CNN maps reach it (8 layers of 64 x 8 x 8 against the same: 32768^2), pooled features never do
MAX_CROSS_ENTRIES = 1 << 26


class PairedLayers:
    """Two stacks of layer features, checked and centred once, with the cross-products of all pairs
    (X_A^T X_B over the concatenated layers) computed at most once and shared by every metric:
    tcfa.layer_map asks one metric and the unit intersection of the same features."""

    def __init__(self, xs, ys, least: int = 2):
        xs, ys = check_layer_pair(xs, ys, least)
        self.n = xs[0].shape[0]
        self.xs, self.ys = xs, ys
        self.xc, self.yc = _centred(xs), _centred(ys)
        self.wa, self.wb = _widths(xs), _widths(ys)
        self._cross = None

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.xs), len(self.ys)

    def cross_fits(self) -> bool:
        return sum(self.wa) * sum(self.wb) <= MAX_CROSS_ENTRIES

    def cross(self) -> torch.Tensor:
        """X_c,A^T X_c,B (sum d, sum e) in the compute dtype."""
        if not self.cross_fits():
            raise ValueError(f"the cross-covariance of all layer pairs would hold {sum(self.wa)} x {sum(self.wb)} "
                             f"entries (more than {MAX_CROSS_ENTRIES}): use pooled features (mode='pooled'), fewer "
                             "or narrower layers, or CKA (which then works from the n x n Grams)")
        if self._cross is None:
            self._cross = torch.cat(self.xc, 1).mT @ torch.cat(self.yc, 1)
        return self._cross

    def covariances(self):
        """Per-layer covariances of A and of B, and the cross-covariance of all pairs, fp64."""
        n = self.n
        return ([(x.mT @ x).double() / (n - 1) for x in self.xc], [(y.mT @ y).double() / (n - 1) for y in self.yc],
                self.cross().double() / (n - 1))


def _block_sum(m: torch.Tensor, rows: list[int], cols: list[int]) -> torch.Tensor:
    """(len(rows), len(cols)): the sum of each block of m cut by the row and column sizes."""
    ri = torch.repeat_interleave(torch.arange(len(rows), device=m.device), torch.tensor(rows, device=m.device))
    ci = torch.repeat_interleave(torch.arange(len(cols), device=m.device), torch.tensor(cols, device=m.device))
    by_rows = m.new_zeros(len(rows), m.shape[1]).index_add_(0, ri, m)
    return by_rows.new_zeros(len(rows), len(cols)).index_add_(1, ci, by_rows)


def _widths(feats) -> list[int]:
    return [f.shape[1] for f in feats]


# ------------------------------------------------------------------ CKA
def _hsic_all_pairs(xc, yc, unbiased: bool, use_gram: bool, cross=None, centre: bool = False,
                    check_finite: bool = False):
    """HSIC of every pair and of every layer with itself from centred features: (L_A, L_B), (L_A,), (L_B,).

    Biased: <K_c, L_c> / (n - 1)^2. Unbiased: HSIC_u with centred rows, where K~ 1 = -diag(K)
    (HSIC_u is invariant to translating the features, so centring only helps rounding).
    ``cross``: X_A^T X_B when the caller already has it (PairedLayers.cross). ``centre``: xc and yc
    are raw features, centred here (one layer at a time on the Gram route, so no centred copy of
    every layer is alive at once: 3.5 instead of 6 ms per batch of the layer_map benchmark).
    ``check_finite``: xc and yc were not checked for non-finite entries; their Grams' diagonals
    prove them finite (_finite_through_diagonals).
    """
    n, na = xc[0].shape[0], len(xc)
    given = xc, yc  # the caller's tensors, named in a non-finite error
    if use_gram:
        # every <K_l, L_m> and |K_l|^2 at once, with the Grams' diagonals (the debiased terms' row
        # norms), centred on the way in when asked (grams._gram_products)
        ct = _validate.compute_dtype(xc[0].dtype)
        prod, diag = _gram_products([f.to(ct) for f in xc + yc], centre)
        cross, self_all = prod[:na, na:], prod.diagonal()
        self_a, self_b = self_all[:na], self_all[na:]
        da, db = diag[:, :na], diag[:, na:]
    else:
        if centre:
            xc, yc = _centred(xc), _centred(yc)
        wa, wb = _widths(xc), _widths(yc)
        if cross is None:
            cross = torch.cat(xc, 1).mT @ torch.cat(yc, 1)
        cross = _block_sum(cross.square(), wa, wb).double()
        self_a = torch.stack([_gram_norm2(x) for x in xc]).double()
        self_b = torch.stack([_gram_norm2(y) for y in yc]).double()
        da = torch.stack([x.square().sum(1) for x in xc], 1).double()
        db = torch.stack([y.square().sum(1) for y in yc], 1).double()
    if check_finite:
        _finite_through_diagonals(*given, da, db)
    if not unbiased:
        return cross / (n - 1) ** 2, self_a / (n - 1) ** 2, self_b / (n - 1) ** 2

    def hsic_u(hs, diag_products, trace_products):
        return (hs - diag_products + trace_products / ((n - 1) * (n - 2))
                - 2.0 / (n - 2) * diag_products) / (n * (n - 3))

    ta, tb = da.sum(0), db.sum(0)
    return (hsic_u(cross, da.mT @ db, ta[:, None] * tb[None, :]),
            hsic_u(self_a, da.square().sum(0), ta * ta), hsic_u(self_b, db.square().sum(0), tb * tb))


def _finite_through_diagonals(xs, ys, da, db) -> None:
    """The named error for a non-finite entry of any layer, reading the layers only when the Grams'
    diagonals (n, L) are not all finite. Each diagonal entry |x_i - mean|^2 takes in every entry of its
    layer (through the column means; inf - inf is NaN), so finite diagonals prove finite features,
    without the pass over every layer that cost 4 of the 36 ms of MinibatchCKA's 16 batches in the
    layer_map benchmark (AMD EPYC)."""
    if bool(torch.isfinite(da.sum() + db.sum())):
        return
    for name, feats, diag in (("xs", xs, da), ("ys", ys, db)):
        for i, f in enumerate(feats):
            _validate.finite_through(f"{name}[{i}]", f, diag[:, i])


def _gram_norm2(x: torch.Tensor) -> torch.Tensor:
    """|X^T X|_F^2 = |X X^T|_F^2, from the smaller of the two products."""
    g = x.mT @ x if x.shape[1] <= x.shape[0] else x @ x.mT
    return g.square().sum()


def pairwise_cka(xs, ys, *, debiased: bool = False, route: str = "auto") -> torch.Tensor:
    """Linear CKA of every layer pair over all n rows, (L_A, L_B) fp64 (math: module docstring).

    Each entry equals ``tcfa.linear_cka(xs[l], ys[m], debiased)``. ``route``: "features" forms
    X_A^T X_B once for all pairs (n * sum d_l * sum e_m multiply-adds), "gram" the n x n centred
    Gram of every layer (its upper triangle, or row blocks of it when L n^2 is large: memory for one
    block, not L n^2) and the products of the flattened triangles
    (n^2 ((sum d + sum e) / 2 + L_A L_B));
    "auto" takes the cheaper. Needs n >= 4 when debiased, else n >= 2.
    """
    return cka_of(PairedLayers(xs, ys, 4 if debiased else 2), debiased, route)


def cka_of(p: PairedLayers, debiased: bool = False, route: str = "auto") -> torch.Tensor:
    """pairwise_cka of already paired layers (sharing p's cross-products with other metrics)."""
    _validate.choice("route", route, ("auto", "features", "gram"))
    if debiased and p.n < 4:
        raise ValueError(f"xs and ys need at least 4 rows (samples) for debiased CKA, got {p.n}")
    use_gram = _use_gram(route, p.n, p.wa, p.wb, _triangles_only(p.xc + p.yc)) or (route == "auto" and not p.cross_fits())
    hxy, hxx, hyy = _hsic_all_pairs(p.xc, p.yc, debiased, use_gram, None if use_gram else p.cross())
    return _ratio(hxy, hxx[:, None], hyy[None, :])


class MinibatchCKA:
    """Minibatch CKA (Nguyen et al. 2021), the estimator of torch-cka, for all pairs and conditions:

        CKA_lm = sum_b HSIC_u(K_l^b, L_m^b) / sqrt(sum_b HSIC_u(K_l^b, K_l^b) sum_b HSIC_u(L_m^b, L_m^b))

    over batches b (per condition: the batch's rows of that condition; a condition with fewer than 4
    rows in a batch skips it). Memory is independent of the number of batches.
    ``debiased=False`` sums the biased HSIC |X_c^T Y_c|^2 / (n_b - 1)^2 instead.
    """

    SUMS = ("hxy", "hxx", "hyy", "batches")  # the whole state: additive over batches (and over ranks)

    def __init__(self, num_a: int, num_b: int, num_conditions: int = 1, *, debiased: bool = True,
                 route: str = "auto"):
        self.num_a = _validate.integer("num_a", num_a, 1)
        self.num_b = _validate.integer("num_b", num_b, 1)
        self.num_conditions = _validate.integer("num_conditions", num_conditions, 1)
        self.debiased = bool(debiased)
        self.route = _validate.choice("route", route, ("auto", "features", "gram"))
        self.hxy = torch.zeros(self.num_conditions, num_a, num_b, dtype=torch.float64)
        self.hxx = torch.zeros(self.num_conditions, num_a, dtype=torch.float64)
        self.hyy = torch.zeros(self.num_conditions, num_b, dtype=torch.float64)
        self.batches = torch.zeros(self.num_conditions, dtype=torch.int64)

    def update(self, xs, ys, labels=None) -> "MinibatchCKA":
        """Adds one batch: xs, ys lists of (n_b, d) features (num_a and num_b layers), labels (n_b,)."""
        xs, ys = check_layer_pair(xs, ys, 1, finite=False)
        if (len(xs), len(ys)) != (self.num_a, self.num_b):
            raise ValueError(f"xs and ys must hold {self.num_a} and {self.num_b} layers, got {len(xs)} and {len(ys)}")
        n = xs[0].shape[0]
        least = 4 if self.debiased else 2
        # one group of all rows: the Grams' diagonals prove the features finite; otherwise some rows
        # may reach no Gram (a skipped condition, a batch too small), so every layer is read here
        derived = labels is None and n >= least
        if not derived:
            check_layer_pair(xs, ys, 1)
        if labels is None:
            groups = [(0, None)]
        else:
            labels = _validate.labels("labels", labels, n, self.num_conditions).cpu()
            groups = [(c, (labels == c).nonzero().flatten().to(xs[0].device)) for c in labels.unique().tolist()]
        for c, rows in groups:
            count = n if rows is None else rows.numel()
            if count < least:
                continue
            pick = (lambda f: f) if rows is None else (lambda f: f.index_select(0, rows))  # noqa: E731
            sub_x, sub_y = [pick(f) for f in xs], [pick(f) for f in ys]
            use_gram = _use_gram(self.route, count, _widths(sub_x), _widths(sub_y), _triangles_only(sub_x + sub_y))
            hxy, hxx, hyy = _hsic_all_pairs(sub_x, sub_y, self.debiased, use_gram, centre=True, check_finite=derived)
            self.hxy[c] += hxy.cpu()
            self.hxx[c] += hxx.cpu()
            self.hyy[c] += hyy.cpu()
            self.batches[c] += 1
        return self

    def result(self) -> torch.Tensor:
        """(C, L_A, L_B) CKA per condition; NaN for a condition no batch reached (too few rows)."""
        out = _ratio(self.hxy, self.hxx[:, :, None], self.hyy[:, None, :])
        return torch.where((self.batches > 0)[:, None, None], out, torch.full_like(out, float("nan")))


# ------------------------------------------------------------------ CCA, Procrustes (from covariances)
def pair_blocks(cross: torch.Tensor, wa: list[int], wb: list[int]):
    """((l, m), block) of every pair, in row-major pair order."""
    ra = [0, *torch.tensor(wa).cumsum(0).tolist()]
    rb = [0, *torch.tensor(wb).cumsum(0).tolist()]
    for la in range(len(wa)):
        for lb in range(len(wb)):
            yield (la, lb), cross[ra[la]:ra[la + 1], rb[lb]:rb[lb + 1]]


def _batched_over_shapes(blocks, fn, shape) -> torch.Tensor:
    """fn applied to stacks of blocks of one shape (one batched call per distinct shape)."""
    groups: dict = {}
    for key, block in blocks:
        groups.setdefault(tuple(block.shape), []).append((key, block))
    out = torch.zeros(shape, dtype=torch.float64)
    for members in groups.values():
        values = fn(torch.stack([b for _, b in members]), [k for k, _ in members])
        for (key, _), v in zip(members, values.cpu()):
            out[key] = v
    return out


def _inverse_sqrt(cov: torch.Tensor, reg: float) -> torch.Tensor:
    """(cov + reg (tr cov / d) I)^(-1/2) by eigh (tcfa.cca's regularisation)."""
    d = cov.shape[0]
    cov = cov + reg * cov.diagonal().sum() / d * torch.eye(d, dtype=cov.dtype, device=cov.device)
    w, v = torch.linalg.eigh(cov)
    return (v / w.clamp_min(torch.finfo(w.dtype).tiny).sqrt()) @ v.mT


def pairwise_cca(xs, ys, *, k: int | None = None, reg: float = 1e-4) -> torch.Tensor:
    """Mean of the k largest canonical correlations of every pair (math: module docstring), (L_A, L_B).

    ``k=None`` averages all min(d_l, e_m) correlations; a larger k than a pair has is cut to it.
    ``reg`` > 0 keeps wide layers (d > n) well posed.
    """
    k = None if k is None else _validate.integer("k", k, 1)
    reg = _validate.nonnegative("reg", reg)
    return cca_of(PairedLayers(xs, ys), k, reg)


def cca_of(p: PairedLayers, k: int | None, reg: float) -> torch.Tensor:
    """pairwise_cca of already paired layers."""
    sxx, syy, cross = p.covariances()
    wx = [_inverse_sqrt(s, reg) for s in sxx]
    wy = [_inverse_sqrt(s, reg) for s in syy]

    def mean_top(stack, keys):
        white = torch.stack([wx[a] for a, _ in keys]) @ stack @ torch.stack([wy[b] for _, b in keys])
        rho = torch.linalg.svdvals(white).clamp(0.0, 1.0)
        return rho[:, : (k or rho.shape[1])].mean(1)

    return _batched_over_shapes(pair_blocks(cross, p.wa, p.wb), mean_top, p.shape)


def pairwise_procrustes(xs, ys) -> torch.Tensor:
    """Procrustes similarity |X_c^T Y_c|_* / (|X_c|_F |Y_c|_F) of every pair, (L_A, L_B), in [0, 1]."""
    return procrustes_of(PairedLayers(xs, ys))


def procrustes_of(p: PairedLayers) -> torch.Tensor:
    """pairwise_procrustes of already paired layers. |X_c|_F^2 is a sum of squares: no layer's
    covariance is formed (the 1/(n-1) of a covariance would cancel in the ratio anyway)."""
    na = torch.stack([x.double().square().sum() for x in p.xc])
    nb = torch.stack([y.double().square().sum() for y in p.yc])
    nuclear = _batched_over_shapes(pair_blocks(p.cross().double(), p.wa, p.wb),
                                   lambda stack, keys: torch.linalg.svdvals(stack).sum(1), p.shape)
    return _ratio(nuclear, na[:, None].cpu(), nb[None, :].cpu())


# ------------------------------------------------------------------ RSA
# Dissimilarities closer than this count as tied in rsa's ranks. They are fp64 correlations of unit
# rows, and rounding (a few 1e-16 per product) splits exact ties -- identical or proportional samples,
# quantised features -- into last-bit differences, which moved Spearman by 0.02 on an 8-sample case
# with 7 zero dissimilarities. Distinct values this close change no rank sum a user could see.
TIE_TOLERANCE = 1e-12


def _average_ranks(v: torch.Tensor, tol: float) -> torch.Tensor:
    """Ranks 1..n of v, tied values sharing the mean of their ranks (Spearman's convention); values
    within ``tol`` of their sorted neighbour are tied."""
    order = v.argsort()
    s = v[order]
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[1:] = (s[1:] - s[:-1]) > tol
    inverse = starts.cumsum(0) - 1  # the tie group of each sorted value
    counts = torch.bincount(inverse)
    last = counts.cumsum(0).to(torch.float64)
    ranks = torch.empty_like(v, dtype=torch.float64)
    ranks[order] = (last - (counts.to(torch.float64) - 1) / 2)[inverse]
    return ranks


def rdm(x: torch.Tensor) -> torch.Tensor:
    """The representational dissimilarity of every pair i < j of x's rows, 1 - Pearson corr(x_i, x_j), (n(n-1)/2,).
    A row without spread has correlation 0 with every row. Computed in fp64 from the n x n correlations
    (one GEMM of the unit-norm centred rows)."""
    x = _validate.tensor("x", x, dim=2).double()
    xc = x - x.mean(1, keepdim=True)
    norm = xc.norm(dim=1, keepdim=True)
    xc = torch.where(norm > 0, xc / norm.clamp_min(1e-300), torch.zeros_like(xc))
    i, j = torch.triu_indices(x.shape[0], x.shape[0], 1, device=x.device)
    return 1 - (xc @ xc.mT)[i, j]


def rsa(x, y) -> float:
    """Representational similarity analysis of two representations of the same n samples, x (n, d1) and
    y (n, d2): the Spearman rank correlation of their RDMs (:func:`rdm`; ties, dissimilarities within
    TIE_TOLERANCE = 1e-12 of each other, share the mean of their ranks)."""
    x = _validate.tensor("x", x, dim=2)
    y = _validate.tensor("y", y, dim=2)
    if x.shape[0] != y.shape[0] or x.shape[0] < 3:
        raise ValueError(f"x and y must hold the same samples, at least 3, got {x.shape[0]} and {y.shape[0]}")
    rx, ry = _average_ranks(rdm(x), TIE_TOLERANCE), _average_ranks(rdm(y), TIE_TOLERANCE)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    den = rx.norm() * ry.norm()
    return float((rx * ry).sum() / den) if den > 0 else float("nan")
