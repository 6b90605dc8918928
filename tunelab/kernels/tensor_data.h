// Typed element pointers into torch tensors, for the element types of vector_math.h (F32, BF16), shared
// by tunelab's C++ CPU kernels (cpu_attention.cpp, cpu_fused.cpp).
#pragma once

#include <torch/python.h>  // tensors, ATen and the pybind11 casters; not the C++ frontend (torch/all.h)

namespace {

template <typename S>
typename S::T* data(torch::Tensor& t) {
  return reinterpret_cast<typename S::T*>(t.data_ptr());
}

template <typename S>
const typename S::T* data(const torch::Tensor& t) {
  return reinterpret_cast<const typename S::T*>(t.data_ptr());
}

}  // namespace
