# What every build of pyfuse's kernels shares: the extension (CMakeLists.txt)
# and the standalone harness of the kernel math (tests/native/harness), so
# that the harness compiles the kernels exactly as the wheel does.
#
#   PYFUSE_KERNEL_FLAGS              flags of every kernel translation unit
#   pyfuse_generate_options(python)  csrc/options.h from pyfuse/options.py
#   PYFUSE_INCLUDE_DIRS              the repository root and that header
#   pyfuse_add_cpu_kernels(out libs) the CPU kernels, once per instruction set

set(PYFUSE_ROOT ${CMAKE_CURRENT_LIST_DIR}/..)

# Warnings as errors is a check (tests/native, CI), not a user's install: a
# newer compiler's new warning must not break `pip install pyfuse`.
option(PYFUSE_WERROR "treat the kernels' warnings as errors (-Wall -Wextra -Werror)" OFF)

set(PYFUSE_KERNEL_FLAGS
  # Bit-exact parity with MLX needs every multiply and add rounded on its
  # own, as MLX's separate ops do: no FMA contraction (clang on arm64
  # contracts by default, GCC under -std=gnu++*).
  -ffp-contract=off
  # Lets the compiler turn the kernels' selects into vector blends; it
  # changes no result, only the assumption that FP exceptions are observed.
  -fno-trapping-math
  # Metal attributes ([[kernel]], [[buffer(n)]]) in the simulated kernel:
  # unknown to GCC and clang alike, and meant to be ignored there.
  -Wno-attributes
  # The note (GCC) or warning (clang, x86-64 baseline) that vector
  # arguments change the ABI without AVX: the helpers taking vectors are
  # internal to each kernel build (unnamed namespace) and inlined, so no
  # call crosses builds. Found by the clang x86-64 harness build.
  $<$<CXX_COMPILER_ID:GNU,Clang,AppleClang>:-Wno-psabi>
  # No -march=native: wheels must run on every machine of their platform.
  -O3)
if(PYFUSE_WERROR)
  list(APPEND PYFUSE_KERNEL_FLAGS -Wall -Wextra -Werror)
endif()

# The supported bits, group sizes, policies and dtypes come from
# pyfuse/options.py, their one source: generated into csrc/options.h in the
# build tree at configure time (the kernel tables and the C++ checks' error
# messages use it), so C++ cannot drift from Python. The script uses only
# Python's standard library. Configure runs again when options.py changes
# (CMAKE_CONFIGURE_DEPENDS); the script rewrites the header only when its
# text changes, so an unchanged one rebuilds nothing.
set(PYFUSE_GENERATED_DIR ${CMAKE_CURRENT_BINARY_DIR}/generated)
# Sources include "csrc/..." and "metal/..." from the repository root, and
# the generated "csrc/options.h" from the build tree.
set(PYFUSE_INCLUDE_DIRS ${PYFUSE_ROOT} ${PYFUSE_GENERATED_DIR})
function(pyfuse_generate_options python)
  file(MAKE_DIRECTORY ${PYFUSE_GENERATED_DIR}/csrc)
  execute_process(
    COMMAND "${python}" ${PYFUSE_ROOT}/pyfuse/options.py
            --cpp-header ${PYFUSE_GENERATED_DIR}/csrc/options.h
    RESULT_VARIABLE result)
  if(NOT result EQUAL 0)
    message(FATAL_ERROR "pyfuse: generating csrc/options.h from pyfuse/options.py failed")
  endif()
  set_property(DIRECTORY APPEND PROPERTY CMAKE_CONFIGURE_DEPENDS ${PYFUSE_ROOT}/pyfuse/options.py)
endfunction()

# The CPU kernels, once per instruction set, chosen at run time
# (csrc/cpu_isa.cpp) so that one wheel runs on every machine of its
# platform: the platform baseline always; AVX2 and AVX-512 on x86-64 too.
# PYFUSE_CPU_BUILDS lists them narrowest first, with PYFUSE_CPU_FLAGS_<build>
# their flags; PYFUSE_FOR_EACH_CPU_BUILD in csrc/fuse_cpu.h is the same list
# on the C++ side (names and run-time checks). arm64, a Mac's CPU included,
# has the baseline only: NEON is part of it (GCC and clang vectorize the
# kernels' loops and vector extensions with it; the AVX2-only table lookup,
# PF_VECTOR_TABLE in csrc/math/values.h, takes its portable path there).
set(PYFUSE_CPU_BUILDS cpu_base)
set(PYFUSE_CPU_FLAGS_cpu_base "")
set(PYFUSE_CPU_DEFINITIONS "")
if(CMAKE_SYSTEM_PROCESSOR MATCHES "x86_64|AMD64|amd64")
  list(APPEND PYFUSE_CPU_BUILDS cpu_avx2 cpu_avx512)
  # AVX2 without FMA: -ffp-contract=off would forbid fusing anyway.
  set(PYFUSE_CPU_FLAGS_cpu_avx2 -mavx2)
  # AVX-512 (F, BW, DQ, VL: Skylake-SP and later, Zen 4) with 512-bit
  # vectors, which GCC otherwise avoids: 16 lanes help the 5-8-bit kernels
  # most (they compute every code's value; the <= 4-bit ones look it up).
  set(PYFUSE_CPU_FLAGS_cpu_avx512
    -mavx512f -mavx512bw -mavx512dq -mavx512vl -mprefer-vector-width=512)
  # Tells csrc/fuse_cpu.h that the x86 builds exist in this binary.
  set(PYFUSE_CPU_DEFINITIONS PYFUSE_HAVE_X86_KERNELS=1)
endif()

# Appends the kernels' object files to `out_var`; `libs`: targets the
# objects need for their include directories (the extension: mlx).
function(pyfuse_add_cpu_kernels out_var)
  set(objects ${${out_var}})
  foreach(build IN LISTS PYFUSE_CPU_BUILDS)
    # An object library per build: the same source, its own flags and its
    # own namespace (PYFUSE_CPU_ISA), linked into one binary.
    add_library(pyfuse_${build} OBJECT ${PYFUSE_ROOT}/csrc/fuse_cpu.cpp)
    target_include_directories(pyfuse_${build} PRIVATE ${PYFUSE_INCLUDE_DIRS})
    target_link_libraries(pyfuse_${build} PRIVATE ${ARGN})
    target_compile_definitions(pyfuse_${build} PRIVATE
      PYFUSE_CPU_ISA=${build} ${PYFUSE_CPU_DEFINITIONS})
    target_compile_options(pyfuse_${build} PRIVATE
      ${PYFUSE_KERNEL_FLAGS} ${PYFUSE_CPU_FLAGS_${build}})
    list(APPEND objects $<TARGET_OBJECTS:pyfuse_${build}>)
  endforeach()
  set(${out_var} ${objects} PARENT_SCOPE)
endfunction()
