# Obtain, patch and add the llama.cpp tree that a2sf builds on.
#
#   A2SF_LLAMA_CPP_DIR  (cache path)  a user's llama.cpp tree; empty: the tree in
#                       the llama-cpp-python sdist (fetched once into a cache dir
#                       by cpp/scripts/fetch_llama_cpp.py)
#
# The tree is copied to ${CMAKE_BINARY_DIR}/llama.cpp and the patch series
# cpp/patches/*.patch is applied (cpp/scripts/prepare_llama_cpp.py); that is
# redone only when the source, the series or the scripts change.
# Sets A2SF_LLAMA_CPP_SOURCE_DIR, A2SF_LLAMA_CPP_COMMIT, A2SF_PATCH_SERIES.

set(A2SF_LLAMA_CPP_DIR "" CACHE PATH "llama.cpp source tree to build (default: the one in the llama-cpp-python sdist)")

set(_a2sf_scripts "${A2SF_ROOT}/cpp/scripts")
set(_a2sf_patch_dir "${A2SF_ROOT}/cpp/patches")

if(A2SF_LLAMA_CPP_DIR)
  get_filename_component(_a2sf_src "${A2SF_LLAMA_CPP_DIR}" ABSOLUTE)
else()
  execute_process(
    COMMAND "${Python_EXECUTABLE}" "${_a2sf_scripts}/fetch_llama_cpp.py"
    OUTPUT_VARIABLE _a2sf_src
    OUTPUT_STRIP_TRAILING_WHITESPACE
    RESULT_VARIABLE _a2sf_rc)
  if(NOT _a2sf_rc EQUAL 0)
    message(FATAL_ERROR "a2sf: fetching the llama.cpp tree failed (see above). "
                        "Pass -DA2SF_LLAMA_CPP_DIR=<llama.cpp dir> to use your own tree.")
  endif()
endif()
message(STATUS "a2sf: llama.cpp source: ${_a2sf_src}")

set(A2SF_LLAMA_CPP_SOURCE_DIR "${CMAKE_BINARY_DIR}/llama.cpp")
execute_process(
  COMMAND "${Python_EXECUTABLE}" "${_a2sf_scripts}/prepare_llama_cpp.py"
          --src "${_a2sf_src}" --dest "${A2SF_LLAMA_CPP_SOURCE_DIR}"
          --patches "${_a2sf_patch_dir}"
          --info "${CMAKE_BINARY_DIR}/a2sf-llama-info.cmake"
  RESULT_VARIABLE _a2sf_rc)
if(NOT _a2sf_rc EQUAL 0)
  message(FATAL_ERROR "a2sf: preparing the patched llama.cpp tree failed (the failing patch is named above)")
endif()
include("${CMAKE_BINARY_DIR}/a2sf-llama-info.cmake")
message(STATUS "a2sf: llama.cpp commit ${A2SF_LLAMA_CPP_COMMIT}; patches: ${A2SF_PATCH_SERIES}")

# Re-run configure (and so the patch step) when the series or the scripts change.
file(GLOB _a2sf_patches CONFIGURE_DEPENDS "${_a2sf_patch_dir}/*.patch")
set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS
  ${_a2sf_patches}
  "${_a2sf_scripts}/apply-patches.sh"
  "${_a2sf_scripts}/prepare_llama_cpp.py"
  "${_a2sf_scripts}/fetch_llama_cpp.py")

# --- llama.cpp options ------------------------------------------------------
set(BUILD_SHARED_LIBS ON CACHE BOOL "" FORCE)
foreach(_opt LLAMA_BUILD_COMMON LLAMA_BUILD_TOOLS LLAMA_BUILD_TESTS LLAMA_BUILD_EXAMPLES
             LLAMA_BUILD_SERVER LLAMA_BUILD_APP LLAMA_BUILD_MTMD LLAMA_CURL LLAMA_OPENSSL
             LLAMA_TOOLS_INSTALL LLAMA_TESTS_INSTALL GGML_BUILD_TESTS GGML_BUILD_EXAMPLES)
  set(${_opt} OFF CACHE BOOL "set by a2sf" FORCE)
endforeach()
# GGML_NATIVE keeps llama.cpp's default (ON for local builds); override with
# -DGGML_NATIVE=OFF (e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install .).

# Stable build info: the copied tree lives inside our own git checkout, and
# llama.cpp/ggml ask git for "their" commit, which would then be ours (and
# change, forcing recompiles, at every commit). Give them the pinned one and
# keep git from looking above the tree.
string(SUBSTRING "${A2SF_LLAMA_CPP_COMMIT}" 0 7 _a2sf_short)
set(LLAMA_BUILD_COMMIT "${_a2sf_short}")
set(LLAMA_BUILD_NUMBER 0)
set(ENV{GIT_CEILING_DIRECTORIES} "${CMAKE_BINARY_DIR}")

add_subdirectory("${A2SF_LLAMA_CPP_SOURCE_DIR}" "${CMAKE_BINARY_DIR}/llama.cpp-build")
unset(ENV{GIT_CEILING_DIRECTORIES})
