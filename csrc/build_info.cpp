#include "build_info.h"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace icprune {

BuildInfo build_info() {
  BuildInfo info;
#if defined(__clang__)
  info.compiler = std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  info.compiler = std::string("GCC ") + __VERSION__;
#elif defined(_MSC_VER)
  info.compiler = "MSVC " + std::to_string(_MSC_VER);
#else
  info.compiler = "unknown";
#endif
  info.cxx_standard = static_cast<long>(__cplusplus);
#ifdef _OPENMP
  info.openmp = true;
  info.max_threads = omp_get_max_threads();
#else
  info.openmp = false;
  info.max_threads = 1;
#endif
  return info;
}

}  // namespace icprune
