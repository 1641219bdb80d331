// Rasterization math shared by the CPU (cpu_ops.cc) and CUDA (cuda_ops.cu)
// backends: written once as host/device functions, compiled twice.
//
// The kernels work on primitives already projected to the screen (the
// projection stays in JAX, where autodiff gives its gradient). One view is:
//   prims [N, P]  per-primitive parameters (layout given by the Kind below)
//   keys  [N]     depth sort key (nearest first; no gradient)
//   rects [N, 4]  tile rectangle (x0, y0, x1, y1), upper corner exclusive;
//                 empty for culled primitives
// Every tile composites all the primitives covering it, sorted front to back
// by (key, index), exactly as kaojax/render/tiles.py's pure-JAX reference does
// (sort-based binning: no per-tile cap, nothing dropped).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define KJ_HD __host__ __device__ __forceinline__
#else
#define KJ_HD inline
#endif

namespace kaojax {

constexpr float kAlphaThreshold = 1.0f / 255.0f;
constexpr float kTransmittanceThreshold = 1e-4f;
constexpr float kMaxAlpha = 0.999f;

// Order of two primitives in a tile list: smaller key first, ties by index.
KJ_HD bool nearer(const float* keys, int32_t a, int32_t b) {
  return keys[a] < keys[b] || (keys[a] == keys[b] && a < b);
}

KJ_HD bool covers(const int32_t* rect, int tx, int ty) {
  return tx >= rect[0] && tx < rect[2] && ty >= rect[1] && ty < rect[3];
}

// alpha = min(0.999, opacity exp(-sigma)); its gradient w.r.t. (opacity, sigma).
KJ_HD float splat_alpha(float opacity, float sigma) {
  return fminf(kMaxAlpha, opacity * expf(-sigma));
}
KJ_HD void splat_alpha_vjp(float opacity, float sigma, float d_alpha, float* d_opacity,
                           float* d_sigma) {
  const float g = expf(-sigma);
  if (opacity * g < kMaxAlpha) {
    *d_opacity += d_alpha * g;
    *d_sigma += -d_alpha * opacity * g;
  }
}

// 2D Gaussian surfel (2DGS, gsplat's math). Parameters:
//   0-1 mean2d, 2-10 ray transform M (rows u_M, v_M, w_M), 11 opacity,
//   12-14 colour, 15-17 camera-space normal.
// Features: colour (3), intersection depth (1), normal (3).
struct SurfelKind {
  static constexpr int P = 18;
  static constexpr int F = 7;
  static constexpr float kFilterInvSquare = 2.0f;

  struct Hit {
    float hu[3], hv[3], c[3], su, sv, dx, dy, sigma, alpha;
    bool use3d;
  };

  // false where gsplat skips the pixel (no intersection, alpha < 1/255).
  KJ_HD static bool eval(const float* p, float px, float py, Hit& h, float* f) {
    const float* u = p + 2;
    const float* v = p + 5;
    const float* w = p + 8;
    for (int i = 0; i < 3; ++i) {
      h.hu[i] = px * w[i] - u[i];
      h.hv[i] = py * w[i] - v[i];
    }
    h.c[0] = h.hu[1] * h.hv[2] - h.hu[2] * h.hv[1];
    h.c[1] = h.hu[2] * h.hv[0] - h.hu[0] * h.hv[2];
    h.c[2] = h.hu[0] * h.hv[1] - h.hu[1] * h.hv[0];
    if (h.c[2] == 0.0f) return false;
    h.su = h.c[0] / h.c[2];
    h.sv = h.c[1] / h.c[2];
    const float rho3d = h.su * h.su + h.sv * h.sv;
    h.dx = p[0] - px;
    h.dy = p[1] - py;
    const float rho2d = kFilterInvSquare * (h.dx * h.dx + h.dy * h.dy);
    h.use3d = rho3d <= rho2d;
    h.sigma = 0.5f * fminf(rho3d, rho2d);
    if (h.sigma < 0.0f) return false;
    h.alpha = splat_alpha(p[11], h.sigma);
    if (h.alpha < kAlphaThreshold) return false;
    f[0] = p[12];
    f[1] = p[13];
    f[2] = p[14];
    f[3] = h.use3d ? h.su * w[0] + h.sv * w[1] + w[2] : w[2];
    f[4] = p[15];
    f[5] = p[16];
    f[6] = p[17];
    return true;
  }

