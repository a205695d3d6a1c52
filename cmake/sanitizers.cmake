# NORMKIT_SANITIZE: what to pass to -fsanitize= ("address,undefined", or "thread"),
# for everything this project compiles and links. Clang only: the fuzz targets
# need its libFuzzer, and one instrumented build serves both (`make sanitize`).
#
# The flags go into CMAKE_CXX_FLAGS and the linker flags, not onto targets, so
# that the find_package consumer test (tests/find_package_consumer.cmake) builds
# with exactly the same ones. With ASan every binary links the one shared
# runtime (-shared-libsan), so the Python module, loaded into an uninstrumented
# interpreter with the runtime preloaded (NORMKIT_SANITIZER_PRELOAD, used by the
# Python tests), and the programs the tests start all share it.
set(NORMKIT_SANITIZE "" CACHE STRING "Sanitizers to build with (-fsanitize=...), clang only")
set(NORMKIT_SANITIZER_PRELOAD "")
if(NORMKIT_SANITIZE)
  if(NOT CMAKE_CXX_COMPILER_ID STREQUAL "Clang")
    message(FATAL_ERROR "NORMKIT_SANITIZE needs clang (configure with -DCMAKE_CXX_COMPILER=clang++-14)")
  endif()
  set(flags "-fsanitize=${NORMKIT_SANITIZE} -fno-sanitize-recover=all -fno-omit-frame-pointer -g")
  if(NORMKIT_SANITIZE MATCHES "address")
    string(APPEND flags " -shared-libsan")
    execute_process(COMMAND ${CMAKE_CXX_COMPILER} -print-file-name=libclang_rt.asan-x86_64.so
                    OUTPUT_VARIABLE NORMKIT_SANITIZER_PRELOAD OUTPUT_STRIP_TRAILING_WHITESPACE)
    get_filename_component(runtime_dir "${NORMKIT_SANITIZER_PRELOAD}" DIRECTORY)
    set(link_flags "-Wl,-rpath,${runtime_dir}")
  endif()
  string(APPEND CMAKE_CXX_FLAGS " ${flags}")
  foreach(kind EXE SHARED MODULE)
    string(APPEND CMAKE_${kind}_LINKER_FLAGS " ${flags} ${link_flags}")
  endforeach()
endif()

# The tests that load the instrumented Python module into the (uninstrumented)
# interpreter: the runtime must come first, and the interpreter's own allocations
# at exit are no leaks of ours. Nothing to do in other builds.
function(normkit_preload_sanitizer_runtime)
  if(NORMKIT_SANITIZER_PRELOAD)
    foreach(test IN LISTS ARGN)
      set_property(TEST ${test} APPEND PROPERTY ENVIRONMENT
                   "LD_PRELOAD=${NORMKIT_SANITIZER_PRELOAD}" "ASAN_OPTIONS=detect_leaks=0")
    endforeach()
  endif()
endfunction()

# NORMKIT_BUILD_FUZZERS: libFuzzer's coverage feedback must see the library's
# parsers, not only the fuzz targets, so every file gets the coverage
# instrumentation; only the fuzz targets link libFuzzer (fuzz/CMakeLists.txt),
# and the ASan runtime gives the others its no-op coverage callbacks.
if(NORMKIT_BUILD_FUZZERS)
  if(NOT NORMKIT_SANITIZE MATCHES "address")
    message(FATAL_ERROR "NORMKIT_BUILD_FUZZERS needs NORMKIT_SANITIZE=address,undefined (clang)")
  endif()
  string(APPEND CMAKE_CXX_FLAGS " -fsanitize=fuzzer-no-link")
endif()
