// CPU backend of the native rasterizers: XLA FFI handlers, multithreaded over
// (view, tile) pairs on XLA's intra-op thread pool. Math in raster_math.h.
// Tile lists, per-slot gradients and outputs all live in buffers that XLA
// provides; the kernels allocate no buffers of their own.
#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <thread>

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

// The `capacity` nearest primitives covering tile (tx, ty), nearest first, in
// ids [capacity] (a bounded max-heap while scanning). Returns how many cover it.
int32_t select_tile(const float* keys, const int32_t* rects, int64_t n, int tx, int ty,
                    int32_t capacity, int32_t* ids) {
  auto farther = [keys](int32_t a, int32_t b) { return nearer(keys, a, b); };
  int32_t size = 0, count = 0;
  for (int32_t i = 0; i < n; ++i) {
    if (!covers(rects + 4 * (int64_t)i, tx, ty)) continue;
    ++count;
    if (size < capacity) {
      ids[size++] = i;
      std::push_heap(ids, ids + size, farther);
    } else if (nearer(keys, i, ids[0])) {
      std::pop_heap(ids, ids + size, farther);
      ids[size - 1] = i;
      std::push_heap(ids, ids + size, farther);
    }
  }
  std::sort_heap(ids, ids + size, farther);
  std::fill(ids + size, ids + capacity, -1);
  return count;
}

// fn(view, tile x, tile y, flat tile index) for every tile of every view, in parallel.
template <typename Fn>
void for_each_tile(ffi::ThreadPool& pool, const Grid& g, int64_t views, Fn fn) {
  const int tiles = g.num_tiles();
  parallel_for(pool, views * tiles, [&](int64_t vt) {
    const int t = (int)(vt % tiles);
    fn(vt / tiles, t % g.tiles_x, t / g.tiles_x, vt);
  });
}

// fn(x, y, flat pixel index) for the pixels of tile (tx, ty) of view v.
template <typename Fn>
void for_each_pixel(const Grid& g, int64_t v, int tx, int ty, Fn fn) {
  for (int y = ty * g.tile_size; y < std::min((ty + 1) * g.tile_size, g.height); ++y)
    for (int x = tx * g.tile_size; x < std::min((tx + 1) * g.tile_size, g.width); ++x)
      fn(x, y, v * g.pixels() + (int64_t)y * g.width + x);
}

