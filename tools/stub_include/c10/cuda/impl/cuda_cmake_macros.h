// Stand-in for the header a CUDA build of torch generates; lets CPU machines syntax-check the CUDA glue .cpp files
// (tools/check_cuda_sources.sh). Never used for a real build.
#pragma once
#define C10_CUDA_BUILD_SHARED_LIBS
