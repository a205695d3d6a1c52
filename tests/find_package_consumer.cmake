# ctest "find_package_consumer": install the built library into a fresh prefix,
# configure and build examples/consumer against it with find_package(normkit),
# and run the consumer. Invoked with cmake -P and these variables:
#   NORMKIT_BUILD_DIR  the normkit build tree to install
#   CONSUMER_SOURCE    examples/consumer
#   WORK_DIR           scratch directory (emptied first)
#   CXX_COMPILER, MAKE_PROGRAM   the toolchain of the main build
#   CXX_FLAGS, EXE_LINKER_FLAGS  its flags (a sanitizer build's library needs
#                                the sanitizer runtime in whatever links it)
set(prefix "${WORK_DIR}/prefix")
set(build "${WORK_DIR}/build")
file(REMOVE_RECURSE "${WORK_DIR}")

function(run step)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "${step} failed (${rc}):\n${out}\n${err}")
  endif()
  message(STATUS "${step}: ok")
  set(last_output "${out}" PARENT_SCOPE)
endfunction()

run("install" "${CMAKE_COMMAND}" --install "${NORMKIT_BUILD_DIR}" --prefix "${prefix}")
# The kernel library links only what it implements: zlib and oneDNN are the engine's.
file(GLOB targets_file "${prefix}/lib*/cmake/normkit/normkitTargets.cmake")
file(READ "${targets_file}" exported)
string(REGEX MATCH "set_target_properties\\(normkit::normkit PROPERTIES[^)]*\\)" kernel "${exported}")
if(kernel STREQUAL "" OR kernel MATCHES "ZLIB|dnnl")
  message(FATAL_ERROR "normkit::normkit should not link zlib or oneDNN:\n${kernel}")
endif()
string(REGEX MATCH "set_target_properties\\(normkit::engine PROPERTIES[^)]*\\)" engine "${exported}")
if(NOT engine MATCHES "normkit::normkit")
  message(FATAL_ERROR "normkit::engine is not exported, or does not link normkit::normkit:\n${engine}")
endif()
foreach(header normkit/normkit.hpp normkit/standardizer.hpp normkit/engine/nn.hpp
               normkit/engine/train.hpp normkit/engine/checkpoint.hpp normkit/engine/nn_fold.hpp
               normkit/engine/data.hpp normkit/engine/distributed.hpp)
  if(NOT EXISTS "${prefix}/include/${header}")
    message(FATAL_ERROR "not installed: include/${header}")
  endif()
endforeach()
# No package registry, no system prefixes first: only the fresh prefix may satisfy find_package.
run("configure consumer" "${CMAKE_COMMAND}" -S "${CONSUMER_SOURCE}" -B "${build}" -G Ninja
    "-DCMAKE_PREFIX_PATH=${prefix}" "-DCMAKE_CXX_COMPILER=${CXX_COMPILER}"
    "-DCMAKE_MAKE_PROGRAM=${MAKE_PROGRAM}" -DCMAKE_BUILD_TYPE=Release
    "-DCMAKE_CXX_FLAGS=${CXX_FLAGS}" "-DCMAKE_EXE_LINKER_FLAGS=${EXE_LINKER_FLAGS}"
    -DCMAKE_FIND_USE_PACKAGE_REGISTRY=OFF)
file(STRINGS "${build}/CMakeCache.txt" found REGEX "^normkit_DIR:")
string(FIND "${found}" "${prefix}/" at)
if(NOT at GREATER -1)
  message(FATAL_ERROR "find_package(normkit) did not use the installed prefix: ${found}")
endif()
run("build consumer" "${CMAKE_COMMAND}" --build "${build}")
run("run consumer" "${build}/normkit_consumer")
message(STATUS "${last_output}")
