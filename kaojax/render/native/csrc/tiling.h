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

// Views and primitives of one call.
struct CallShape {
  int64_t views = 0, n = 0;
};

// Reads the call's shape from prims [..., N, params] and checks keys [..., N] and
// rects [..., N, 4] against it; an error says what does not fit.
template <typename Prims, typename Keys, typename Rects>
ffi::Error call_shape(const Grid& g, const Prims& prims, int64_t params, const Keys& keys,
                      const Rects& rects, CallShape* s) {
  s->n = dim_from_end(prims, 2);
  s->views = leading(prims, 2);
  if (dim_from_end(prims, 1) != params)
    return invalid("per-primitive parameters must have size " + std::to_string(params));
  if (leading(keys, 1) != s->views || dim_from_end(keys, 1) != s->n)
    return invalid("keys must be [..., N]");
  if (leading(rects, 2) != s->views || dim_from_end(rects, 2) != s->n ||
      dim_from_end(rects, 1) != 4)
    return invalid("rects must be [..., N, 4]");
  if (g.tiles_x <= 0) return invalid("bad tile size");
  return ffi::Error::Success();
}

// The FFI signatures, shared by both backends; CTX is the chain of platform
// contexts (.Ctx<ffi::ThreadPool>() on CPU; on CUDA the stream and the scratch
// allocator).
#define KAOJAX_ATTRS .Attr<int32_t>("width").Attr<int32_t>("height").Attr<int32_t>("tile_size")

// (prims, keys, rects) -> (feats, trans, counts, last)
#define KAOJAX_FORWARD_BINDING(CTX)                                                    \
  ::xla::ffi::Ffi::Bind()                                                              \
      CTX                                                                              \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>() KAOJAX_ATTRS

// (prims, keys, rects, last, trans, grad_feats, grad_trans) -> grad_prims
#define KAOJAX_BACKWARD_BINDING(CTX)                                                   \
  ::xla::ffi::Ffi::Bind()                                                              \
      CTX                                                                              \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::F32>>() KAOJAX_ATTRS

// (tris, keys, rects) -> (face_id, counts)
#define KAOJAX_MESH_BINDING(CTX)                                                       \
  ::xla::ffi::Ffi::Bind()                                                              \
      CTX                                                                              \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::F32>>()                                      \
      .Arg<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>()                                      \
      .Ret<::xla::ffi::Buffer<::xla::ffi::S32>>() KAOJAX_ATTRS

}  // namespace kaojax