  // Adds to dp [P] the gradient of d_alpha * alpha + sum_c d_f[c] * f[c].
  KJ_HD static void vjp(const float* p, float px, float py, const Hit& h, float d_alpha,
                        const float* d_f, float* dp) {
    const float* w = p + 8;
    for (int i = 0; i < 3; ++i) {
      dp[12 + i] += d_f[i];
      dp[15 + i] += d_f[4 + i];
    }
    float d_sigma = 0.0f;
    splat_alpha_vjp(p[11], h.sigma, d_alpha, &dp[11], &d_sigma);
    float d_su = 0.0f, d_sv = 0.0f, d_w[3] = {0.0f, 0.0f, 0.0f};
    const float d_depth = d_f[3];
    if (h.use3d) {
      d_su = h.su * d_sigma + d_depth * w[0];
      d_sv = h.sv * d_sigma + d_depth * w[1];
      d_w[0] += d_depth * h.su;
      d_w[1] += d_depth * h.sv;
    } else {
      const float d_rho2d = 0.5f * d_sigma;
      dp[0] += 2.0f * kFilterInvSquare * h.dx * d_rho2d;
      dp[1] += 2.0f * kFilterInvSquare * h.dy * d_rho2d;
    }
    d_w[2] += d_depth;
    const float dc[3] = {d_su / h.c[2], d_sv / h.c[2], -(d_su * h.su + d_sv * h.sv) / h.c[2]};
    // c = hu x hv: d hu = hv x dc, d hv = dc x hu
    const float d_hu[3] = {h.hv[1] * dc[2] - h.hv[2] * dc[1], h.hv[2] * dc[0] - h.hv[0] * dc[2],
                           h.hv[0] * dc[1] - h.hv[1] * dc[0]};
    const float d_hv[3] = {dc[1] * h.hu[2] - dc[2] * h.hu[1], dc[2] * h.hu[0] - dc[0] * h.hu[2],
                           dc[0] * h.hu[1] - dc[1] * h.hu[0]};
    for (int i = 0; i < 3; ++i) {
      dp[2 + i] -= d_hu[i];
      dp[5 + i] -= d_hv[i];
      dp[8 + i] += d_w[i] + px * d_hu[i] + py * d_hv[i];
    }
  }
};

// 3D Gaussian (EWA splat). Parameters: 0-1 mean2d, 2-4 conic (a, b, c of the
// inverse 2D covariance), 5 opacity, 6-8 colour, 9 centre depth.
// Features: colour (3), depth (1).
struct GaussianKind {
  static constexpr int P = 10;
  static constexpr int F = 4;

  struct Hit {
    float dx, dy, sigma, alpha;
  };

  KJ_HD static bool eval(const float* p, float px, float py, Hit& h, float* f) {
    h.dx = px - p[0];
    h.dy = py - p[1];
    h.sigma = 0.5f * (p[2] * h.dx * h.dx + p[4] * h.dy * h.dy) + p[3] * h.dx * h.dy;
    if (h.sigma < 0.0f) return false;
    h.alpha = splat_alpha(p[5], h.sigma);
    if (h.alpha < kAlphaThreshold) return false;
    f[0] = p[6];
    f[1] = p[7];
    f[2] = p[8];
    f[3] = p[9];
    return true;
  }

