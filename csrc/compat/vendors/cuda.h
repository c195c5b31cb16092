#pragma once
#include <cuda_runtime.h>
#include <cuda_fp16.h>

#define O4G_PLATFORM "cuda"
