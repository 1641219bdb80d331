// Per-view geometry of the tile grid, the checks on the buffers that XLA hands
// to a handler and the handlers' FFI signatures; shared by the CPU and CUDA
// backends.
#pragma once

#include <cstdint>
#include <string>

#include "raster_math.h"
#include "xla/ffi/api/ffi.h"

namespace kaojax {

namespace ffi = xla::ffi;

struct Grid {
  int width, height, tile_size, tiles_x, tiles_y;
  KJ_HD int num_tiles() const { return tiles_x * tiles_y; }
  KJ_HD int pixels() const { return width * height; }
};

inline Grid make_grid(int32_t width, int32_t height, int32_t tile_size) {
  Grid g{width, height, tile_size, 0, 0};
  if (tile_size > 0) {
    g.tiles_x = (width + tile_size - 1) / tile_size;
    g.tiles_y = (height + tile_size - 1) / tile_size;
  }
  return g;
}

// The batch of views is every axis in front of the last `trailing` ones.
template <typename B>
int64_t leading(const B& buf, int trailing) {
  auto dims = buf.dimensions();
  int64_t n = 1;
  for (int i = 0; i + trailing < (int)dims.size(); ++i) n *= dims[i];
  return n;
}

template <typename B>
int64_t dim_from_end(const B& buf, int k) {
  auto dims = buf.dimensions();
  return (int)dims.size() >= k ? dims[dims.size() - k] : -1;
}

inline ffi::Error invalid(const std::string& what) {
  return ffi::Error::InvalidArgument("kaojax native rasterizer: " + what);
}

// Views, primitives and tile-list capacity of one call.
struct CallShape {
  int64_t views = 0, n = 0;
  int32_t capacity = 0;
};

// Reads the call's shape from prims [..., N, params] and the tile lists
// [..., num_tiles, capacity]; an error says what does not fit.
template <typename Prims, typename Ids>
ffi::Error call_shape(const Grid& g, const Prims& prims, int64_t params, const Ids& ids,
                      CallShape* s) {
  s->n = dim_from_end(prims, 2);
  s->views = leading(prims, 2);
  s->capacity = (int32_t)dim_from_end(ids, 1);
  if (dim_from_end(prims, 1) != params)
    return invalid("per-primitive parameters must have size " + std::to_string(params));
  if (leading(ids, 2) != s->views || dim_from_end(ids, 2) != g.num_tiles())
    return invalid("tile list buffer does not match the tile grid");
  if (g.tiles_x <= 0 || s->capacity <= 0) return invalid("bad tile size or capacity");
  return ffi::Error::Success();
}

// The FFI signatures, shared by both backends; CTX is the platform context
// (ffi::ThreadPool on CPU, ffi::PlatformStream<cudaStream_t> on CUDA).
#define KAOJAX_ATTRS .Attr<int32_t>("width").Attr<int32_t>("height").Attr<int32_t>("tile_size")

// (prims, keys, rects) -> (feats, trans, ids, counts, last)
#define KAOJAX_FORWARD_BINDING(CTX)                                                    \
  ::xla::ffi::Ffi::Bind()                                                              \
      .Ctx<CTX>()                                                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>() KAOJAX_ATTRS

// (prims, ids, counts, last, trans, grad_feats, grad_trans) -> (grad_prims, slot_grads)
#define KAOJAX_BACKWARD_BINDING(CTX)                                                   \
  ::xla::ffi::Ffi::Bind()                                                              \
      .Ctx<CTX>()                                                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>() KAOJAX_ATTRS

// (tris, keys, rects) -> (face_id, ids, counts)
#define KAOJAX_MESH_BINDING(CTX)                                                       \
  ::xla::ffi::Ffi::Bind()                                                              \
      .Ctx<CTX>()                                                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>() KAOJAX_ATTRS

}  // namespace kaojax
