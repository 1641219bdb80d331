// CPU backend of the native rasterizers: XLA FFI handlers, multithreaded on
// XLA's intra-op thread pool. Math in raster_math.h.
//
// Binning is sort-based, without a per-tile cap: the primitives of a view are
// sorted once by (key, index), then a counting pass and a fill pass (in that
// order) expand them into per-tile ranges of one intersection list, so every
// tile's range is already front to back. The lists are sized per call (the
// kernels allocate them), so nothing is ever dropped. The backward pass rebuilds
// the same lists (the binning is deterministic), writes one gradient per
// intersection and sums each primitive's intersections in a fixed order: results
// do not depend on the number of threads.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <numeric>
#include <thread>
#include <vector>

#include "raster_math.h"
#include "tiling.h"
#include "xla/ffi/api/ffi.h"

namespace kaojax {
namespace {

// Upper bound on the threads one call uses (KAOJAX_NATIVE_THREADS, default: no cap).
int64_t thread_cap() {
  static const int64_t cap = [] {
    const char* env = std::getenv("KAOJAX_NATIVE_THREADS");
    const int64_t v = env ? std::atoll(env) : 0;
    return v > 0 ? v : (int64_t)1 << 30;
  }();
  return cap;
}

// Runs fn(i) for i in [0, n) on XLA's intra-op thread pool and the calling
// thread (num_threads() workers in all). Items are claimed from a shared
// counter and the caller returns once every item is done, without waiting for
// helpers that start late (they find no work left and touch only the shared
// counters), so a busy pool cannot deadlock the call.
template <typename Fn>
void parallel_for(ffi::ThreadPool& pool, int64_t n, const Fn& fn) {
  const int64_t helpers = std::min({pool.num_threads() - 1, n - 1, thread_cap() - 1});
  if (helpers <= 0) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  struct Counters {
    std::atomic<int64_t> next{0}, done{0};
  };
  auto counters = std::make_shared<Counters>();
  const Fn* body = &fn;
  auto work = [counters, body, n] {
    for (int64_t i = counters->next++; i < n; i = counters->next++) {
      (*body)(i);
      counters->done++;
    }
  };
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  while (counters->done.load() < n) std::this_thread::yield();
}

// The tile lists of one view: tile t's primitives, nearest first, are
// ids[start[t] .. start[t + 1]). With `slots`, slot[j] is the position of list
// entry j in primitive-major order (primitive i's intersections at first[i] ..
// first[i + 1], its rectangle's tiles row by row), where the backward pass sums
// them.
struct TileLists {
  std::vector<int64_t> start;   // [tiles + 1]
  std::vector<int32_t> ids;     // [intersections]
  std::vector<int64_t> first;   // [N + 1] (with slots only)
  std::vector<int64_t> slot;    // [intersections] (with slots only)

