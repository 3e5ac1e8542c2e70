# Cross build for arm64 Linux with clang (the compiler family a Mac uses),
# against the GNU cross toolchain's headers, libraries and linker.
set(CMAKE_SYSTEM_NAME Linux)
set(CMAKE_SYSTEM_PROCESSOR aarch64)
set(CMAKE_CXX_COMPILER clang++)
set(CMAKE_CXX_COMPILER_TARGET aarch64-linux-gnu)
