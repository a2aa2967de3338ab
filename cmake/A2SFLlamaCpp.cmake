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
# A2SF_BUILD_SERVER: also configure llama.cpp's common library and tools so that
# the `llama-server` target (tools/server, with our --kv-* flags from
# cpp/server/) can be built from the same patched tree, linked to our libllama.
# scripts/build-server.sh builds only that target (and ggml-rpc-server with
# -DGGML_RPC=ON) in build/server; the wheel build leaves it OFF.
option(A2SF_BUILD_SERVER "configure llama.cpp's llama-server (tools/server) with a2sf's --kv-* flags" OFF)
set(_a2sf_off_opts LLAMA_BUILD_TESTS LLAMA_BUILD_EXAMPLES LLAMA_BUILD_APP LLAMA_CURL LLAMA_OPENSSL
                   LLAMA_TOOLS_INSTALL LLAMA_TESTS_INSTALL GGML_BUILD_TESTS GGML_BUILD_EXAMPLES)
if(A2SF_BUILD_SERVER)
  foreach(_opt LLAMA_BUILD_COMMON LLAMA_BUILD_TOOLS LLAMA_BUILD_SERVER LLAMA_BUILD_MTMD)
    set(${_opt} ON CACHE BOOL "set by a2sf (A2SF_BUILD_SERVER)" FORCE)
  endforeach()
  # no npm and no download of the web UI: the server serves its API only
  list(APPEND _a2sf_off_opts LLAMA_BUILD_UI LLAMA_USE_PREBUILT_UI)
  # every library beside the binaries (their rpath is $ORIGIN)
  set(CMAKE_RUNTIME_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}/bin")
  set(CMAKE_LIBRARY_OUTPUT_DIRECTORY "${CMAKE_BINARY_DIR}/bin")
else()
  list(APPEND _a2sf_off_opts LLAMA_BUILD_COMMON LLAMA_BUILD_TOOLS LLAMA_BUILD_SERVER LLAMA_BUILD_MTMD)
endif()
foreach(_opt IN LISTS _a2sf_off_opts)
  set(${_opt} OFF CACHE BOOL "set by a2sf" FORCE)
endforeach()
# GGML_NATIVE keeps llama.cpp's default (ON for local builds); override with
# -DGGML_NATIVE=OFF (e.g. CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install .).

# AMX: with GGML_NATIVE=ON on a CPU that reports amx_tile/amx_int8, -march=native
# turns on ggml's AMX kernels (ggml-cpu/amx/) and an "AMX" weight buffer type.
# Those kernels cache the tile configuration per thread, and on VMs that do not
# keep the tile state they die with SIGILL/SIGSEGV at the first matrix product
# (docs/BUILD.md, "AMX"). So by default every ggml-cpu target is compiled with
# -mno-amx-*: the AVX-512/VNNI kernels run instead. Opt in where AMX is known
# to work: -DA2SF_AMX=ON (e.g. CMAKE_ARGS="-DA2SF_AMX=ON" bash scripts/setup.sh).
option(A2SF_AMX "let -march=native / GGML_AMX_* compile ggml's AMX kernels" OFF)

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

# --- no AMX code unless asked for (see A2SF_AMX above) -----------------------
set(A2SF_NO_AMX_FLAGS "")
if(NOT A2SF_AMX AND CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86|x86)$"
   AND CMAKE_C_COMPILER_ID MATCHES "GNU|Clang")
  include(CheckCCompilerFlag)
  # GCC does not let -mno-amx-tile switch off the AMX extensions built on it:
  # name each one the compiler knows. Explicit -mno-* flags win over
  # -march=native whatever their order (GCC), and come last anyway (Clang).
  foreach(_isa amx-tile amx-int8 amx-bf16 amx-fp16 amx-complex amx-transpose amx-avx512 amx-tf32 amx-fp8 amx-movrs)
    string(MAKE_C_IDENTIFIER "A2SF_HAVE_NO_${_isa}" _var)
    check_c_compiler_flag("-mno-${_isa}" ${_var})
    if(${_var})
      list(APPEND A2SF_NO_AMX_FLAGS "-mno-${_isa}")
    endif()
  endforeach()
  get_property(_a2sf_ggml_targets DIRECTORY "${A2SF_LLAMA_CPP_SOURCE_DIR}/ggml/src" PROPERTY BUILDSYSTEM_TARGETS)
  foreach(_t IN LISTS _a2sf_ggml_targets)
    if(_t MATCHES "^ggml-cpu")
      target_compile_options(${_t} PRIVATE "$<$<COMPILE_LANGUAGE:C,CXX>:${A2SF_NO_AMX_FLAGS}>")
    endif()
  endforeach()
  message(STATUS "a2sf: ggml-cpu built without AMX (${A2SF_NO_AMX_FLAGS}); -DA2SF_AMX=ON to allow it")
endif()
