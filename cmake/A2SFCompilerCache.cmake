# Use ccache when it is installed (A2SF_CCACHE=OFF to disable).
#
# base_dir is the repository root, so absolute paths below it are rewritten as
# relative ones and a fresh clone at another path (same relative layout:
# build/<tag>/llama.cpp) hits the same cache entries. Our scripts export
# CCACHE_BASEDIR too; setting it in the launcher also covers plain pip/cmake runs.
option(A2SF_CCACHE "Use ccache if found" ON)
if(A2SF_CCACHE AND NOT CMAKE_CXX_COMPILER_LAUNCHER)
  find_program(A2SF_CCACHE_PROGRAM ccache)
  if(A2SF_CCACHE_PROGRAM)
    set(_launcher "${CMAKE_COMMAND}" -E env "CCACHE_BASEDIR=${A2SF_ROOT}" "${A2SF_CCACHE_PROGRAM}")
    set(CMAKE_C_COMPILER_LAUNCHER   ${_launcher})
    set(CMAKE_CXX_COMPILER_LAUNCHER ${_launcher})
    set(CMAKE_CUDA_COMPILER_LAUNCHER ${_launcher})
    message(STATUS "a2sf: using ccache ${A2SF_CCACHE_PROGRAM} (base_dir ${A2SF_ROOT})")
  endif()
endif()
