// The one-pass online log-sum-exp of the soft-min kernels.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "exp.h"

namespace tcfa {

// Lane-wise running state of a one-pass log-sum-exp: value = log sum_l s[l] e^{m[l]}.
template <typename T> struct LseState {
  vec_t<T> m = splat<T>(lowest<T>());
  vec_t<T> s = splat<T>(T(0));

  // Folds four vectors of terms into (mm, ss) with one shared rescale: 1.25
  // exp per term instead of 2 (a two-pass max-then-sum reads the data twice
  // and was slower).
  static inline void fold4(vec_t<T>& mm, vec_t<T>& ss, vec_t<T> v0, vec_t<T> v1, vec_t<T> v2,
                           vec_t<T> v3) {
    const vec_t<T> nm = vmax<T>(vmax<T>(mm, vmax<T>(v0, v1)), vmax<T>(v2, v3));
    ss = ss * vexp<T, true>(mm - nm) + ((vexp<T, true>(v0 - nm) + vexp<T, true>(v1 - nm)) +
                                        (vexp<T, true>(v2 - nm) + vexp<T, true>(v3 - nm)));
    mm = nm;
  }
  static inline void fold1(vec_t<T>& mm, vec_t<T>& ss, vec_t<T> v) {
    const vec_t<T> nm = vmax<T>(mm, v);
    ss = ss * vexp<T, true>(mm - nm) + vexp<T, true>(v - nm);
    mm = nm;
  }

  // Folds in the terms u_j + scale * c_j, j < n.
  inline void add_affine(const T* u, const T* c, T scale, int64_t n) {
    constexpr int W = lanes<T>();
    const vec_t<T> sc = splat<T>(scale);
    // Locals, not the members: u and c may alias the members' floats, which
    // made the compiler store and reload the state every block.
    vec_t<T> mm = m, ss = s;
    int64_t j = 0;
    for (; j + 4 * W <= n; j += 4 * W)
      fold4(mm, ss, load(u + j) + sc * load(c + j), load(u + j + W) + sc * load(c + j + W),
            load(u + j + 2 * W) + sc * load(c + j + 2 * W),
            load(u + j + 3 * W) + sc * load(c + j + 3 * W));
    for (; j < n; j += W) {
      const int left = static_cast<int>(std::min<int64_t>(W, n - j));
      // padded lanes get u = -inf, c = 0, so they add exp(-inf) = 0
      vec_t<T> uu = left == W ? load(u + j) : load_partial<T>(u + j, left, -INFINITY);
      vec_t<T> cc = left == W ? load(c + j) : load_partial<T>(c + j, left, T(0));
      fold1(mm, ss, uu + sc * cc);
    }
    m = mm;
    s = ss;
  }

  inline T result() const {  // log sum exp; -inf when every term was -inf
    const T mx = hmax<T>(m);
    const vec_t<T> w = s * vexp<T, true>(m - splat<T>(mx));
    const T tot = hsum<T>(w);
    return tot > T(0) ? mx + std::log(tot) : -INFINITY;
  }
};

}  // namespace tcfa