  int32_t count(int t) const { return (int32_t)(start[t + 1] - start[t]); }
  const int32_t* list(int t) const { return ids.data() + start[t]; }
};

// A primitive's tile rectangle (x0, y0, x1, y1), clamped to the grid.
struct Rect {
  int x0, y0, x1, y1;
  int64_t tiles() const { return (int64_t)std::max(x1 - x0, 0) * std::max(y1 - y0, 0); }
};

Rect rect_of(const Grid& g, const int32_t* r) {
  return Rect{std::max(r[0], 0), std::max(r[1], 0), std::min(r[2], g.tiles_x),
              std::min(r[3], g.tiles_y)};
}

// Sort-based binning of one view: keys [N], rects [N, 4] (upper corner exclusive).
void bin_view(const Grid& g, const float* keys, const int32_t* rects, int64_t n, bool slots,
              TileLists* out) {
  const int tiles = g.num_tiles();
  std::vector<int32_t> order;
  order.reserve(n);
  for (int32_t i = 0; i < n; ++i)
    if (rect_of(g, rects + 4 * (int64_t)i).tiles() > 0) order.push_back(i);
  std::sort(order.begin(), order.end(),
            [keys](int32_t a, int32_t b) { return nearer(keys, a, b); });
  out->start.assign(tiles + 1, 0);
  for (const int32_t i : order) {
    const Rect r = rect_of(g, rects + 4 * (int64_t)i);
    for (int ty = r.y0; ty < r.y1; ++ty)
      for (int tx = r.x0; tx < r.x1; ++tx) ++out->start[ty * g.tiles_x + tx + 1];
  }
  for (int t = 0; t < tiles; ++t) out->start[t + 1] += out->start[t];
  const int64_t total = out->start[tiles];
  out->ids.resize(total);
  if (slots) {
    out->first.assign(n + 1, 0);
    for (int32_t i = 0; i < n; ++i)
      out->first[i + 1] = out->first[i] + rect_of(g, rects + 4 * (int64_t)i).tiles();
    out->slot.resize(total);
  }
  std::vector<int64_t> fill(out->start.begin(), out->start.end() - 1);
  for (const int32_t i : order) {
    const Rect r = rect_of(g, rects + 4 * (int64_t)i);
    int64_t k = slots ? out->first[i] : 0;
    for (int ty = r.y0; ty < r.y1; ++ty)
      for (int tx = r.x0; tx < r.x1; ++tx) {
        const int64_t j = fill[ty * g.tiles_x + tx]++;
        out->ids[j] = i;
        if (slots) out->slot[j] = k++;
      }
  }
}

// Bins every view (in parallel over views).
std::vector<TileLists> bin_views(ffi::ThreadPool& pool, const Grid& g, const float* keys,
                                 const int32_t* rects, int64_t views, int64_t n, bool slots) {
  std::vector<TileLists> lists(views);
  parallel_for(pool, views, [&](int64_t v) {
    bin_view(g, keys + v * n, rects + v * n * 4, n, slots, &lists[v]);
  });
  return lists;
}

// fn(x, y, flat pixel index) for the pixels of tile t of view v.
template <typename Fn>
void for_each_pixel(const Grid& g, int64_t v, int t, Fn fn) {
  const int tx = t % g.tiles_x, ty = t / g.tiles_x;
  for (int y = ty * g.tile_size; y < std::min((ty + 1) * g.tile_size, g.height); ++y)
    for (int x = tx * g.tile_size; x < std::min((tx + 1) * g.tile_size, g.width); ++x)
      fn(x, y, v * g.pixels() + (int64_t)y * g.width + x);
}

void write_counts(const Grid& g, const std::vector<TileLists>& lists, int32_t* counts) {
  const int tiles = g.num_tiles();
  for (size_t v = 0; v < lists.size(); ++v)
    for (int t = 0; t < tiles; ++t) counts[v * tiles + t] = lists[v].count(t);
}

template <typename Kind>
ffi::Error CompositeForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> prims,
                            ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::S32> rects,
                            ffi::ResultBuffer<ffi::F32> feats, ffi::ResultBuffer<ffi::F32> trans,
                            ffi::ResultBuffer<ffi::S32> counts, ffi::ResultBuffer<ffi::S32> last,
                            int32_t width, int32_t height, int32_t tile_size) {
  const Grid grid = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = call_shape(grid, prims, Kind::P, keys, rects, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const auto lists = bin_views(pool, grid, keys.typed_data(), rects.typed_data(), views, n, false);
  write_counts(grid, lists, counts->typed_data());
  const float* p = prims.typed_data();
  float* out_f = feats->typed_data();
  float* out_t = trans->typed_data();
  int32_t* out_last = last->typed_data();
  const int tiles = grid.num_tiles();
  parallel_for(pool, views * tiles, [&](int64_t vt) {
    const int64_t v = vt / tiles;
    const int t = (int)(vt % tiles);
    const TileLists& l = lists[v];
    const float* pv = p + v * n * Kind::P;
    for_each_pixel(grid, v, t, [&](int x, int y, int64_t pix) {
      composite_pixel<Kind>(pv, l.list(t), l.count(t), x + 0.5f, y + 0.5f,
                            out_f + pix * Kind::F, out_t + pix, out_last + pix);
    });
  });
  return ffi::Error::Success();
}

template <typename Kind>
ffi::Error CompositeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> prims,
                             ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::S32> rects,
                             ffi::Buffer<ffi::S32> last, ffi::Buffer<ffi::F32> trans,
                             ffi::Buffer<ffi::F32> grad_feats, ffi::Buffer<ffi::F32> grad_trans,
                             ffi::ResultBuffer<ffi::F32> grad_prims, int32_t width,
                             int32_t height, int32_t tile_size) {
  const Grid grid = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = call_shape(grid, prims, Kind::P, keys, rects, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const float* p = prims.typed_data();
  const int32_t* lst = last.typed_data();
  const float* tr = trans.typed_data();
  const float* gf = grad_feats.typed_data();
  const float* gt = grad_trans.typed_data();
  float* out = grad_prims->typed_data();
  const int tiles = grid.num_tiles();
  // One view at a time: the per-intersection gradients of a view are the
  // largest buffer, so only one view's are alive.
  std::vector<float> slots;
  for (int64_t v = 0; v < views; ++v) {
    TileLists l;
    bin_view(grid, keys.typed_data() + v * n, rects.typed_data() + v * n * 4, n, true, &l);
    slots.assign(l.ids.size() * Kind::P, 0.0f);
    const float* pv = p + v * n * Kind::P;
    parallel_for(pool, tiles, [&](int64_t t) {
      float* slot = slots.data() + l.start[t] * Kind::P;
      auto add = [slot](int j, const float* dp) {
        for (int c = 0; c < Kind::P; ++c) slot[j * Kind::P + c] += dp[c];
      };
      for_each_pixel(grid, v, (int)t, [&](int x, int y, int64_t pix) {
        composite_pixel_vjp<Kind>(pv, l.list((int)t), lst[pix], x + 0.5f, y + 0.5f, tr[pix],
                                  gf + pix * Kind::F, gt[pix], add);
      });
    });
    // Slots in primitive-major order (inverse of l.slot), then each primitive
    // sums its own intersections in rectangle order.
    std::vector<int64_t> entry(l.ids.size());
    for (size_t j = 0; j < l.ids.size(); ++j) entry[l.slot[j]] = (int64_t)j;
    float* gv = out + v * n * Kind::P;
    parallel_for(pool, n, [&](int64_t i) {
      float g[Kind::P] = {};
      for (int64_t k = l.first[i]; k < l.first[i + 1]; ++k) {
        const float* s = slots.data() + entry[k] * Kind::P;
        for (int c = 0; c < Kind::P; ++c) g[c] += s[c];
      }
      std::memcpy(gv + i * Kind::P, g, sizeof(g));
    });
  }
  return ffi::Error::Success();
}

ffi::Error MeshVisibility(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> tris,
                          ffi::Buffer<ffi::F32> keys, ffi::Buffer<ffi::S32> rects,
                          ffi::ResultBuffer<ffi::S32> face_id, ffi::ResultBuffer<ffi::S32> counts,
                          int32_t width, int32_t height, int32_t tile_size) {
  const Grid grid = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = call_shape(grid, tris, 9, keys, rects, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const auto lists = bin_views(pool, grid, keys.typed_data(), rects.typed_data(), views, n, false);
  write_counts(grid, lists, counts->typed_data());
  const float* tr = tris.typed_data();
  int32_t* out_face = face_id->typed_data();
  const int tiles = grid.num_tiles();
  parallel_for(pool, views * tiles, [&](int64_t vt) {
    const int64_t v = vt / tiles;
    const int t = (int)(vt % tiles);
    const TileLists& l = lists[v];
    for_each_pixel(grid, v, t, [&](int x, int y, int64_t pix) {
      out_face[pix] = visible_face(tr + v * n * 9, l.list(t), l.count(t), x + 0.5f, y + 0.5f);
    });
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kaojax

namespace ffi = xla::ffi;

#define KAOJAX_CPU .Ctx<ffi::ThreadPool>()

XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_forward_cpu,
                              kaojax::CompositeForward<kaojax::SurfelKind>,
                              KAOJAX_FORWARD_BINDING(KAOJAX_CPU));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_backward_cpu,
                              kaojax::CompositeBackward<kaojax::SurfelKind>,
                              KAOJAX_BACKWARD_BINDING(KAOJAX_CPU));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_forward_cpu,
                              kaojax::CompositeForward<kaojax::GaussianKind>,
                              KAOJAX_FORWARD_BINDING(KAOJAX_CPU));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_backward_cpu,
                              kaojax::CompositeBackward<kaojax::GaussianKind>,
                              KAOJAX_BACKWARD_BINDING(KAOJAX_CPU));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_mesh_visibility_cpu, kaojax::MeshVisibility,
                              KAOJAX_MESH_BINDING(KAOJAX_CPU));
