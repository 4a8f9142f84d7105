// Facts about how icprune._C was compiled (compiler, C++ standard, OpenMP).
#pragma once

#include <string>

namespace icprune {

struct BuildInfo {
  std::string compiler;  // compiler identification string, e.g. "GCC 12.2.0"
  long cxx_standard;     // value of __cplusplus, e.g. 201703
  bool openmp;           // compiled with OpenMP support
  int max_threads;       // OpenMP's omp_get_max_threads(), 1 without OpenMP
};

BuildInfo build_info();

}  // namespace icprune
