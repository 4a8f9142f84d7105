// Bindings of the running-statistics routines, registered by PYBIND11_MODULE (bindings.cpp).
#pragma once

#include <pybind11/pybind11.h>

namespace icprune {

void bind_stats(pybind11::module_& m);

}  // namespace icprune