template <typename Kind>
ffi::Error CompositeForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> prims, ffi::Buffer<ffi::F32> keys,
                            ffi::Buffer<ffi::S32> rects, ffi::ResultBuffer<ffi::F32> feats,
                            ffi::ResultBuffer<ffi::F32> trans, ffi::ResultBuffer<ffi::S32> ids,
                            ffi::ResultBuffer<ffi::S32> counts,
                            ffi::ResultBuffer<ffi::S32> last, int32_t width, int32_t height,
                            int32_t tile_size) {
  const Grid grid = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = call_shape(grid, prims, Kind::P, *ids, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int32_t capacity = shape.capacity;
  if (leading(keys, 1) != views || dim_from_end(keys, 1) != n) return invalid("keys must be [..., N]");
  const float* p = prims.typed_data();
  const float* k = keys.typed_data();
  const int32_t* r = rects.typed_data();
  float* out_f = feats->typed_data();
  float* out_t = trans->typed_data();
  int32_t* out_ids = ids->typed_data();
  int32_t* out_counts = counts->typed_data();
  int32_t* out_last = last->typed_data();
  for_each_tile(pool, grid, views, [&](int64_t v, int tx, int ty, int64_t vt) {
    int32_t* list = out_ids + vt * capacity;
    const int32_t count = select_tile(k + v * n, r + v * n * 4, n, tx, ty, capacity, list);
    out_counts[vt] = count;
    const int kept = std::min(count, capacity);
    const float* pv = p + v * n * Kind::P;
    for_each_pixel(grid, v, tx, ty, [&](int x, int y, int64_t pix) {
      composite_pixel<Kind>(pv, list, kept, x + 0.5f, y + 0.5f, out_f + pix * Kind::F,
                            out_t + pix, out_last + pix);
    });
  });
  return ffi::Error::Success();
}

template <typename Kind>
ffi::Error CompositeBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> prims, ffi::Buffer<ffi::S32> ids,
                             ffi::Buffer<ffi::S32> counts, ffi::Buffer<ffi::S32> last,
                             ffi::Buffer<ffi::F32> trans, ffi::Buffer<ffi::F32> grad_feats,
                             ffi::Buffer<ffi::F32> grad_trans,
                             ffi::ResultBuffer<ffi::F32> grad_prims,
                             ffi::ResultBuffer<ffi::F32> slot_grads, int32_t width,
                             int32_t height, int32_t tile_size) {
  const Grid grid = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = call_shape(grid, prims, Kind::P, ids, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int32_t capacity = shape.capacity;
  const float* p = prims.typed_data();
  const int32_t* list_all = ids.typed_data();
  const int32_t* cnt = counts.typed_data();
  const int32_t* lst = last.typed_data();
  const float* tr = trans.typed_data();
  const float* gf = grad_feats.typed_data();
  const float* gt = grad_trans.typed_data();
  float* slots = slot_grads->typed_data();
  float* out = grad_prims->typed_data();
  const int tiles = grid.num_tiles();
  for_each_tile(pool, grid, views, [&](int64_t v, int tx, int ty, int64_t vt) {
    const int32_t* list = list_all + vt * capacity;
    float* slot = slots + vt * capacity * Kind::P;
    std::memset(slot, 0, sizeof(float) * capacity * Kind::P);
    const float* pv = p + v * n * Kind::P;
    auto add = [slot](int j, const float* dp) {
      for (int c = 0; c < Kind::P; ++c) slot[j * Kind::P + c] += dp[c];
    };
    for_each_pixel(grid, v, tx, ty, [&](int x, int y, int64_t pix) {
      composite_pixel_vjp<Kind>(pv, list, lst[pix], x + 0.5f, y + 0.5f, tr[pix],
                                gf + pix * Kind::F, gt[pix], add);
    });
  });
  // Sum the slots of each view into its primitives, tile by tile (deterministic).
  parallel_for(pool, views, [&](int64_t v) {
    float* gv = out + v * n * Kind::P;
    std::memset(gv, 0, sizeof(float) * n * Kind::P);
    for (int t = 0; t < tiles; ++t) {
      const int64_t vt = v * tiles + t;
      const int kept = std::min(cnt[vt], capacity);
      for (int j = 0; j < kept; ++j) {
        const float* s = slots + (vt * capacity + j) * Kind::P;
        float* g = gv + (int64_t)list_all[vt * capacity + j] * Kind::P;
        for (int c = 0; c < Kind::P; ++c) g[c] += s[c];
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error MeshVisibility(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> tris, ffi::Buffer<ffi::F32> keys,
                          ffi::Buffer<ffi::S32> rects, ffi::ResultBuffer<ffi::S32> face_id,
                          ffi::ResultBuffer<ffi::S32> ids, ffi::ResultBuffer<ffi::S32> counts,
                          int32_t width, int32_t height, int32_t tile_size) {
  const Grid grid = make_grid(width, height, tile_size);
  CallShape shape;
  if (auto e = call_shape(grid, tris, 9, *ids, &shape); e.failure()) return e;
  const int64_t n = shape.n, views = shape.views;
  const int32_t capacity = shape.capacity;
  const float* tr = tris.typed_data();
  const float* k = keys.typed_data();
  const int32_t* r = rects.typed_data();
  int32_t* out_face = face_id->typed_data();
  int32_t* out_ids = ids->typed_data();
  int32_t* out_counts = counts->typed_data();
  for_each_tile(pool, grid, views, [&](int64_t v, int tx, int ty, int64_t vt) {
    int32_t* list = out_ids + vt * capacity;
    const int32_t count = select_tile(k + v * n, r + v * n * 4, n, tx, ty, capacity, list);
    out_counts[vt] = count;
    const int kept = std::min(count, capacity);
    for_each_pixel(grid, v, tx, ty, [&](int x, int y, int64_t pix) {
      out_face[pix] = visible_face(tr + v * n * 9, list, kept, x + 0.5f, y + 0.5f);
    });
  });
  return ffi::Error::Success();
}

}  // namespace
}  // namespace kaojax

namespace ffi = xla::ffi;

XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_forward_cpu,
                              kaojax::CompositeForward<kaojax::SurfelKind>,
                              KAOJAX_FORWARD_BINDING(ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_surfel_backward_cpu,
                              kaojax::CompositeBackward<kaojax::SurfelKind>,
                              KAOJAX_BACKWARD_BINDING(ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_forward_cpu,
                              kaojax::CompositeForward<kaojax::GaussianKind>,
                              KAOJAX_FORWARD_BINDING(ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_gaussian_backward_cpu,
                              kaojax::CompositeBackward<kaojax::GaussianKind>,
                              KAOJAX_BACKWARD_BINDING(ffi::ThreadPool));
XLA_FFI_DEFINE_HANDLER_SYMBOL(kaojax_mesh_visibility_cpu, kaojax::MeshVisibility,
                              KAOJAX_MESH_BINDING(ffi::ThreadPool));