  KJ_HD static void vjp(const float* p, float px, float py, const Hit& h, float d_alpha,
                        const float* d_f, float* dp) {
    for (int i = 0; i < 4; ++i) dp[6 + i] += d_f[i];
    float d_sigma = 0.0f;
    splat_alpha_vjp(p[5], h.sigma, d_alpha, &dp[5], &d_sigma);
    dp[2] += 0.5f * h.dx * h.dx * d_sigma;
    dp[3] += h.dx * h.dy * d_sigma;
    dp[4] += 0.5f * h.dy * h.dy * d_sigma;
    dp[0] -= (p[2] * h.dx + p[3] * h.dy) * d_sigma;
    dp[1] -= (p[3] * h.dx + p[4] * h.dy) * d_sigma;
  }
};

// Front-to-back compositing of one pixel over a tile's sorted list `ids`
// [count]. Writes feats [F] = sum_i w_i f_i, the final transmittance and
// `last`: one past the last list entry composited (the backward pass starts
// there). A primitive that would take the transmittance to <= 1e-4 stops the
// pixel and is not composited (gsplat).
template <typename Kind>
KJ_HD void composite_pixel(const float* prims, const int32_t* ids, int count, float px,
                           float py, float* feats, float* trans_out, int32_t* last_out) {
  float acc[Kind::F];
  for (int c = 0; c < Kind::F; ++c) acc[c] = 0.0f;
  float trans = 1.0f;
  int32_t last = 0;
  for (int j = 0; j < count; ++j) {
    typename Kind::Hit h;
    float f[Kind::F];
    if (!Kind::eval(prims + (int64_t)ids[j] * Kind::P, px, py, h, f)) continue;
    const float next = trans * (1.0f - h.alpha);
    if (next <= kTransmittanceThreshold) break;
    const float w = h.alpha * trans;
    for (int c = 0; c < Kind::F; ++c) acc[c] += w * f[c];
    trans = next;
    last = j + 1;
  }
  for (int c = 0; c < Kind::F; ++c) feats[c] = acc[c];
  *trans_out = trans;
  *last_out = last;
}

// Reverse traversal of one pixel. g [F] and g_trans are the output gradients;
// `add(j, dp)` receives the gradient dp [P] of list entry j. The transmittance
// in front of each entry is recovered as T_j = T_{j+1} / (1 - alpha_j).
template <typename Kind, typename Add>
KJ_HD void composite_pixel_vjp(const float* prims, const int32_t* ids, int32_t last, float px,
                               float py, float trans_final, const float* g, float g_trans,
                               Add add) {
  float behind[Kind::F];  // sum over composited entries behind j of w_i f_i
  for (int c = 0; c < Kind::F; ++c) behind[c] = 0.0f;
  float trans = trans_final;
  for (int j = last - 1; j >= 0; --j) {
    const float* p = prims + (int64_t)ids[j] * Kind::P;
    typename Kind::Hit h;
    float f[Kind::F];
    if (!Kind::eval(p, px, py, h, f)) continue;
    const float one_minus = 1.0f - h.alpha;
    const float t_j = trans / one_minus;
    const float w = h.alpha * t_j;
    float g_f = 0.0f, g_behind = 0.0f, d_f[Kind::F];
    for (int c = 0; c < Kind::F; ++c) {
      g_f += g[c] * f[c];
      g_behind += g[c] * behind[c];
      d_f[c] = w * g[c];
    }
    const float d_alpha = t_j * g_f - (g_behind + g_trans * trans_final) / one_minus;
    float dp[Kind::P];
    for (int k = 0; k < Kind::P; ++k) dp[k] = 0.0f;
    Kind::vjp(p, px, py, h, d_alpha, d_f, dp);
    add(j, dp);
    for (int c = 0; c < Kind::F; ++c) behind[c] += w * f[c];
    trans = t_j;
  }
}

// Mesh visibility. A face is 9 floats: screen x, y and camera z of its three
// corners. Returns the perspective-correct depth of the pixel on the face, or
// +inf when the pixel is outside it (kaojax/render/mesh.py's inside test).
KJ_HD float edge_fn(float ax, float ay, float bx, float by, float px, float py) {
  return (bx - ax) * (py - ay) - (by - ay) * (px - ax);
}

KJ_HD float face_depth(const float* t, float px, float py) {
  const float area = edge_fn(t[0], t[1], t[3], t[4], t[6], t[7]);
  if (area == 0.0f) return INFINITY;
  const float b0 = edge_fn(t[3], t[4], t[6], t[7], px, py) / area;
  const float b1 = edge_fn(t[6], t[7], t[0], t[1], px, py) / area;
  const float b2 = edge_fn(t[0], t[1], t[3], t[4], px, py) / area;
  if (!(b0 >= 0.0f && b1 >= 0.0f && b2 >= 0.0f)) return INFINITY;
  const float inv = b0 / t[2] + b1 / t[5] + b2 / t[8];
  const float z = 1.0f / (inv != 0.0f ? inv : 1.0f);
  return z > 0.0f ? z : INFINITY;
}

// Nearest face of a tile's list at one pixel (first in list order on ties);
// -1 when none covers it.
KJ_HD int32_t visible_face(const float* tris, const int32_t* ids, int count, float px,
                           float py) {
  float best = INFINITY;
  int32_t face = -1;
  for (int j = 0; j < count; ++j) {
    const float z = face_depth(tris + (int64_t)ids[j] * 9, px, py);
    if (z < best) {
      best = z;
      face = ids[j];
    }
  }
  return face;
}

}  // namespace kaojax
